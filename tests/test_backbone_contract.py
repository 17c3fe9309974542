"""The backbone contract, on every registered backbone's "tiny" size: the protocol's typed
members agree with what the model computes, its evaluation map fits it, and every backbone
saves and loads the same way, so that a training checkpoint evaluates as the model that wrote it."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from hist_vlm.losses.gradcam import gradcam_maps
from hist_vlm.models import get_backbone, load_backbone
from hist_vlm.batch import TextRows
from hist_vlm.models.base import (CaptioningModel, ContrastiveModel, MatchingModel, MomentumTwin,
                                  VisionLanguageBackbone)
from hist_vlm.models.layout import CONFIG_FILE, WEIGHTS_FILE
from losses_fixtures import BACKBONES, tiny_backbone
from train_helpers import tiny_overrides, write_world

TEXTS = ["a red circle", "a small green square and a star"]


def _maps(model, px, layer):
    ids, mask = model.tokenize(TEXTS)
    rows = TextRows(ids, mask, torch.tensor([0, 1]))
    return gradcam_maps(model, model.encode_image(px), rows, layers=(layer,), recipe="reference")


@pytest.mark.parametrize("name", BACKBONES)
def test_typed_members_agree_with_the_computation(name):
    """The core members on every backbone; each capability it declares, on what it computes."""
    model = tiny_backbone(name).eval()
    assert isinstance(model, VisionLanguageBackbone) and model.name == name
    s, (gh, gw) = model.image_size, model.patch_grid
    assert all(isinstance(v, int) for v in (s, gh, gw, model.max_text_length))
    ids, mask = model.tokenize(TEXTS)
    assert ids.shape[1] <= model.max_text_length
    rows = TextRows(ids, mask, torch.tensor([1, 0]))
    with torch.no_grad():
        img = model.encode_image(torch.randn(2, 3, s, s))
        text = model.encode_text(ids, mask) if isinstance(model, ContrastiveModel) else None
        layers = tuple(range(model.num_cross_attention_layers))
        fused = model.fuse_rows(rows, img, text_embeds=text, capture_layer=layers)
    assert len(fused.cross_attentions) == model.num_cross_attention_layers
    tokens = ids.shape[1] if fused.capture_mask is None else fused.capture_mask.shape[1]  # the text, or its own
    token_rows, patch_columns = fused.capture_block
    for probs in fused.cross_attentions:  # [N, heads, S', K]: the block is [N, heads, S, P]
        assert probs.shape[:2] == (2, model.num_cross_attention_heads)
        assert probs[..., token_rows, patch_columns].shape == (2, model.num_cross_attention_heads, tokens, gh * gw)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))  # softmax rows
    assert model.grounding_score(fused).shape == (2,)
    assert model.default_capture_layers and all(0 <= x < len(layers) for x in model.default_capture_layers)
    if isinstance(model, ContrastiveModel):
        assert isinstance(model.temp, nn.Parameter) and isinstance(model.embed_dim, int)
        with torch.no_grad():
            assert model.image_features(img).shape[-1] == model.embed_dim
            assert model.text_features(text).shape == (2, model.embed_dim)
    if isinstance(model, MatchingModel):
        logits = model.itm_logits(fused)
        assert logits.shape == (2, 2)
        torch.testing.assert_close(model.grounding_score(fused), logits[:, 1])  # GradCAM's score: the match logit
    if isinstance(model, CaptioningModel):
        with torch.no_grad():
            per_row = model.text_log_likelihood(rows, img)
            assert per_row.shape == (2,) and (per_row < 0).all()
            assert torch.isfinite(model.lm_loss(rows, img))
    twin = model.momentum_twin()
    assert twin is None or isinstance(twin, MomentumTwin)


@pytest.mark.parametrize("name", BACKBONES)
def test_the_evaluation_map_is_valid_and_computes(name):
    """Every backbone's evaluation map (declared with `register(eval_map=...)`, else its
    `default_capture_layers` with the head mean) fits the tiny model and gives its maps."""
    from hist_vlm.models.registry import EvalMap, declared_eval_map, eval_map_of

    model = tiny_backbone(name).eval()
    spec = eval_map_of(model)
    assert isinstance(spec, EvalMap) and spec.combine in ("mean", "product")
    spec.check(model.num_cross_attention_layers, model.num_cross_attention_heads)
    if declared_eval_map(model) is None:
        assert spec == EvalMap(model.default_capture_layers)
    ids, mask = model.tokenize(TEXTS)
    rows = TextRows(ids, mask, torch.tensor([0, 1]))
    maps = gradcam_maps(model, model.encode_image(torch.randn(2, 3, model.image_size, model.image_size)), rows,
                        layers=spec.layers, head=spec.head, combine=spec.combine, recipe="reference")
    assert maps.shape == (2, *model.patch_grid) and torch.isfinite(maps).all()


@pytest.mark.parametrize("name", BACKBONES)
def test_save_pretrained_round_trip_through_the_registry(name, tmp_path):
    model = tiny_backbone(name).eval()
    model.save_pretrained(tmp_path / "m")
    assert {CONFIG_FILE, WEIGHTS_FILE} <= {p.name for p in (tmp_path / "m").iterdir()}
    loaded = load_backbone(tmp_path / "m", name)
    assert type(loaded) is type(model) and not loaded.training
    theirs = loaded.state_dict()
    assert theirs.keys() == model.state_dict().keys()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    px = torch.randn(2, 3, model.image_size, model.image_size)
    torch.testing.assert_close(_maps(loaded, px, 0), _maps(model, px, 0), rtol=0, atol=0)


@pytest.mark.parametrize("name", BACKBONES)
def test_one_training_step_then_the_checkpoint_evaluates_as_the_trained_model(name, tmp_path):
    """Train one step, load RUN/checkpoints/step-N as eval does: the same GradCAM maps as the
    model in memory (a loader that hands back a fresh random model fails this)."""
    from hist_vlm.train.config import load_config
    from hist_vlm.train.distributed import setup_environment
    from hist_vlm.train.loop import Trainer

    entry, size = get_backbone(name), tiny_backbone(name).image_size
    phrases, images = write_world(tmp_path, size=size)
    cfg = load_config("demo_tiny", tiny_overrides(phrases, images, tmp_path / "run", "run.max_steps=1",
                                                  "loss.capture_layers=[0]"))
    cfg = replace(cfg, model=replace(cfg.model, name=name, params=dict(entry.sizes["tiny"]),
                                     derive_vocab=cfg.model.derive_vocab and entry.derives_vocab),
                  data=replace(cfg.data, image_size=size))
    trainer = Trainer(cfg, setup_environment("cpu"), resume=False, progress=False)
    result = trainer.run()
    assert result.global_step == 1 and result.checkpoint is not None
    trained = trainer.model.eval()
    loaded = load_backbone(result.checkpoint, name)
    fresh = tiny_backbone(name, seed=cfg.run.seed).eval()
    px = torch.randn(2, 3, size, size)
    torch.testing.assert_close(_maps(loaded, px, 0), _maps(trained, px, 0), rtol=0, atol=0)
    assert not torch.equal(_maps(fresh, px, 0), _maps(trained, px, 0))  # the step changed the model
