"""hist_vlm.eval"""
