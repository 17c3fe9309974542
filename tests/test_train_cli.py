"""`hist-vlm train`: one-line errors, and a run SIGKILLed mid-training that resumes exactly."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.train.checkpoint import latest_checkpoint
from hist_vlm.train.config import load_config
from hist_vlm.train.loop import train
from train_helpers import DEMO_CONFIGS, read_log, tiny_overrides, write_world

DEMO = str(DEMO_CONFIGS / "demo_tiny.yaml")


@pytest.mark.parametrize("args, message", [
    (["missing.yaml"], "config file not found: missing.yaml"),
    ([DEMO, "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    ([DEMO, "data.synthetic.enabled=false", "data.phrases=nowhere.jsonl"], "data.phrases: file not found"),
    ([DEMO, "data.synthetic.enabled=false", "data.phrases=" + DEMO, "data.image_root=" + DEMO],
     "data.image_root: folder not found"),
    ([DEMO, "data.swap_negatives=2"], "data.swap_negatives must be in [0, 1]"),
    ([DEMO, "loss.mlm_subject_probability=1.5"], "mlm_subject_probability must be in [0, 1]"),
])
def test_user_mistakes_are_one_line_errors(args, message, tmp_path):
    res = CliRunner().invoke(app, ["train", *args, f"run.dir={tmp_path / 'run'}"])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {res.output.strip()[7:]}" and message in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_a_killed_run_resumes_exactly(tmp_path):
    world = write_world(tmp_path / "world", n_images=16, size=40)
    steps = ("run.max_steps=6", "run.save_every=1")
    train(load_config(DEMO, tiny_overrides(*world, tmp_path / "ref", *steps)), progress=False)

    cmd = [str(Path(sys.executable).parent / "hist-vlm"), "train", DEMO,
           *tiny_overrides(*world, tmp_path / "run", *steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)   # wherever it is: mid-step, mid-checkpoint, mid-log line
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    saved = latest_checkpoint(tmp_path / "run")
    assert saved is not None
    start = int(saved.name.split("-")[1])
    assert 2 <= start < 6   # 3 log lines: the checkpoint of step 2 was complete

    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 6 steps" in done.stdout
    # the resumed process started at that checkpoint: it printed only the steps after it
    printed = [int(m) for m in re.findall(r"^step (\d+) \|", done.stdout, flags=re.M)]
    assert printed == list(range(start + 1, 7)), done.stdout[-2000:]
    # the log was rewound to the last complete checkpoint: it reads as one run
    got, ref = read_log(tmp_path / "run"), read_log(tmp_path / "ref")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, ref):
        a.pop("sec_per_step"), b.pop("sec_per_step")
        assert a == b
