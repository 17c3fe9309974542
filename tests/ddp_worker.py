"""One rank of tests/test_ddp_hist.py: for each backbone, its shard of the batch, the full HIST
loss, backward, `allreduce_gradients`; rank 0 saves the averaged gradients."""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from hist_vlm.losses.hist import HistLoss  # noqa: E402
from hist_vlm.train.distributed import allreduce_gradients, broadcast_parameters  # noqa: E402
from losses_fixtures import build, hist_batch, pairs_only_on, shard_batch  # noqa: E402

IMAGE_IDS = [5, 6, 5, 7]  # image 0 and 2 are the same picture: positives across ranks


def step(name, config, rank: int = 0, world: int = 1):
    """Build the float64 model (same seed everywhere), run one HIST step on this rank's shard."""
    model = build(name, dtype=torch.float64)
    if rank == 1:  # prove the broadcast: rank 1 starts from other weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    broadcast_parameters(model)
    loss_fn = HistLoss(config, model).to(torch.float64)
    # pair rows only on images 0 and 1: rank 1 has none and must still join the collectives
    full = pairs_only_on(hist_batch(model, n_images=4, pad_to=16, image_ids=IMAGE_IDS), [0, 1])
    out = loss_fn(model, shard_batch(full, rank, world), progress=0.5)
    out["loss"].backward()
    return model, out["loss"].detach()


def run(rank: int, world: int, port: int, names: list[str], config, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a mismatched collective fails after 60 s instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for name in names:
            model, loss = step(name, config, rank, world)
            allreduce_gradients(model)
            dist.all_reduce(loss)
            if rank == 0:
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                torch.save({"grads": grads, "loss": loss / world}, os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()
