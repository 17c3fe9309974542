"""A run that cannot be silently wrong or lose a result: out-of-range or non-finite settings,
a loss that turns NaN, a damaged newest checkpoint, settings changed on --resume, a synthetic
world of another recipe, a full disk: each one line (no traceback), nothing half-written.
(Two real processes on one run folder, and Ctrl-C: test_train_safety_processes.py.)"""
import errno
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import hist_vlm.train.checkpoint as checkpoint_module
from hist_vlm.cli import app
from hist_vlm.losses.hist import HistLoss
from hist_vlm.train.checkpoint import read_checkpoint, step_folders
from hist_vlm.train.config import load_config
from hist_vlm.train.data import prepare_data
from hist_vlm.train.loop import train
from hist_vlm.train.tasks.vqa import vqa_files
from train_helpers import DEMO_CONFIGS, read_log, tiny_overrides, write_world

DEMO = str(DEMO_CONFIGS / "demo_tiny.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), n_images=8, size=32)


def cli(world, run_dir, *extra, resume=False):
    args = ["train", DEMO, *tiny_overrides(*world, run_dir, *extra)] + (["--resume"] if resume else [])
    return CliRunner().invoke(app, args)


def one_error_line(res, code=2) -> str:
    """The run's one error line (progress and log lines may come before it)."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def all_finite(folder) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(folder / "model" / "model.safetensors")).values())


@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "optim: lr must be a finite number, got inf"),
    ("optim.lr=.inf", "optim: lr must be a finite number, got inf"),
    ("optim.lr=nan", "optim: lr must be a finite number, got nan"),
    ("optim.lr=-1", "optim: lr must be greater than 0, got -1.0"),
    ("run.max_steps=-1", "run: max_steps must be at least 1, got -1"),
    ("optim.betas=[0.9,1.5]", "optim: betas[1] must be in [0, 1), got 1.5"),
    ("optim.max_grad_norm=.nan", "optim: max_grad_norm must be a finite number"),
    ("schedule.warmup_lr=-1e-6", "schedule: warmup_lr must be at least 0"),
    ("data.crop_scale=[0.5,2]", "data: crop_scale must be [low, high] with 0 < low <= high <= 1"),
    ("run.max_steps=2.5", "run.max_steps must be an integer, got 2.5"),      # wrong types
    ("optim.betas=0.9", "optim.betas must be a list of 2 values, got 0.9"),
    ("data.batch_size=[4]", "data.batch_size must be an integer, got [4]"),
])
def test_out_of_range_and_wrong_typed_settings_are_one_line_errors(override, message, tmp_path):
    res = CliRunner().invoke(app, ["train", DEMO, override, f"run.dir={tmp_path / 'run'}"])
    assert res.exit_code == 2 and res.output.strip() == f"error: {res.output.strip()[7:]}"
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_utf8_or_mistyped_is_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("run:\n  dir: caf\xe9\n".encode("latin-1"))
    res = CliRunner().invoke(app, ["train", str(bad)])
    assert res.exit_code == 2 and res.output.strip() == f"error: {bad}: not UTF-8 text (byte 0xe9 at offset 15)"
    typed = tmp_path / "typed.yaml"
    typed.write_text("optim:\n  lr: [1]\n")
    res = CliRunner().invoke(app, ["train", str(typed)])
    assert res.exit_code == 2 and res.output.strip() == "error: optim.lr must be a number, got [1]"


def test_a_loss_that_turns_nan_stops_naming_the_step_and_term_and_saves_nothing_of_it(world, tmp_path, monkeypatch):
    forward, calls = HistLoss.forward, []

    def nan_at_third(self, *args, **kwargs):
        terms = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            terms["itc"] = terms["itc"] * math.nan
            terms["loss"] = terms["loss"] + terms["itc"]
        return terms

    monkeypatch.setattr(HistLoss, "forward", nan_at_third)
    res = cli(world, tmp_path / "run", "run.save_every=1", "run.keep_checkpoints=5")
    line = one_error_line(res, code=1)
    assert line.startswith("error: non-finite loss at step 3: itc, loss; stopped before the optimizer step")
    assert "step-00000002" in line
    assert [p.name for p in step_folders(tmp_path / "run")] == ["step-00000001", "step-00000002"]
    assert all(all_finite(p) for p in step_folders(tmp_path / "run"))
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]


def test_a_learning_rate_that_overflows_the_weights_stops_before_a_nan_checkpoint(world, tmp_path):
    res = cli(world, tmp_path / "run", "optim.lr=1e30", "schedule.warmup_steps=0", "run.save_every=1")
    line = one_error_line(res, code=1)
    assert line.startswith("error: non-finite ") and " at step " in line
    assert all(all_finite(p) for p in step_folders(tmp_path / "run"))


def test_weights_that_became_nan_are_never_saved(world, tmp_path, monkeypatch):
    step, calls = torch.optim.AdamW.step, []

    def corrupt_second(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.nan)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", corrupt_second)
    res = cli(world, tmp_path / "run", "run.save_every=2")
    line = one_error_line(res, code=1)
    assert line.startswith("error: not saving step-00000002: model.") and "hold inf or NaN values" in line
    assert step_folders(tmp_path / "run") == []


SAVED = ("schedule.epochs=3", "run.max_steps=4", "run.save_every=1", "run.keep_checkpoints=3")


@pytest.fixture(scope="module")
def saved_run(world, tmp_path_factory):
    """4 steps of 6, a checkpoint after each of steps 2, 3 and 4."""
    run = tmp_path_factory.mktemp("saved") / "run"
    train(load_config(DEMO, tiny_overrides(*world, run, *SAVED)), progress=False)
    return run


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, named", [
    (lambda c: _truncate(c / "model" / "model.safetensors"), "model/model.safetensors cannot be read"),
    (lambda c: (c / "model" / "model.safetensors").write_bytes(b""), "model/model.safetensors cannot be read"),
    (lambda c: (c / "state.json").unlink(), "state.json is missing"),
    (lambda c: (c / "state.json").write_text("{\"epoch\": 1"), "state.json cannot be read"),
    (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt cannot be read"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, named, saved_run, world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    damage(run / "checkpoints" / "step-00000004")
    res = cli(world, run, *SAVED, resume=True)
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint step-00000004 is damaged" in warnings[0] and named in warnings[0]
    assert "trained 4 steps" in res.output
    # step 4 was trained again from step 3, exactly as before, and saved whole
    assert read_log(run) == [{**r, "sec_per_step": r2["sec_per_step"]}
                             for r, r2 in zip(read_log(saved_run), read_log(run))]
    assert read_checkpoint(run / "checkpoints" / "step-00000004").position.global_step == 4


def test_no_readable_checkpoint_is_one_line(saved_run, world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    for folder in step_folders(run):
        (folder / "rng.pt").write_bytes(b"not a zip")
    line = one_error_line(cli(world, run, *SAVED, resume=True))
    assert "can be read back" in line


def test_changed_settings_on_resume_are_refused_naming_them(saved_run, world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    before = (run / "config.yaml").read_text()
    line = one_error_line(cli(world, run, *SAVED, "optim.lr=5", "loss.queue_size=64", resume=True))
    assert "changed: loss.queue_size (32 -> 64), optim.lr (0.001 -> 5.0)" in line
    assert "Only run.max_steps, run.log_every, " in line
    assert (run / "config.yaml").read_text() == before and len(step_folders(run)) == 3
    # how long, how often it logs and saves, and the loader workers may change
    res = cli(world, run, *SAVED, "run.max_steps=5", "run.log_every=2", "run.save_every=5", "data.num_workers=0",
              "run.keep_checkpoints=2", resume=True)
    assert res.exit_code == 0 and "trained 5 steps" in res.output, res.output


def _world_records(world):
    return len((world / "phrases_train.jsonl").read_text().splitlines())


def test_a_synthetic_world_of_another_recipe_is_rebuilt(tmp_path, capsys):
    def prepare(n_train):
        cfg = load_config(DEMO, ["data.synthetic.enabled=true", f"data.synthetic.n_train={n_train}",
                                 "data.synthetic.n_val=0", "data.synthetic.n_test=0", "data.synthetic.image_size=32"])
        return prepare_data(cfg.data, tmp_path, True, lambda: None)

    phrases, world = prepare(3)
    assert _world_records(world) == 3 and json.loads((world / "recipe.json").read_text())["n_train"] == 3
    capsys.readouterr()
    prepare(5)
    assert _world_records(world) == 5
    assert capsys.readouterr().err.splitlines()[0] == (
        f"note: {world} was built for data.synthetic.n_train=3; rebuilding it for n_train=5")
    stamp = (world / "recipe.json").stat().st_mtime_ns
    prepare(5)                                   # the same recipe: reused as it is
    assert (world / "recipe.json").stat().st_mtime_ns == stamp and capsys.readouterr().err == ""
    (world / "recipe.json").unlink()             # an earlier version's world: no stamp
    prepare(5)
    assert "has no recipe stamp (an earlier version built it); rebuilding it" in capsys.readouterr().err
    assert (world / "recipe.json").is_file()


def test_the_synthetic_vqa_world_of_another_recipe_is_rebuilt(tmp_path, capsys):
    def prepare(n_train):
        cfg = load_config("demo_vqa", [f"vqa.synthetic.n_train={n_train}", "vqa.synthetic.n_val=0",
                                       "vqa.synthetic.n_test=0", "vqa.synthetic.image_size=32"])
        files, _, _ = vqa_files(cfg, tmp_path, True, lambda: None)
        return len({r["image"] for r in json.loads(files[0].read_text())})

    assert prepare(2) == 2
    capsys.readouterr()
    assert prepare(3) == 3
    assert "vqa_world was built for vqa.synthetic.n_train=2; rebuilding it for n_train=3" in capsys.readouterr().err


@pytest.mark.parametrize("damage", [_truncate, lambda p: p.write_bytes(b"")])
def test_a_truncated_model_checkpoint_is_one_line_naming_the_file(damage, saved_run, world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(saved_run / "checkpoints" / "step-00000004" / "model", model)
    damage(model / "model.safetensors")
    line = one_error_line(cli(world, tmp_path / "run", f"model.checkpoint={model}"))
    assert line.startswith(f"error: model.checkpoint: {model / 'model.safetensors'}")


@pytest.mark.parametrize("target", ["save_file", "torch.save"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoints(target, world, tmp_path,
                                                                                  monkeypatch):
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) > (1 if target == "save_file" else 3):   # the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    if target == "save_file":
        real = checkpoint_module.save_file
        monkeypatch.setattr(checkpoint_module, "save_file", full)
    else:
        real = torch.save
        monkeypatch.setattr(checkpoint_module.torch, "save", full)
    res = cli(world, tmp_path / "run", "run.save_every=2", "run.max_steps=6")
    line = one_error_line(res)
    assert line.startswith(f"error: cannot save checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-00000004'}: "
                           "No space left on device; nothing of it was kept, the previous checkpoints are intact")
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]     # no hidden temp folder left
    assert read_checkpoint(root / "step-00000002").position.global_step == 2
