"""Caption structure: noun phrases, their subjects, and composite pairs (Algorithm 1).

Never imports torch.
"""
from hist_vlm.text.types import CaptionParser, Phrase

__all__ = ["CaptionParser", "Phrase"]
