"""Stacking `TextRows` blocks so that many kinds of text share one model call."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hist_vlm.batch import TextRows


def cat_rows(*blocks: TextRows, pad_id: int = 0) -> TextRows:
    """Stack row blocks into one, right-padding every block to the longest: [sum N, max T]."""
    t = max(b.input_ids.shape[1] for b in blocks)
    return TextRows(
        torch.cat([F.pad(b.input_ids, (0, t - b.input_ids.shape[1]), value=pad_id) for b in blocks]),
        torch.cat([F.pad(b.attention_mask, (0, t - b.attention_mask.shape[1]), value=0) for b in blocks]),
        torch.cat([b.image_index for b in blocks]),
    )
