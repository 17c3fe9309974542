"""Masked language modelling (ALBEF): 15% of tokens, 80% [MASK] / 10% random / 10% kept,
never PAD or CLS; soft targets from the momentum model (distillation weight alpha).

Masks are built from uniform draws the caller supplies (a shared-seed generator in HistLoss),
so a step does not depend on the number of processes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hist_vlm.losses.distributed import global_mean
from hist_vlm.losses.itc import fp32_or_wider


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    u: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    never_mask: Sequence[int],
    probability: float = 0.15,
    preferred: Tensor | None = None,
    preferred_probability: float | None = None,
) -> tuple[Tensor, Tensor]:
    """u [3, N, T] uniforms -> (masked input_ids [N, T], labels [N, T] with -100 off the mask).
    Tokens whose id is in `preferred` [K] are chosen with `preferred_probability` instead (the
    same uniforms: at equal probabilities the masks are the same)."""
    p = torch.full_like(u[0], probability)
    if preferred is not None and preferred_probability is not None:
        p = torch.where(torch.isin(input_ids, preferred), preferred_probability, p)
    chosen = (u[0] < p) & attention_mask.bool()
    for tok in never_mask:
        chosen &= input_ids != tok
    labels = input_ids.masked_fill(~chosen, -100)
    to_mask = chosen & (u[1] < 0.8)
    to_random = chosen & (u[1] >= 0.8) & (u[1] < 0.9)
    random_ids = (u[2] * vocab_size).long().clamp(max=vocab_size - 1)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_loss(logits: Tensor, labels: Tensor, logits_m: Tensor | None = None, alpha: float = 0.0) -> Tensor:
    """Global mean over masked tokens of (1-alpha) CE + alpha * soft CE against the momentum
    model (log_softmax over the VOCABULARY; SelfEQ's dim=1 is a bug, docs/reference_code.md)."""
    labels = labels.reshape(-1)  # [N*T], or [K] when the caller kept only the masked tokens
    sel = labels != -100
    logp = F.log_softmax(fp32_or_wider(logits), dim=-1).reshape(-1, logits.shape[-1])  # [N*T | K, V]
    ce = F.nll_loss(logp, labels.clamp(min=0), reduction="none")  # [N*T | K]
    if logits_m is not None and alpha > 0:
        soft = -(F.softmax(fp32_or_wider(logits_m), dim=-1).reshape_as(logp) * logp).sum(-1)
        ce = (1 - alpha) * ce + alpha * soft
    return global_mean(ce, sel)
