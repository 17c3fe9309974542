"""AdamW with the reference weight-decay groups, and the warm-up + cosine learning-rate curve."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from hist_vlm.train.config import ConfigError, OptimConfig, ScheduleConfig


def trainable_parameters(*modules: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named parameters that require grad, each once (the loss module may hold the model)."""
    seen, out = set(), []
    for module in modules:
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
    return out


def freeze(model: nn.Module, prefixes: Iterable[str]) -> None:
    """Keep the parameters whose names start with any of `prefixes` as loaded (`optim.freeze`);
    a prefix that names no parameter is an error, not a silently trained part."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            raise ConfigError(f"optim.freeze: no parameter of the model is named {prefix!r} or below it")
        for name, p in model.named_parameters():
            if name in matched:
                p.requires_grad_(False)


def weight_decay_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """ALBEF/SelfEQ's split: no decay on biases, LayerNorm weights and any other 1-D (or 0-D,
    e.g. the ITC temperature) parameter; `weight_decay` on the rest."""
    decay, no_decay = [], []
    for name, p in named:
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(named: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    groups = weight_decay_groups(named, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


@dataclass
class WarmupCosine:
    """LambdaLR multiplier: linear from warmup_lr to lr over warmup_steps, then cosine to min_lr
    at total_steps. A dataclass, so LambdaLR's state_dict saves it with the checkpoint."""

    lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            value = self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        else:
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            value = self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))
        return value / self.lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, schedule: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    curve = WarmupCosine(optim.lr, schedule.warmup_lr, schedule.min_lr, schedule.warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, curve)
