"""hist_vlm.data"""
