import dataclasses

import pytest

from hist_vlm.train.config import ConfigError, TrainConfig, load_config
from train_helpers import CONFIGS, DEMO_CONFIGS


@pytest.mark.parametrize("name", ["demo_tiny", "albef_coco", "albef_vg", "blip_coco"])
def test_presets_load(name):
    cfg = load_config((DEMO_CONFIGS if name.startswith("demo_") else CONFIGS) / f"{name}.yaml")
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.weight_decay == 0.02 and cfg.loss.capture_head is None


def test_presets_hold_the_paper_settings():
    albef = load_config(CONFIGS / "albef_coco.yaml")
    assert (albef.model.name, albef.data.image_size, albef.optim.lr) == ("albef", 256, 2e-5)
    assert albef.loss.capture_layers == (2,) and albef.data.batch_size == 56   # 3rd cross-attention layer
    blip = load_config(CONFIGS / "blip_coco.yaml")
    assert (blip.model.name, blip.data.image_size, blip.optim.lr) == ("blip", 224, 1e-5)
    assert blip.loss.capture_layers == (8,)                                    # 9th cross-attention layer
    vg = load_config(CONFIGS / "albef_vg.yaml")
    # the same loss but the fade, which COCO counts in its captions' unit (docs/training.md)
    assert vg.data.phrases != albef.data.phrases and vg.loss == dataclasses.replace(albef.loss, paper_ramp_epochs=2.0)
    demo = load_config(DEMO_CONFIGS / "demo_tiny.yaml")
    assert demo.data.synthetic.enabled and demo.run.device == "auto"


def test_overrides_are_typed_by_the_field(tmp_path):
    cfg = load_config(CONFIGS / "albef_coco.yaml", [
        "optim.lr=1e-4",                 # YAML 1.1 reads this as a string: the float field converts it
        "data.batch_size=8",
        "optim.max_grad_norm=1",
        "data.hflip=false",
        "run.max_steps=null",
        "data.crop_scale=[0.2,1.0]",
        "loss.capture_layers=[1,2]",
        "loss.schedule=constant",
        "model.params.fusion_layer=3",   # free-form backbone params
        "run.dir=" + str(tmp_path / "x"),
    ])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 8 and cfg.optim.max_grad_norm == 1.0
    assert cfg.data.hflip is False and cfg.run.max_steps is None
    assert cfg.data.crop_scale == (0.2, 1.0) and cfg.loss.capture_layers == (1, 2)
    assert cfg.loss.schedule == "constant" and cfg.model.params == {"fusion_layer": 3}
    assert cfg.run.dir == str(tmp_path / "x")
    # the config round-trips through its dict form
    again = tmp_path / "again.yaml"
    import yaml

    again.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(again) == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("data.batch_size=eight", "data.batch_size must be an integer"),
    ("data.batch_size=2.5", "data.batch_size must be an integer"),
    ("data.hflip=maybe", "data.hflip must be true or false"),
    ("optim.lr=fast", "optim.lr must be a number"),
    ("data.crop_scale=[0.5]", "data.crop_scale must be a list of 2 values"),
    ("loss.schedule=sometimes", "unknown HIST schedule"),
    ("optim.lr", "not of the form key=value"),
    ("data.batch_size.x=1", "'batch_size' is not a section"),
    ("data.batch_size=0", "data: batch_size must be at least 1"),
    ("run.keep_checkpoints=0", "run: keep_checkpoints must be at least 1"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "albef_coco.yaml", [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    bad.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="optim must be a mapping"):
        load_config(bad)


def test_yaml_words_like_off_stay_strings(tmp_path):
    """YAML 1.1 reads off/on/yes/no as booleans; `loss.schedule=off` must stay the string."""
    from hist_vlm.train.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  schedule: off\nrun:\n  tensorboard: true\n")
    cfg = load_config(path, ["data.hflip=false"])
    assert cfg.loss.schedule == "off" and cfg.run.tensorboard is True and cfg.data.hflip is False
    assert load_config(path, ["loss.schedule=constant"]).loss.schedule == "constant"
