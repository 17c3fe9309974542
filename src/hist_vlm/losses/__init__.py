"""hist_vlm.losses"""
