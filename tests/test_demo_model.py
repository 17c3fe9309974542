"""The demo's backbone `albef_demo`: ALBEF with a convolutional stem and a from-scratch init,
registered by the demo plugin; and folders an earlier version saved as "albef" still load."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from hist_vlm.demo.model import DemoAlbefConfig, DemoAlbefModel
from hist_vlm.models import backbone_names, load_backbone
from hist_vlm.models.albef import AlbefConfig, AlbefModel

TINY = dict(
    image_size=32, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2,
    text_width=32, text_layers=5, text_heads=2, text_intermediate_size=64, fusion_layer=2,
    embed_dim=16, max_position_embeddings=40,
)
CAPTIONS = ["a dog on the grass", "two red cars", "a man riding a horse near the sea", "a cat"]
LEGACY = Path(__file__).parent / "fixtures" / "legacy_runs"


def demo(**kw) -> DemoAlbefModel:
    torch.manual_seed(0)
    return DemoAlbefModel(DemoAlbefConfig(**{**TINY, **kw}))


def albef() -> AlbefModel:
    torch.manual_seed(0)
    return AlbefModel(AlbefConfig(**TINY))


def test_the_demo_plugin_registers_the_backbone_and_albef_keeps_only_albefs_fields():
    assert "albef_demo" in backbone_names()
    assert not {"patch_embed", "conv_stem_extra", "init", "pos_embed_init"} & set(AlbefConfig().to_dict())
    with pytest.raises(ValueError, match="unknown ALBEF config key 'conv_stem_extra'"):
        AlbefConfig.from_dict({**TINY, "conv_stem_extra": 1})


def test_init_keeps_timms_vision_tower_and_draws_the_rest_at_fan_in():
    """The vision tower's Linears keep timm's ViT init (std 0.02, ALBEF's own draw); every other
    Linear is normal(0, 1/sqrt(fan_in)); at width 32 BERT's std 0.02 leaves every text layer
    near the identity, so different captions share one feature, and fan_in separates them."""
    def text_cosine(m):  # mean over pairs of different captions, on the text [CLS]
        ids, mask = m.tokenize(CAPTIONS)
        with torch.no_grad():
            f = torch.nn.functional.normalize(m.encode_text(ids, mask)[:, 0], dim=1)
        c = f @ f.t()
        return c[~torch.eye(len(CAPTIONS), dtype=torch.bool)].mean().item()

    model, plain = demo().eval(), albef().eval()
    fc = model.visual_encoder.blocks[0].mlp.fc2                              # fan_in 128
    assert fc.weight.std().item() < 0.025
    key = model.text_encoder.bert.encoder.layer[3].crossattention.self.key   # [32, 32 (vision)]
    assert abs(key.weight.std().item() - key.in_features ** -0.5) < 0.03
    for name in ("itm_head", "text_proj", "vision_proj"):
        layer = getattr(model, name)
        assert abs(layer.weight.std().item() - layer.in_features ** -0.5) < 0.1
    assert plain.text_encoder.bert.encoder.layer[3].crossattention.self.key.weight.std().item() < 0.025
    torch.testing.assert_close(model.text_encoder_m.bert.encoder.layer[3].crossattention.self.key.weight, key.weight)
    assert text_cosine(plain) > 0.999 and text_cosine(model) < 0.8


def test_conv_stem_keeps_the_token_grid_and_each_sample_its_own_tokens(tmp_path):
    """Stride-2 convolutions (timm ConvStem + HybridEmbed) give the same patch grid as
    patchify, see across patch borders, and (LayerNorm, no BatchNorm) a sample's tokens do not
    depend on the batch it is in; the model saves and loads like any backbone."""
    conv = demo(conv_stem_extra=0).eval()
    stem = conv.visual_encoder.patch_embed.backbone                  # 3 convs: stride 8 = patch_size
    assert [m.stride for m in stem.modules() if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3
    assert conv.patch_grid == albef().patch_grid == (4, 4)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = conv.encode_image(images)                           # [3, 1 + 16, 32]
        assert tokens.shape == (3, 17, 32)
        conv.train()                                                 # BatchNorm would differ here
        torch.testing.assert_close(conv.encode_image(images[1:2]), conv.encode_image(images)[1:2])
        conv.eval()
        # a pixel changes the token of its own patch and of a neighbour (overlapping fields)
        nudged = images.clone()
        nudged[0, :, 7, 7] += 10.0                                   # last pixel of patch (0, 0)
        moved = (conv.visual_encoder.patch_embed(nudged) - conv.visual_encoder.patch_embed(images))
        assert moved[0].abs().sum(-1).view(4, 4)[0, 1] > 0           # patch (0, 1) sees it too
    conv.save_pretrained(tmp_path / "conv")
    assert json.loads((tmp_path / "conv" / "config.json").read_text())["backbone"] == "albef_demo"
    loaded = load_backbone(tmp_path / "conv").eval()
    assert isinstance(loaded, DemoAlbefModel) and loaded.config.conv_stem_extra == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), tokens)
    with pytest.raises(ValueError, match="power-of-2 patch_size"):
        DemoAlbefConfig(**{**TINY, "image_size": 36, "patch_size": 6})
    with pytest.raises(ValueError, match="conv_stem_extra must be >= 0"):
        DemoAlbefConfig(**TINY, conv_stem_extra=-1)


def test_conv_stem_extra_layers_widen_the_receptive_field_at_the_same_grid():
    """conv_stem_extra=1 puts a stride-1 convolution before each stride-2 one: the grid stays,
    and a pixel two patches away from a token's patch now reaches it (it did not without)."""
    plain, wide = demo(conv_stem_extra=0).eval(), demo(conv_stem_extra=1).eval()
    stem = wide.visual_encoder.patch_embed.backbone
    assert [m.stride for m in stem.modules() if isinstance(m, torch.nn.Conv2d)] == [(1, 1), (2, 2)] * 3
    assert wide.patch_grid == plain.patch_grid == (4, 4)
    images = torch.randn(1, 3, 32, 32)
    nudged = images.clone()
    nudged[0, :, 8, 8] += 10.0                                       # first pixel of patch (1, 1)
    for model, reaches in ((plain, False), (wide, True)):
        with torch.no_grad():
            embed = model.visual_encoder.patch_embed
            moved = (embed(nudged) - embed(images))[0].abs().sum(-1).view(4, 4)
        assert moved[1, 1] > 0
        assert bool(moved[0, 0] > 0) is reaches                      # patch (0, 0) ends at pixel 7


@pytest.mark.parametrize("name, kind", [("demo_conv_stem", DemoAlbefModel), ("albef_linear", AlbefModel)])
def test_checkpoints_an_earlier_version_wrote_load_exactly(tmp_path, name, kind):
    """Run folders written before the demo had its own backbone (config.json: backbone "albef"
    with patch_embed, init, pos_embed_init): their checkpoints load, as the right model, and
    give the outputs the writing version recorded (tests/fixtures/legacy_runs/README.md)."""
    expected = json.loads((LEGACY / "expected.json").read_text())[name]
    run = shutil.copytree(LEGACY / name, tmp_path / name)
    model = load_backbone(run / Path(expected["checkpoint"]).relative_to(name)).eval()
    assert type(model) is kind
    assert load_backbone(run / Path(expected["checkpoint"]).relative_to(name), "albef") is not None
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, model.image_size, model.image_size, generator=g)
    ids, mask = model.tokenize(["a red circle", "two blue squares"])
    with torch.no_grad():
        img = model.encode_image(pixels)
        itm = model.itm_logits(model.fuse(model.encode_text(ids, mask), mask, img, None))
    assert img.double().sum().item() == pytest.approx(expected["image_sum"], abs=1e-6)
    assert img.double().abs().sum().item() == pytest.approx(expected["image_abs_sum"], rel=1e-9)
    torch.testing.assert_close(itm.double(), torch.tensor(expected["itm"], dtype=torch.float64))


