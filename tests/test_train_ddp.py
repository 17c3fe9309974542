"""Two processes (torchrun, gloo on CPU) through `hist-vlm train` give the same losses as one
process on the same global batch: the explicit gradient all-reduce path of the loop.

What makes them comparable (see hist_vlm.losses.hist): no dropout; texts padded to a fixed
length, so the loss's shared-seed MLM draws line up; ALBEF draws ITM negatives among each
rank's own images, so the one-process run draws them within groups of 2 images. Ranks have
different numbers of pair rows (one may have none): the addition loss must still agree."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hist_vlm.train.config import load_config
from hist_vlm.train.loop import train
from train_helpers import DEMO_CONFIGS, read_log, tiny_overrides, write_world

TERMS = ("loss", "itc", "itm", "mlm", "phrase_itc", "phrase_itm", "phrase_mlm", "subject_itc", "subject_itm", "add")


def test_two_processes_match_one_process(tmp_path):
    world = write_world(tmp_path / "world", n_images=16, size=40)
    common = ("run.max_steps=3", "data.pad_to_max_length=true", "run.save_every=1", "run.keep_checkpoints=3")
    one = load_config(DEMO_CONFIGS / "demo_tiny.yaml",
                      tiny_overrides(*world, tmp_path / "one", *common, "loss.itm_group_size=2"))
    train(one, progress=False)                                   # batch 4 on one process

    cli = Path(sys.executable).parent / "hist-vlm"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(cli),
           "train", str(DEMO_CONFIGS / "demo_tiny.yaml"),
           *tiny_overrides(*world, tmp_path / "two", *common, "data.batch_size=2")]   # 2 x 2 images
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # own session: on a timeout the workers are killed with the launcher, not left hanging
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "trained 3 steps" in out

    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for k in TERMS:   # the first step: same weights, same data, same draws
        assert b[0][k] == pytest.approx(a[0][k], rel=1e-5, abs=1e-6), k
    # later steps drift only by float noise that Adam amplifies where a gradient is ~0
    for ra, rb in zip(a[1:], b[1:]):
        for k in TERMS:
            assert rb[k] == pytest.approx(ra[k], rel=2e-3, abs=1e-4), (ra["step"], k)

    # after the first update (lr 1e-5), the weights agree: gradients were all-reduced. With
    # rank-local gradients, Adam's first step (about lr * sign(grad)) would differ almost everywhere.
    wa = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000001" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "step-00000001" / "model" / "model.safetensors"))
    assert a[0]["lr"] == 1e-5
    moved = sum(int(((wa[k] - wb[k]).abs() > 1e-6).sum()) for k in wa)
    assert moved < 1e-4 * sum(v.numel() for v in wa.values())
