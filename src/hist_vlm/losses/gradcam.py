"""Differentiable, batched ITM GradCAM on cross-attention: G = ReLU(A * d(match logit)/dA).

Rows never interact inside the fusion encoder, so the gradient of the SUM of all rows' match
logits gives every row's own gradient: one `autograd.grad` call serves the whole batch.
With `create_graph=True` the maps stay differentiable (second order) for the addition loss.

Token-averaging recipes (each caller names one):
  reference  ALBEF `Grounding.py`: padded tokens zeroed but the mean divides by the padded
             length T, so a map scales with n_valid / T (fine for argmax metrics).
  train      mean over the row's valid tokens only: a map does not depend on the rest of the batch.
"""
from __future__ import annotations

from typing import Sequence

import contextlib

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from hist_vlm.models.base import TextRows, VisionLanguageBackbone

RECIPES = ("reference", "train")
COMBINES = ("mean", "product")
NORMALIZES = ("none", "minmax")


def minmax_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-map min-max to [0, 1] (SelfEQ normalises its GradCAM maps this way): [N, ...] -> [N, ...].
    Differentiable; a constant map becomes 0."""
    flat = maps.flatten(1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp(min=eps)).view_as(maps)


def _token_mean(maps: Tensor, attention_mask: Tensor, recipe: str) -> Tensor:
    """[N, T, P] per-token maps -> [N, P] under the named padding recipe."""
    mask = attention_mask.to(maps.dtype).unsqueeze(-1)  # [N, T, 1]
    total = (maps * mask).sum(1)  # [N, P]
    if recipe == "reference":
        return total / maps.shape[1]
    return total / mask.sum(1).clamp(min=1.0)


def gradcam_maps(
    model: VisionLanguageBackbone,
    image_embeds: Tensor,
    rows: TextRows,
    *,
    layers: Sequence[int],
    head: int | None = None,
    combine: str = "mean",
    recipe: str = "train",
    create_graph: bool = False,
    text_embeds: Tensor | None = None,
    normalize: str = "none",
) -> Tensor:
    """GradCAM maps of `rows` against `image_embeds[rows.image_index]`: [N, gh, gw].

    layers   cross-attention layers (0-based); several are combined with `combine`
             ("mean" or element-wise "product" of the per-layer maps, paper Table 7)
    head     None = mean over heads, else that head only (0-based)
    recipe   "reference" or "train" (module doc)
    create_graph  keep the maps differentiable (training losses); False for evaluation
    text_embeds   optional `encode_text` output to reuse (ALBEF); BLIP ignores it
    normalize     "none" (raw maps) or "minmax" (each map scaled to [0, 1], `minmax_maps`)
    """
    if normalize not in NORMALIZES:
        raise ValueError(f"unknown map normalisation {normalize!r} (choose from {NORMALIZES})")
    if recipe not in RECIPES:
        raise ValueError(f"unknown GradCAM recipe {recipe!r} (choose from {RECIPES})")
    if combine not in COMBINES:
        raise ValueError(f"unknown map combination {combine!r} (choose from {COMBINES})")
    if not layers:
        raise ValueError("gradcam_maps needs at least one layer")
    gh, gw = model.patch_grid
    # fused SDPA kernels (cuDNN, flash, mem-efficient) have no double backward: a
    # create_graph pass must record the attention layers above the capture as plain math
    math_sdpa = sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), math_sdpa:
        # one fusion pass per distinct layer; every pass's logits sum into one scalar, whose
        # gradient w.r.t. each captured tensor is that pass's own (passes are independent)
        attns: list[Tensor] = []
        match = image_embeds.new_zeros(())
        for layer in layers:
            fused = model.fuse_rows(rows, image_embeds, text_embeds=text_embeds, capture_layer=layer)
            if fused.cross_attention is None or not fused.cross_attention.requires_grad:
                raise RuntimeError(
                    "cross-attention was not captured in the autograd graph; GradCAM needs the model "
                    "parameters to require grad"
                )
            attns.append(fused.cross_attention)  # [N, heads, T, 1+P]
            match = match + model.itm_logits(fused)[:, 1].sum()
        grads = torch.autograd.grad(match, attns, create_graph=create_graph)
    if head is not None and not 0 <= head < attns[0].shape[1]:
        raise ValueError(f"head {head} out of range: the cross-attention has {attns[0].shape[1]} heads")
    per_layer = []
    for attn, grad in zip(attns, grads):
        cam = (attn * grad).clamp(min=0)[..., 1:]  # [N, heads, T, P], image-CLS column dropped
        cam = cam.mean(1) if head is None else cam[:, head]  # [N, T, P]
        per_layer.append(_token_mean(cam, rows.attention_mask, recipe))  # [N, P]
    stacked = torch.stack(per_layer)  # [L, N, P]
    maps = stacked.mean(0) if combine == "mean" else stacked.prod(0)
    maps = maps.reshape(len(rows), gh, gw)
    if normalize == "minmax":
        maps = minmax_maps(maps)
    return maps if create_graph else maps.detach()