def test_a_retired_option_at_a_non_albef_value_is_a_one_line_error(tmp_path):
    """A folder saved as plain "albef" whose config holds the conv stem but that the demo's
    loader cannot take (no weights file) is refused by name, never built as patchify."""
    albef().save_pretrained(tmp_path / "m")
    payload = json.loads((tmp_path / "m" / "config.json").read_text())
    payload["config"]["patch_embed"] = "resnet"
    (tmp_path / "m" / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="saved with patch_embed='resnet', which ALBEF does not have"):
        load_backbone(tmp_path / "m")


def test_the_run_configs_an_earlier_version_wrote_still_load(tmp_path):
    """RUN/config.yaml of those runs carries `loss.add_detach_parts: false` (an option since
    removed, at its neutral value); it loads, and the removed option at another value is one
    line naming it."""
    from hist_vlm.train.config import ConfigError, load_config

    for name in ("demo_conv_stem", "albef_linear"):
        cfg = load_config(LEGACY / name / "config.yaml")
        assert cfg.run.max_steps == 1 and cfg.model.name == "albef"   # as those runs were written
        assert not hasattr(cfg.loss, "add_detach_parts")
    with pytest.raises(ConfigError, match=r"loss.add_detach_parts=True was removed"):
        load_config("demo_tiny", ["loss.add_detach_parts=true"])
