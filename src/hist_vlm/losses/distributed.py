"""Many processes without DDP's reducer: the gathers losses need across ranks.

Training keeps the model unwrapped and all-reduces gradients itself after backward
(`hist_vlm.train.distributed`, which says why). Each rank computes its loss on its shard;
losses normalise with global counts (`global_mean`), so the sum over ranks equals the
full-batch loss times world size and averaging the per-rank gradients gives the full-batch
gradient. Rows are gathered across ranks with gradient (`gather_with_grad`, ITC's features) or
without (`gather_no_grad`); shared-seed draws made for the global batch are cut with `local_shard`.
With one process every function here is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all_gather along dim 0. Backward: every rank's gradient w.r.t. the gathered
    tensor is summed (all_reduce) and each owner keeps its slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, size = world()
        ctx.rank, ctx.n = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' `x` concatenated along dim 0 in rank order; the gradient flows back to
    each owner, summed over ranks (open_clip's ClipLoss with gather_with_grad + local_loss).
    Shapes must match across ranks."""
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """All ranks' `x` concatenated along dim 0 (momentum features, ids, masks)."""
    _, size = world()
    if size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def global_mean(values: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted mean over the rows of ALL ranks, returned scaled so that averaging the
    per-rank gradients (`hist_vlm.train.distributed.allreduce_gradients`) gives the gradient
    of the global mean. The count is all-reduced on the device: no host sync."""
    weights = torch.ones_like(values) if weights is None else weights.to(values.dtype)
    total = (values * weights).sum()
    count = weights.sum().detach()
    _, size = world()
    if size > 1:
        count = count.clone()
        dist.all_reduce(count)
    return total * size / count.clamp(min=1e-12)


def local_shard(x: Tensor) -> Tensor:
    """This rank's equal slice of a tensor built for the global batch (shared-seed draws)."""
    rank, size = world()
    n = x.shape[0] // size
    return x[rank * n:(rank + 1) * n]
