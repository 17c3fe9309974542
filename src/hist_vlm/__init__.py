"""hist-vlm: HIST structured training for vision-language models (ALBEF, BLIP)."""

__version__ = "0.1.0"
