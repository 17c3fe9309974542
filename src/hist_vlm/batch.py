"""The tensors one training step consumes, at the bottom of the stack: the datasets build
them (`hist_vlm.data`), the backbones and losses read them (`hist_vlm.models`,
`hist_vlm.losses`), and neither needs the other to know their shape.

The central idea (DESIGN.md): the vision tower runs once per image; every text row (caption,
phrase, subject, partner, composite, ITM negative) points at its image through `image_index`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TextRows:
    """A block of tokenized texts, each pointing at one image of the batch."""

    input_ids: Tensor       # [N, T] int64
    attention_mask: Tensor  # [N, T] int64, 1 = real token
    image_index: Tensor     # [N] int64, row -> image in the batch

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "TextRows":
        return TextRows(*(getattr(self, f.name).to(device) for f in fields(self)))


def cat_rows(*blocks: TextRows, pad_id: int = 0) -> TextRows:
    """Stack row blocks into one, right-padding every block to the longest: [sum N, max T], so
    that many kinds of text share one model call."""
    t = max(b.input_ids.shape[1] for b in blocks)
    return TextRows(
        torch.cat([F.pad(b.input_ids, (0, t - b.input_ids.shape[1]), value=pad_id) for b in blocks]),
        torch.cat([F.pad(b.attention_mask, (0, t - b.attention_mask.shape[1]), value=0) for b in blocks]),
        torch.cat([b.image_index for b in blocks]),
    )


@dataclass
class HistBatch:
    """One training batch. B images; texts point at them through `image_index`.

    captions:   one row per image (the usual caption for ITC/ITM/MLM)
    phrases:    noun phrases C_i (phrase loss)
    subjects:   subject words S_i of the same phrases, row-aligned with `phrases`
    pair_first / pair_second / composites: row-aligned triples (C_i, C_j, "C_i and C_j")
        for the addition loss; may hold zero rows.
    caption_swaps: captions with one subject swapped for one the image lacks, extra ITM
        negatives of their image (`data.swap_negatives`), padded like `captions`; None = none.
    """

    pixel_values: Tensor  # [B, 3, H, W]
    image_ids: Tensor     # [B] int64, dataset-wide image id: same id = same image (ITC positives)
    captions: TextRows
    phrases: TextRows
    subjects: TextRows
    pair_first: TextRows
    pair_second: TextRows
    composites: TextRows
    caption_swaps: TextRows | None = None

    def to(self, device: torch.device | str) -> "HistBatch":
        return HistBatch(
            *(
                v.to(device) if isinstance(v, (Tensor, TextRows)) else v
                for v in (getattr(self, f.name) for f in fields(self))
            )
        )
