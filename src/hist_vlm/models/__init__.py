"""hist_vlm.models"""
