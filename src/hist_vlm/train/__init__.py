"""hist_vlm.train"""
