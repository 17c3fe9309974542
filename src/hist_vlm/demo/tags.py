"""`task: tags`: a vision tower taught which words an image's captions use, before caption
pretraining from scratch.

Why (docs/experiments.md, "What taught shapes: a tower tagged with every caption word"):
trained from scratch on ITC, ITM and MLM, a small model grounds what one patch shows (colour)
and never what only an arrangement of patches shows (shape): the caption losses pool the image
like a mean, in which an object of 9-30 of 256 patches drowns, and colour alone already tells a
batch's images apart. A tower that first learns to say which caption words fit an image, pooled
by the MAX over its patch tokens (the one patch that holds the evidence gets the gradient),
learns shapes; caption pretraining from it, with its convolutional stem kept (`optim.freeze`),
grounds shapes as well as colours. ALBEF starts from an ImageNet-trained ViT for the same
reason; this is the label-free analogue: the labels are the captions' own words.

The tags of image k: the words (lower-cased letter runs) of all its captions, over the words
that some but not nearly all images use (share of images in [MIN_SHARE, MAX_SHARE]: "a" tells
no image apart). Loss: binary cross-entropy of a linear head on the max-pooled patch tokens.
The data, the sampler, the crops and the checkpoints are the HIST task's.
"""
from __future__ import annotations

import re
from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hist_vlm.batch import HistBatch
from hist_vlm.data.dataset import ImageRecord
from hist_vlm.models.base import VisionLanguageBackbone
from hist_vlm.train.tasks.hist import HistTask

MIN_SHARE, MAX_SHARE = 0.01, 0.99
_WORD = re.compile(r"[a-z]+")


def caption_word_tags(records: list[ImageRecord]) -> tuple[list[str], Tensor]:
    """(the tag words, [N, W] multi-hot float): which tag words the captions of each record use."""
    words_of = [set(_WORD.findall(" ".join(rec.captions).lower())) for rec in records]
    counts = Counter(w for words in words_of for w in words)
    vocab = sorted(w for w, c in counts.items() if MIN_SHARE <= c / len(records) <= MAX_SHARE)
    column = {w: i for i, w in enumerate(vocab)}
    tags = torch.zeros(len(records), len(vocab))
    for row, words in enumerate(words_of):
        tags[row, [column[w] for w in words if w in column]] = 1.0
    return vocab, tags


class CaptionWordTagsLoss(nn.Module):
    """BCE of which tag words an image's captions use, from the max over its patch tokens.
    `tags` [N, W] is indexed by `HistBatch.image_ids` (the dataset's record index)."""

    def __init__(self, model: VisionLanguageBackbone, tags: Tensor) -> None:
        super().__init__()
        with torch.no_grad():  # the tower's token width, from one blank image
            size = model.image_size
            width = model.encode_image(torch.zeros(1, 3, size, size)).shape[-1]
        self.head = nn.Linear(width, tags.shape[1])
        self.register_buffer("tags", tags, persistent=False)

    def forward(self, model: VisionLanguageBackbone, batch: HistBatch, progress: float) -> dict[str, Tensor]:
        patches = model.encode_image(batch.pixel_values)[:, 1:]   # [B, P, D], without [CLS]
        logits = self.head(patches.amax(1))                       # [B, W]
        loss = F.binary_cross_entropy_with_logits(logits, self.tags[batch.image_ids])
        return {"loss": loss, "tags": loss.detach()}


class TagsTask(HistTask):
    """The HIST task's data and model; the objective is `CaptionWordTagsLoss`."""

    def objective(self, model) -> nn.Module:
        vocab, tags = caption_word_tags(self.records)
        if not vocab:
            from hist_vlm.train.config import ConfigError

            raise ConfigError("task tags: no caption word is used by between 1 % and 99 % of the images")
        return CaptionWordTagsLoss(model, tags)
