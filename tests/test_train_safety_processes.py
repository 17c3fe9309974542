"""Two real processes on one run folder: the second stops at once with one line naming the
first's PID, before writing anything there (the synthetic world included); then Ctrl-C (SIGINT)
stops the first with one line and exit code 130, its newest complete checkpoint intact."""
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.train.checkpoint import latest_checkpoint, read_checkpoint, step_folders
from hist_vlm.train.config import load_config
from hist_vlm.train.loop import train
from train_helpers import DEMO_CONFIGS, read_log, tiny_overrides, write_world

DEMO = str(DEMO_CONFIGS / "demo_tiny.yaml")


def _sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # a background shell may have set SIG_IGN: Python keeps that


def test_a_second_run_in_the_folder_is_refused_and_ctrl_c_stops_the_first_cleanly(tmp_path):
    world = write_world(tmp_path / "world", n_images=8, size=32)
    run = tmp_path / "run"
    long = tiny_overrides(*world, run, "schedule.epochs=500", "run.save_every=2")   # 1000 steps: until stopped
    out, err = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    first = subprocess.Popen([str(Path(sys.executable).parent / "hist-vlm"), "train", DEMO, *long],
                             stdout=out, stderr=err, preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "log.jsonl").is_file() and len(read_log(run)) >= 3) and time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
            time.sleep(0.05)
        config_before = (run / "config.yaml").read_text()

        # the same folder, a synthetic-world config: refused before the world is written
        start = time.monotonic()
        res = CliRunner().invoke(app, ["train", DEMO, f"run.dir={run}", "data.synthetic.n_train=4"])
        assert res.exit_code == 2 and time.monotonic() - start < 10
        assert res.output.strip() == (f"error: {run} is in use by another training run (process {first.pid}): "
                                      "wait for it to end, or use another folder")
        assert not (run / "world").exists() and (run / "config.yaml").read_text() == config_before
        res = CliRunner().invoke(app, ["train", DEMO, *long, "--resume"])   # resuming it is refused too
        assert res.exit_code == 2 and f"(process {first.pid})" in res.output
        assert first.poll() is None   # the first run went on
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
        out.close(), err.close()
    assert first.returncode == 130
    last = [line for line in (tmp_path / "stderr.txt").read_text().replace("\r", "\n").splitlines() if line.strip()][-1]
    newest = latest_checkpoint(run)
    printed = [r["step"] for r in read_log(run)]
    step = int(last.split()[3].rstrip(";"))
    assert last == (f"interrupted at step {step}; resume with --resume (newest complete checkpoint: {newest})")
    # save_every=2: the newest complete checkpoint is at most 2 steps back; exactly 2 when Ctrl-C
    # landed during the save of step `step` itself (after its log line), which must leave no trace
    assert step in (printed[-1], printed[-1] + 1) and step - 2 <= int(newest.name.split("-")[1]) <= step
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()
    # every checkpoint reads back whole; no half-written one is left
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [p.name for p in step_folders(run)]
    assert all(read_checkpoint(p) for p in step_folders(run))
    # and the run goes on from it
    done = int(newest.name.split("-")[1])
    result = train(load_config(DEMO, [*long, f"run.max_steps={done + 1}"]), resume=True, progress=False)
    assert (result.start_step, result.global_step) == (done, done + 1)
