"""Differentiable, batched GradCAM on the attention that reads the image: G = ReLU(A * d score/dA).

The score is the backbone's `grounding_score`: the ITM match logit of an encoder (the paper),
the text's log-likelihood given the image of a decoder (LLaVA). A is the captured attention's
`capture_block` (FusionOutput): the text (or query) tokens' rows, the patch-grid columns.
Rows never interact inside the fusion pass, so the gradient of the SUM of all rows' scores
gives every row's own gradient: one `autograd.grad` call serves the whole batch.
With `create_graph=True` the maps stay differentiable (second order) for the addition loss.
Several layers (a layer combination, the layer/head sweep) are captured in the same single
fusion pass, so their cost is one pass and one gradient call whatever their number.

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

from hist_vlm.batch import TextRows
from hist_vlm.models.base import VisionLanguageBackbone

RECIPES = ("reference", "train")
COMBINES = ("mean", "product")
NORMALIZES = ("none", "minmax")


def minmax_maps(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """SelfEQ's per-map min-max, [N, ...] -> [N, ...]: `g -= g.min(); g /= g.max() + 1e-7`
    (uvavision/SelfEQ `models/model_self_consistency.py`), out of place so it stays differentiable.

    The maximum is taken after the minimum is subtracted, i.e. the map's range: a map lands in
    [0, r / (r + eps)] for range r. A map whose range is far above eps spans ~[0, 1]; a
    near-constant one stays near 0 (range 1e-11 -> at most ~1e-4) instead of having its noise
    stretched to [0, 1]; a constant map becomes 0."""
    flat = maps.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    return (flat / (flat.max(1, keepdim=True).values + eps)).view_as(maps)


def _token_mean(maps: Tensor, attention_mask: Tensor, recipe: str) -> Tensor:
    """[N, ..., T, P] per-token maps -> [N, ..., P] under the named padding recipe."""
    lead = (1,) * (maps.dim() - 3)
    mask = attention_mask.to(maps.dtype).view(attention_mask.shape[0], *lead, -1, 1)  # [N, 1.., T, 1]
    total = (maps * mask).sum(-2)  # [N, ..., P]
    if recipe == "reference":
        return total / maps.shape[-2]
    return total / mask.sum(-2).clamp(min=1.0)


def _layer_cams(
    model: VisionLanguageBackbone,
    image_embeds: Tensor,
    rows: TextRows,
    layers: Sequence[int],
    create_graph: bool,
    text_embeds: Tensor | None,
) -> tuple[list[Tensor], Tensor]:
    """(ReLU(A * dA) of every layer in `layers` (repeats allowed): one [N, heads, S, P] per
    entry, the captured tensors' `capture_block`; the [N, S] mask of the tokens they average over). ONE
    fusion pass captures all the distinct layers and ONE `autograd.grad` call gives every
    capture's gradient. S is the rows' text, or the tokens the backbone's `capture_mask` names."""
    distinct = tuple(dict.fromkeys(int(x) for x in layers))
    # fused SDPA kernels (cuDNN, flash, mem-efficient) have no double backward: a
    # create_graph pass must record the attention layers above the capture as plain math
    math_sdpa = sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), math_sdpa:
        fused = model.fuse_rows(rows, image_embeds, text_embeds=text_embeds, capture_layer=distinct)
        attns = fused.cross_attentions  # per distinct layer [N, heads, S, 1+P]
        if len(attns) != len(distinct) or not all(a.requires_grad for a in attns):
            raise RuntimeError(
                "cross-attention was not captured in the autograd graph; GradCAM needs the model "
                "parameters to require grad"
            )
        score = model.grounding_score(fused).sum()  # rows are independent: one scalar serves all
        grads = torch.autograd.grad(score, attns, create_graph=create_graph)
    tokens, patches = fused.capture_block
    cams = {x: (a[..., tokens, patches] * g[..., tokens, patches]).clamp(min=0)
            for x, a, g in zip(distinct, attns, grads)}  # [N, heads, S, P]
    mask = rows.attention_mask if fused.capture_mask is None else fused.capture_mask
    return [cams[int(x)] for x in layers], mask


def _check(layers: Sequence[int], recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown GradCAM recipe {recipe!r} (choose from {RECIPES})")
    if not layers:
        raise ValueError("gradcam_maps needs at least one layer")


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
    normalize     "none" (raw maps) or "minmax" (SelfEQ's per-map min-max, `minmax_maps`)
    """
    if normalize not in NORMALIZES:
        raise ValueError(f"unknown map normalisation {normalize!r} (choose from {NORMALIZES})")
    _check(layers, recipe)
    if combine not in COMBINES:
        raise ValueError(f"unknown map combination {combine!r} (choose from {COMBINES})")
    gh, gw = model.patch_grid
    cams, token_mask = _layer_cams(model, image_embeds, rows, layers, create_graph, text_embeds)
    if head is not None and not 0 <= head < cams[0].shape[1]:
        raise ValueError(f"head {head} out of range: the cross-attention has {cams[0].shape[1]} heads")
    per_layer = []
    for cam in cams:
        cam = cam.mean(1) if head is None else cam[:, head]  # [N, T, P]
        per_layer.append(_token_mean(cam, token_mask, recipe))  # [N, P]
    stacked = torch.stack(per_layer)  # [L, N, P]
    maps = stacked.mean(0) if combine == "mean" else stacked.prod(0)
    maps = maps.reshape(len(rows), gh, gw)
    if normalize == "minmax":
        maps = minmax_maps(maps)
    return maps if create_graph else maps.detach()


def gradcam_head_maps(
    model: VisionLanguageBackbone,
    image_embeds: Tensor,
    rows: TextRows,
    *,
    layers: Sequence[int],
    recipe: str = "train",
    create_graph: bool = False,
    text_embeds: Tensor | None = None,
) -> Tensor:
    """Every head's map of every layer in `layers`: [N, L, heads, gh, gw], from the same single
    fusion pass and gradient call as `gradcam_maps`. The head mean and layer combinations of
    `gradcam_maps` are (up to float rounding) means and products of these maps: what the
    layer/head sweep (hist_vlm.eval.sweep) derives from one pass."""
    _check(layers, recipe)
    gh, gw = model.patch_grid
    cams, token_mask = _layer_cams(model, image_embeds, rows, layers, create_graph, text_embeds)
    maps = _token_mean(torch.stack(cams, 1), token_mask, recipe)  # [N, L, heads, S, P] -> [N, L, heads, P]
    maps = maps.view(*maps.shape[:3], gh, gw)  # [N, L, heads, gh, gw]
    return maps if create_graph else maps.detach()


def paired_gradcam(
    model: VisionLanguageBackbone, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, layer: int
) -> Tensor:
    """Evaluation GradCAM of text i on image i ([B, 3, H, W], [B, T] x2 -> raw maps [B, gh, gw],
    detached), recipe "reference" at cross-attention `layer`: ALBEF's `Grounding.py`
    (`gradcam_mode='itm'`, its `block_num` = fusion_layer + layer). Runs in eval mode, restored
    afterwards."""
    rows = TextRows(input_ids, attention_mask, torch.arange(input_ids.shape[0], device=input_ids.device))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            image_embeds = model.encode_image(pixel_values)
            return gradcam_maps(model, image_embeds, rows, layers=[layer], recipe="reference")
    finally:
        model.train(was_training)
