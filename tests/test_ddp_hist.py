"""Two gloo processes on CPU, each on half the batch, with the FULL HIST loss (double backward
included) and `allreduce_gradients`, give the gradients of one process on the whole batch.

Why they can be equal: dropout is off in the tiny models; every random choice (ITM negatives,
MLM masks) is drawn by HistLoss from a generator seeded the same on all ranks, for the
GLOBAL batch, each rank using its slice; texts are padded to one fixed length so the draws
line up; losses are normalised with all-reduced counts (`global_mean`). ITM negatives come
from each rank's local images (ALBEF's recipe); the one-process reference draws them within
groups of 2 images (`itm_group_size=2`), i.e. from the same pools. Only rank 0 has pair rows
(the addition loss): a rank without pairs must still take part in the count all-reduce.
"""
import socket

import torch
import torch.multiprocessing as mp

from ddp_worker import run, step
from losses_fixtures import BACKBONES
from hist_vlm.losses.hist import HistLossConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_on_the_full_batch(tmp_path):
    names = list(BACKBONES)  # each as losses_fixtures.build makes it
    config = HistLossConfig(schedule="constant", capture_layers=(1,), queue_size=16, seed=3)
    mp.spawn(run, args=(2, _free_port(), names, config, str(tmp_path)), nprocs=2, join=True)
    config.itm_group_size = 2  # the reference draws ITM negatives from each rank's images
    for name in names:
        got = torch.load(tmp_path / f"{name}.pt")
        model, loss = step(name, config)
        torch.testing.assert_close(got["loss"], loss, rtol=1e-10, atol=1e-12)
        ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(got["grads"]) == set(ref)
        nonzero = 0
        for n, g in ref.items():
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name} {n}: {m}")
            nonzero += bool(g.abs().sum() > 0)
        assert nonzero > 0.9 * len(ref), name
