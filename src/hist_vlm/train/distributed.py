"""Gradient synchronisation for training many processes without DDP's reducer.

Why not `DistributedDataParallel`: the addition loss differentiates through
`autograd.grad(create_graph=True)`, and with plain `DDP(model)` the reducer's hooks silently
skip the all-reduce for that backward, leaving rank-local gradients (docs/reference_code.md; pytorch
#47562, #63929). So training keeps the model unwrapped (it is the `no_sync()` path, always):
  1. `broadcast_parameters(model)` once at start (rank 0's weights everywhere);
  2. each rank computes its loss on its shard (losses normalise with global counts, see
     `hist_vlm.losses.distributed.global_mean`, so the sum over ranks equals the full-batch
     loss times world size);
  3. `loss.backward()`, then `allreduce_gradients(model)`: flattened buckets,
     `all_reduce(SUM) / world_size`. Parameters whose `.grad` is None are treated as zero on
     every rank (never skipped on some ranks only, which would desynchronise the buckets).
With one process both functions do nothing.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hist_vlm.losses.distributed import world


@torch.no_grad()
def broadcast_parameters(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (start of training)."""
    if world()[1] == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def allreduce_gradients(params: nn.Module | Iterable[nn.Parameter], bucket_mb: float = 25.0) -> None:
    """Average `.grad` over ranks in flattened buckets (call after `loss.backward()`).

    Every trainable parameter takes part on every rank; a missing grad counts as zeros and
    is materialised, so all ranks agree on the bucket layout."""
    _, size = world()
    if size == 1:
        return
    if isinstance(params, nn.Module):
        params = params.parameters()
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    limit = int(bucket_mb * 2**20)
    bucket: list[Tensor] = []
    nbytes = 0
    for p in trainable:
        bucket.append(p.grad)
        nbytes += p.grad.numel() * p.grad.element_size()
        if nbytes >= limit:
            _reduce_bucket(bucket, size)
            bucket, nbytes = [], 0
    if bucket:
        _reduce_bucket(bucket, size)


def _reduce_bucket(grads: list[Tensor], size: int) -> None:
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(group)
        dist.all_reduce(flat)
        flat.div_(size)
        for g, synced in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
            g.copy_(synced)
