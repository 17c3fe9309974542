"""Each backbone's evaluation map (`register(eval_map=...)`): what it declares, how it is fitted
to a model of another depth, and how the eval commands choose a map from it, the training config
and the --layer/--head/--combine options (tests/test_eval_cli.py runs the commands)."""
from types import SimpleNamespace

import pytest
import torch

from hist_vlm.cli.common import eval_map_choice
from hist_vlm.models import build_backbone, build_sized, register
from hist_vlm.models.registry import EvalMap, declared_eval_map, eval_map_of


def _blip(layers: int, heads: int):
    """A small random BLIP whose text stack has `layers` layers of `heads` heads."""
    from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

    text = BlipTextConfig(hidden_size=2 * heads, intermediate_size=8, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=64)
    vision = BlipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    hf = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_text_hidden_size=8)
    torch.manual_seed(0)
    return build_backbone("blip", {"transformers": hf.to_dict()})


def test_eval_map_fields_are_checked_and_described():
    assert EvalMap((7, 8), 9).describe() == "layers 7,8 head 9 combine mean"
    assert EvalMap([2]).describe() == "layers 2 head mean combine mean" and EvalMap([2]).layers == (2,)
    for bad, message in (((), "one or more layers"), ((-1,), "0-based"), ((1, 1), "repeat")):
        with pytest.raises(ValueError, match=message):
            EvalMap(bad)
    with pytest.raises(ValueError, match="0-based"):
        EvalMap((0,), head=-1)
    with pytest.raises(ValueError, match="unknown map combination 'max'"):
        EvalMap((0,), combine="max")
    with pytest.raises(ValueError, match="layer 3 out of range: the model has 3"):
        EvalMap((0, 3)).check(3, 4)
    with pytest.raises(ValueError, match="head 4 out of range: the cross-attention has 4 heads"):
        EvalMap((0,), 4).check(3, 4)


@pytest.mark.parametrize("n_layers, n_heads, layers, head", [
    (12, 12, (7, 8), 9),   # BLIP's own depth: the paper's map unchanged
    (9, 12, (7, 8), 9),
    (8, 12, (7,), 9),      # layer 8 becomes the last, 7: one layer left
    (3, 4, (2,), None),    # the tiny BLIP: the last layer, and head 9 has no counterpart: the mean
    (1, 1, (0,), None),
])
def test_a_model_with_fewer_layers_or_heads_gets_a_valid_map(n_layers, n_heads, layers, head):
    fitted = EvalMap((7, 8), 9, "product").fitted(n_layers, n_heads)
    assert (fitted.layers, fitted.head, fitted.combine) == (layers, head, "product")
    fitted.check(n_layers, n_heads)


def test_register_takes_an_eval_map_or_a_function():
    with pytest.raises(TypeError, match="eval_map must be an EvalMap"):
        register("not_registered", sizes={"tiny": {}}, eval_map=(7, 8))


def test_albef_declares_the_third_cross_attention_layer_with_the_head_mean():
    tiny = build_sized("albef", "tiny")  # 2 cross-attention layers: the last one
    assert tiny.num_cross_attention_layers == 2
    assert declared_eval_map(tiny) == EvalMap((1,), None, "mean") == eval_map_of(tiny)
    six = build_sized("albef", "tiny", text_layers=8, fusion_layer=2)  # ALBEF-base's 6 cross-attention layers
    assert declared_eval_map(six) == EvalMap((2,), None, "mean")
    assert declared_eval_map(six).layers == six.default_capture_layers  # the training layer (BERT block 8)
    one = build_sized("albef", "tiny", text_layers=3, fusion_layer=2)
    assert declared_eval_map(one) == EvalMap((0,), None, "mean")


def test_blip_declares_the_papers_mean_of_l8h10_and_l9h10():
    from hist_vlm.models.blip import PAPER_EVAL_HEAD, PAPER_EVAL_LAYERS

    assert (PAPER_EVAL_LAYERS, PAPER_EVAL_HEAD) == ((7, 8), 9)  # 1-based L8H10, L9H10 (Table 7)
    assert declared_eval_map(_blip(12, 12)) == EvalMap((7, 8), 9, "mean")
    tiny = build_sized("blip", "tiny")  # 3 layers, 4 heads: fitted, still valid
    assert declared_eval_map(tiny) == EvalMap((2,), None, "mean")
    assert eval_map_of(tiny).layers == tiny.default_capture_layers


def test_blip2_declares_its_training_layer_with_the_head_mean():
    tiny = build_sized("blip2", "tiny")  # 3 cross-attention layers: the middle one
    assert declared_eval_map(tiny) == EvalMap((1,), None, "mean") == EvalMap(tiny.default_capture_layers)


def test_every_backbone_gets_a_valid_map():
    from hist_vlm.models import backbone_names

    for name in backbone_names():
        model = build_sized(name, "tiny")
        spec = eval_map_of(model)
        spec.check(model.num_cross_attention_layers, model.num_cross_attention_heads)
        if declared_eval_map(model) is None:  # e.g. the demo's albef_demo
            assert spec == EvalMap(model.default_capture_layers)


def _cfg(layers, head=None, combine="mean"):
    return SimpleNamespace(loss=SimpleNamespace(capture_layers=layers, capture_head=head, capture_combine=combine))


def test_the_declared_map_is_the_default_and_each_option_overrides_its_field():
    model = _blip(12, 12)
    cfg = _cfg([8], 3, "product")  # the training config's map is not the evaluation map
    spec, origin = eval_map_choice(model, cfg, [], None, None)
    assert (spec, origin) == (EvalMap((7, 8), 9, "mean"), "blip's declared evaluation map")
    spec, origin = eval_map_choice(model, None, [8], None, None)
    assert (spec, origin) == (EvalMap((8,), 9, "mean"), "--layer; the rest: blip's declared evaluation map")
    spec, origin = eval_map_choice(model, cfg, [], None, "product")
    assert (spec, origin) == (EvalMap((7, 8), 9, "product"), "--combine; the rest: blip's declared evaluation map")
    spec, _ = eval_map_choice(model, cfg, [], 0, None)  # head 0 is a head, not "no option"
    assert spec == EvalMap((7, 8), 0, "mean")
    spec, origin = eval_map_choice(model, cfg, [1, 2], 4, "product")
    assert (spec, origin) == (EvalMap((1, 2), 4, "product"), "--layer, --head, --combine")
    for layers, head, combine, message in (([12], None, None, "layer 12 out of range"),
                                           ([], 12, None, "head 12 out of range"),
                                           ([3, 3], None, None, "repeat"),
                                           ([], None, "max", "unknown map combination")):
        with pytest.raises(ValueError, match=message):
            eval_map_choice(model, cfg, layers, head, combine)


def test_a_backbone_without_a_declared_map_keeps_the_training_config_then_its_default():
    model = build_sized("albef_demo", "tiny")
    assert declared_eval_map(model) is None
    spec, origin = eval_map_choice(model, _cfg([0], 1), [], None, None)
    assert spec == EvalMap((0,), 1, "mean") and origin.startswith("the training config's loss.capture_*")
    spec, _ = eval_map_choice(model, _cfg(None), [], None, None)
    assert spec == EvalMap(model.default_capture_layers)
    spec, origin = eval_map_choice(model, None, [], None, None)
    assert spec == EvalMap(model.default_capture_layers) and "albef_demo's default_capture_layers" in origin
