"""This process's place in a many-process job (`Environment`), and gradient synchronisation
without DDP's reducer.

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

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hist_vlm.losses.distributed import world
from hist_vlm.train.config import ConfigError


@dataclass
class Environment:
    """This process's place in the job, read from the launcher's RANK/WORLD_SIZE/LOCAL_RANK."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_environment(device: str) -> Environment:
    """Init torch.distributed (nccl on GPU, gloo on CPU) when launched with WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no GPU is visible")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
        owns = True
    return Environment(rank, world_size, local_rank, dev, owns)


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
