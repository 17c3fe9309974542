"""`model.checkpoint=RUN/checkpoints/step-N`: a new run starts from a training checkpoint's
weights (the loader `hist-vlm eval` uses); a folder no loader reads is a one-line error."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import hist_vlm.train.tasks.hist as hist_task
from hist_vlm.cli import app
from hist_vlm.models import load_backbone
from hist_vlm.models.registry import expected_formats
from hist_vlm.train.config import load_config
from hist_vlm.train.loop import train
from train_helpers import DEMO_CONFIGS, tiny_overrides, write_world

DEMO = DEMO_CONFIGS / "demo_tiny.yaml"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    world = write_world(root / "world", n_images=8, size=32)
    result = train(load_config(DEMO, tiny_overrides(*world, root / "run", "run.max_steps=3")), progress=False)
    return world, result.checkpoint


def _capture_initial_weights(monkeypatch) -> dict:
    """The state of the model the loop builds, copied before its first step."""
    seen = {}
    build = hist_task.build_model

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(hist_task, "build_model", spy)
    return seen


def test_a_new_run_starts_from_the_checkpoint_weights(first_run, tmp_path, monkeypatch):
    world, ckpt = first_run
    saved = load_file(str(ckpt / "model" / "model.safetensors"))
    initial = _capture_initial_weights(monkeypatch)
    result = train(load_config(DEMO, tiny_overrides(*world, tmp_path / "second", "run.max_steps=1",
                                                    f"model.checkpoint={ckpt}")), progress=False)
    assert result.global_step == 1 and result.start_step == 0    # a new run, not a resume
    assert set(saved) <= set(initial)
    assert all(torch.equal(initial[k], v) for k, v in saved.items())
    # and not what the same seed builds from scratch
    initial.clear()
    train(load_config(DEMO, tiny_overrides(*world, tmp_path / "scratch", "run.max_steps=1")), progress=False)
    assert not all(torch.equal(initial[k], v) for k, v in saved.items())


def test_the_cli_trains_from_a_step_folder(first_run, tmp_path):
    world, ckpt = first_run
    res = CliRunner().invoke(app, ["train", "demo_tiny", *tiny_overrides(*world, tmp_path / "run", "run.max_steps=1",
                                                                         f"model.checkpoint={ckpt}")])
    assert res.exit_code == 0, res.output
    assert "trained 1 steps" in res.output


def _empty(p):
    return p


def _model_without_config(p):
    (p / "model").mkdir()
    return p


def _garbage_file(p):
    (p / "weights.pth").write_bytes(b"hi\n")
    return p / "weights.pth"


def _unsafe_pickle(p):
    import argparse

    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}, p / "weights.pth")
    return p / "weights.pth"


def _html_error_page(p):
    (p / "ALBEF.pth").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    return p / "ALBEF.pth"


def _truncated_download(p):
    torch.save({"model": {"w": torch.zeros(64)}}, p / "full.pth")
    (p / "ALBEF.pth").write_bytes((p / "full.pth").read_bytes()[:200])
    return p / "ALBEF.pth"


def _foreign_config(p):
    (p / "config.json").write_text('{"model_type": "vit"}')
    return p


def _config_without_weights(p):
    (p / "config.json").write_text('{"backbone": "albef", "config": {}}')
    return p


@pytest.mark.parametrize("make, message", [
    (_empty, expected_formats()),
    (_model_without_config, expected_formats()),
    (_garbage_file, "not a torch checkpoint"),
    (_unsafe_pickle, "cannot be read safely: it holds argparse.Namespace objects"),
    (_html_error_page, "is not a torch checkpoint (it starts with b'<!DO': a truncated download or a saved error page?)"),
    (_truncated_download, "is a damaged torch checkpoint"),
    (_foreign_config, "no backbone can read this"),
    (_config_without_weights, "model.safetensors"),
])
def test_unreadable_checkpoints_are_one_line_errors(make, message, first_run, tmp_path):
    world, _ = first_run
    folder = tmp_path / "ckpt"
    folder.mkdir()
    target = make(folder)
    res = CliRunner().invoke(app, ["train", "demo_tiny", *tiny_overrides(*world, tmp_path / "run", f"model.checkpoint={target}")])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert res.output.startswith("error: model.checkpoint") and message in res.output
    assert "weights_only=False" not in res.output  # never pass on torch's unsafe advice
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_wrong_backbone_name_is_an_error(first_run, tmp_path):
    world, ckpt = first_run
    res = CliRunner().invoke(app, ["train", "demo_tiny", *tiny_overrides(*world, tmp_path / "run", f"model.checkpoint={ckpt}",
                                                                         "model.name=blip")])
    assert res.exit_code == 2 and "holds a albef model, not blip" in res.output


def test_a_blip_training_checkpoint_loads_through_the_shared_loader(tmp_path):
    """A training checkpoint's model/ is the backbone's save_pretrained folder, which training
    and eval both read (it once came back as a random BLIP-base: the wrapper's state was
    handed to transformers, which ignored it)."""
    from hist_vlm.models import build_backbone

    torch.manual_seed(0)
    blip = build_backbone("blip", {"size": "tiny"})
    blip.save_pretrained(tmp_path / "step-00000007" / "model")
    loaded = load_backbone(tmp_path / "step-00000007")
    assert type(loaded).__name__ == "BlipBackbone" and loaded.image_size == 32
    theirs = loaded.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in blip.state_dict().items())


def test_a_typo_in_model_params_is_a_one_line_config_error(first_run, tmp_path):
    world, _ = first_run
    res = CliRunner().invoke(app, ["train", "demo_tiny", *tiny_overrides(*world, tmp_path / "run", "model.params.fusion_layr=1")])
    assert res.exit_code == 2 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert res.output.startswith("error: model.params: unknown ALBEF config key 'fusion_layr'")
