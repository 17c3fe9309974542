"""Presets ship inside the package and are found by name from any directory."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.cli.demo import DEFAULT_CONFIG
from hist_vlm.train.config import ConfigError, load_config, preset_names, resolve_config
from train_helpers import CONFIGS, DEMO_CONFIGS, tiny_overrides, write_world

LIBRARY = Path(__import__("hist_vlm").__file__).parent / "configs"
DEMO = Path(__import__("hist_vlm").__file__).parent / "demo" / "configs"   # the demo plugin's


def packaged(name: str) -> Path:
    return LIBRARY / f"{name}.yaml" if name[:5] != "demo_" else DEMO / f"{name}.yaml"


def test_presets_are_the_packaged_yaml_files():
    names = preset_names()
    assert names == sorted(p.stem for folder in (LIBRARY, DEMO) for p in folder.glob("*.yaml"))
    assert all(p.stem.startswith("demo_") for p in DEMO.glob("*.yaml"))
    assert {"demo_tiny", "albef_coco", "albef_vg", "blip_coco"} <= set(names)


def test_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in preset_names():
        assert resolve_config(name) == packaged(name)
        assert resolve_config(f"{name}.yaml") == packaged(name)
        folder = DEMO_CONFIGS if name.startswith("demo_") else CONFIGS
        assert load_config(name).to_dict() == load_config(folder / f"{name}.yaml").to_dict()
    assert load_config("albef_coco", ["optim.lr=1e-5"]).optim.lr == 1e-5


def test_a_path_still_works_and_an_existing_file_wins(tmp_path, monkeypatch):
    own = tmp_path / "demo_tiny.yaml"
    own.write_text("run:\n  dir: mine\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("demo_tiny.yaml").run.dir == "mine"          # the file in the cwd
    assert load_config(own).run.dir == "mine"
    assert load_config("demo_tiny").run.dir != "mine"                # a bare name: the preset


@pytest.mark.parametrize("arg", ["demo_tinny", "nope.yaml", "configs/demo_tiny.yaml", "sub/x"])
def test_unknown_names_are_one_line_errors_listing_the_presets(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(arg)
    message = str(err.value)
    assert "\n" not in message and arg in message
    assert "presets: " + ", ".join(preset_names()) in message


def test_train_preset_by_name_from_another_directory(tmp_path, monkeypatch):
    phrases, images = write_world(tmp_path / "world", n_images=8, size=32)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", "demo_tiny", *tiny_overrides(phrases, images, Path("run"), "run.max_steps=2")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "state.json").is_file()
    res = CliRunner().invoke(app, ["train", "demo_tinny"])
    assert res.exit_code == 2 and "presets: " in res.output and "Traceback" not in res.output


def test_demo_and_eval_resolve_presets_without_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(DEFAULT_CONFIG).parent == DEMO
    res = CliRunner().invoke(app, ["demo", "--config", "nowhere", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "presets: " in res.output and not (tmp_path / "out").exists()
    # the config is found by name; what fails is the (missing) checkpoint
    res = CliRunner().invoke(app, ["eval", "pointing", "demo_tiny", "--checkpoint", "gone", "--data", "synthetic"])
    assert res.exit_code == 2 and "gone: checkpoint not found" in res.output


@pytest.mark.parametrize("name", ["albef_coco", "albef_vg", "blip_coco", "albef_vqa", "albef_retrieval_coco",
                                  "albef_retrieval_flickr"])
def test_fine_tuning_presets_without_a_checkpoint_are_an_error_not_a_random_model(name):
    from hist_vlm.train.model import build_model

    cfg = load_config(name)
    assert cfg.model.checkpoint is None and cfg.model.require_checkpoint
    with pytest.raises(ConfigError, match="model.checkpoint is required"):
        build_model(cfg.model, cfg.data.image_size)


def test_the_cli_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", "albef_retrieval_coco", "data.synthetic.enabled=true",
                                   "data.synthetic.n_train=4", "data.synthetic.n_val=0", "data.synthetic.n_test=0",
                                   f"run.dir={tmp_path / 'run'}"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [res.output.strip()] and "model.checkpoint is required" in res.output
