"""hist-vlm: HIST structured training for vision-language models (ALBEF, BLIP, BLIP-2)."""

__version__ = "0.1.0"
