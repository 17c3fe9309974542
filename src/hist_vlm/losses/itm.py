"""Image-text matching with hard negatives sampled from ITC similarities, on the device.

For every text row one negative image, for every image one negative text, drawn with
probability softmax(sim / temp) over the local batch (ALBEF), positives excluded (same image
id or token-identical text: "a man" of image 2 is no negative for image 1's "a man").
Sampling is inverse-CDF on uniform draws the caller supplies: one `searchsorted` over the
whole [N, B] weight matrix, no `.item()`, and the same draws give the same negatives whatever
the number of processes (the draws come from a shared-seed generator, see HistLoss).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hist_vlm.losses.distributed import global_mean
from hist_vlm.losses.itc import fp32_or_wider, positive_masks, similarity
from hist_vlm.batch import TextRows, cat_rows
from hist_vlm.models.base import VisionLanguageBackbone


def sample_rows(weights: Tensor, u: Tensor) -> Tensor:
    """One categorical draw per row of `weights` [N, K] (>= 0) from uniforms `u` [N] -> [N].
    Rows without any weight fall back to uniform."""
    empty = weights.sum(1, keepdim=True) <= 0
    weights = torch.where(empty, torch.ones_like(weights), weights)
    cdf = weights.cumsum(1)  # [N, K]
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)  # [N, 1]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=weights.shape[1] - 1)


def hard_negatives(
    text_feat: Tensor, image_feat: Tensor, temp: Tensor, pos: Tensor, u_text: Tensor, u_image: Tensor,
    *, hard: bool = True,
) -> tuple[Tensor, Tensor]:
    """(negative image per text [N], negative text per image [B]); pos [N, B] local positives."""
    with torch.no_grad():
        if hard:
            sim = similarity(fp32_or_wider(text_feat), fp32_or_wider(image_feat)) / temp  # [N, B]
            # positives masked BEFORE the softmax: masked after it, a peaked row (low temp)
            # underflows to all zeros and sample_rows' uniform fallback could draw a positive
            w_t2i = F.softmax(sim.masked_fill(pos, float("-inf")), 1).nan_to_num(0.0)
            w_i2t = F.softmax(sim.t().masked_fill(pos.t(), float("-inf")), 1).nan_to_num(0.0)  # [B, N]
        else:  # uniform over the non-positives
            w_t2i = (~pos).float()
            w_i2t = (~pos.t()).float()
        return sample_rows(w_t2i, u_text), sample_rows(w_i2t, u_image)


def outside_group(image_index: Tensor, n_images: int, group_size: int | None) -> Tensor:
    """[N, B] True where image b is not in the group of `group_size` consecutive images that
    row n's image belongs to (no such image with `group_size` None: the whole local batch)."""
    images = torch.arange(n_images, device=image_index.device)
    if group_size is None:
        return torch.zeros(len(image_index), n_images, dtype=torch.bool, device=image_index.device)
    return image_index.unsqueeze(1) // group_size != (images // group_size).unsqueeze(0)


@dataclass
class ItmBlock:
    """The fusion rows of one ITM term: N positives, N (text, negative image), B (negative text, image)."""

    rows: TextRows
    embeds: Tensor   # [2N+B, T, D] unimodal text embeddings (reused by ALBEF, ignored by BLIP)
    labels: Tensor   # [2N+B] 1 = match


def itm_block(
    image_embeds: Tensor,
    rows: TextRows,
    *,
    text_embeds: Tensor,
    text_feat: Tensor,
    image_feat: Tensor,
    image_ids: Tensor,
    keys: Tensor,
    temp: Tensor,
    u_text: Tensor,
    u_image: Tensor,
    hard: bool = True,
    group_size: int | None = None,
) -> ItmBlock:
    """Draw the negatives of `rows` and lay out their fusion rows. `group_size`: draw negatives
    only among images (and their texts) of the same consecutive group of that many images;
    None = the whole local batch (ALBEF). Setting it to the per-rank batch makes one process
    reproduce a multi-process step exactly."""
    b = image_embeds.shape[0]
    arange_b = torch.arange(b, device=image_embeds.device)
    row_ids = image_ids[rows.image_index]
    pos, _ = positive_masks(row_ids, keys, image_ids, row_ids, keys, image_ids)  # [N, B]
    excluded = pos | outside_group(rows.image_index, b, group_size)
    neg_img, neg_txt = hard_negatives(text_feat, image_feat, temp, excluded, u_text, u_image, hard=hard)
    all_rows = cat_rows(
        rows,
        TextRows(rows.input_ids, rows.attention_mask, neg_img),
        TextRows(rows.input_ids[neg_txt], rows.attention_mask[neg_txt], arange_b),
    )
    embeds = torch.cat([text_embeds, text_embeds, text_embeds[neg_txt]])  # [2N+B, T, D]
    n = len(rows)
    labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n + b, dtype=torch.long)])
    return ItmBlock(all_rows, embeds, labels.to(image_embeds.device))


def with_negative_texts(block: ItmBlock, rows: TextRows, embeds: Tensor) -> ItmBlock:
    """`block` plus `rows` [S] fused with their own image, labelled 0: texts built not to match
    it (`HistBatch.caption_swaps`); `embeds` [S, T, D] at the block's padded length."""
    labels = torch.cat([block.labels, block.labels.new_zeros(len(rows))])
    return ItmBlock(cat_rows(block.rows, rows), torch.cat([block.embeds, embeds]), labels)


def itm_losses(model: VisionLanguageBackbone, image_embeds: Tensor, blocks: list[ItmBlock]) -> list[Tensor]:
    """One cross-entropy per block (captions, phrases, subjects), each block fused at its OWN
    padded length: a subject row is ~3 tokens and a caption ~25, and one pass with every block
    padded to the longest spent most of the subject and phrase work on padding."""
    out = []
    for blk in blocks:
        logits = model.itm_logits(model.fuse_rows(blk.rows, image_embeds, text_embeds=blk.embeds))  # [n, 2]
        out.append(global_mean(F.cross_entropy(fp32_or_wider(logits), blk.labels, reduction="none")))
    return out
