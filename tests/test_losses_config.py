"""The loss settings: SelfEQ's min-max, the range of every numeric `loss.*` key, the
`composition` alias of the addition term, and what a backbone must have for the settings it
is given (checked when HistLoss is built, before any step)."""
import math
from pathlib import Path

import pytest
import torch

from hist_vlm.losses.gradcam import minmax_maps
from hist_vlm.losses.hist import HistLoss, HistLossConfig
from hist_vlm.losses.terms import addition_loss
from hist_vlm.models import build_backbone
from hist_vlm.train.config import ConfigError, load_config
from losses_fixtures import hist_batch, tiny_albef, tiny_blip

FIXTURES = Path(__file__).parent / "fixtures" / "albef"


# ---------------------------------------------------------------------------- item: minmax = SelfEQ's


def test_minmax_is_selfeqs_formula_by_hand_numbers():
    maps = torch.tensor([[[0.2, 0.6], [1.0, 0.2]],
                         [[3.0, 3.0], [3.0, 3.0]]], dtype=torch.float64)
    # map 0: minus its minimum 0.2 -> [0, 0.4, 0.8, 0]; divided by 0.8 + 1e-7
    want0 = torch.tensor([[0.0, 0.4 / 0.8000001], [0.8 / 0.8000001, 0.0]], dtype=torch.float64)
    out = minmax_maps(maps)
    torch.testing.assert_close(out[0], want0, rtol=0, atol=1e-15)
    assert out[0].max().item() == pytest.approx(0.999999875, abs=1e-12)  # not 1: r / (r + 1e-7)
    assert (out[1] == 0).all()  # a constant map becomes 0


def test_minmax_leaves_a_near_constant_map_near_zero():
    # tiny BLIP's raw maps are ~1e-11: the range is noise, and SelfEQ's min-max keeps it small
    maps = torch.tensor([[[1e-11, 2e-11], [1.5e-11, 1e-11]]], dtype=torch.float64)
    out = minmax_maps(maps)
    want = torch.tensor([[[0.0, 1e-11 / (1e-11 + 1e-7)], [0.5e-11 / (1e-11 + 1e-7), 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=0)
    assert 9.99e-5 < out.max() < 1.0e-4  # ~1e-4, not spread over [0, 1]
    # the addition loss on such maps is ~1e-4 per cell, not O(1) noise
    assert addition_loss(maps, maps, maps, normalize="minmax") < 1e-3


def test_minmax_matches_selfeq_on_the_albef_reference_maps():
    """The ALBEF fixture's GradCAM maps through SelfEQ's code as written (in place, on a copy)."""
    ref = torch.load(FIXTURES / "albef_tiny_reference_outputs.pt", weights_only=True)
    for key in ("gradcam", "gradcam48"):
        g = ref[key].clone().view(ref[key].shape[0], -1)
        g -= g.min(dim=1, keepdim=True)[0]
        g /= (g.max(dim=1, keepdim=True)[0] + 1e-7)
        torch.testing.assert_close(minmax_maps(ref[key]), g.view_as(ref[key]), rtol=0, atol=0)


def test_minmax_is_differentiable():
    maps = torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(minmax_maps, (maps,))


# ---------------------------------------------------------------------------- item: numeric ranges


@pytest.mark.parametrize("key, bad", [
    ("paper_ramp_epochs", 0.0), ("paper_ramp_epochs", -1.0), ("paper_ramp_epochs", math.nan),
    ("paper_ramp_epochs", math.inf),
    ("lambda_phrase", -0.5), ("lambda_phrase", math.nan), ("lambda_subject", -1.0), ("lambda_subject", math.inf),
    ("lambda_add", -1.0), ("lambda_add", math.nan), ("lambda_composition", -1.0), ("lambda_composition", math.inf),
    ("mlm_weight", -1.0), ("mlm_weight", math.nan), ("mlm_weight", math.inf),
    ("mlm_probability", 1.5), ("mlm_probability", math.nan), ("mlm_subject_probability", -0.1),
    ("momentum", 1.01), ("momentum", -0.1), ("momentum", math.nan), ("alpha", 2.0), ("alpha", math.nan),
    ("queue_size", -1), ("itm_group_size", 0), ("capture_head", -1),
    ("capture_layers", ()), ("capture_layers", (0, -1)),
])
def test_out_of_range_settings_are_value_errors_naming_the_key(key, bad):
    with pytest.raises(ValueError, match=key):
        HistLossConfig(**{key: bad})


@pytest.mark.parametrize("key, edge", [
    ("paper_ramp_epochs", 1e-3), ("lambda_phrase", 0.0), ("lambda_add", 0.0), ("mlm_weight", 0.0),
    ("mlm_probability", 0.0), ("mlm_probability", 1.0), ("momentum", 0.0), ("momentum", 1.0), ("alpha", 0.0),
    ("queue_size", 0), ("itm_group_size", 1), ("capture_head", 0), ("capture_layers", (0,)),
])
def test_settings_at_the_edge_of_their_range_are_accepted(key, edge):
    assert getattr(HistLossConfig(**{key: edge}), key) == edge


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf", ".inf"])
def test_paper_ramp_epochs_override_is_a_one_line_config_error(value):
    with pytest.raises(ConfigError, match="paper_ramp_epochs") as info:
        load_config("albef_coco", [f"loss.paper_ramp_epochs={value}"])
    assert "\n" not in str(info.value) and str(info.value).startswith("loss:")


def test_paper_ramp_epochs_sets_the_fade_out():
    cfg = load_config("albef_coco", ["loss.paper_ramp_epochs=4"])
    assert cfg.loss.paper_ramp_epochs == 4.0


# ---------------------------------------------------------------------------- item: "composition"


def test_lambda_composition_is_an_alias_of_lambda_add():
    assert HistLossConfig().lambda_add == 1.0
    assert HistLossConfig(lambda_add=0.3).lambda_add == 0.3
    cfg = HistLossConfig(lambda_composition=0.25)
    assert (cfg.lambda_add, cfg.lambda_composition) == (0.25, None)  # resolved into lambda_add
    assert HistLossConfig(lambda_add=0.5, lambda_composition=0.5).lambda_add == 0.5
    with pytest.raises(ValueError, match="lambda_composition is an alias of lambda_add"):
        HistLossConfig(lambda_add=1.0, lambda_composition=0.5)  # explicit 1.0 counts as set
    # from a config: the alias, its conflict, and a round trip through the saved config
    loaded = load_config("albef_coco", ["loss.lambda_composition=0.25"])
    assert loaded.loss.lambda_add == 0.25
    with pytest.raises(ConfigError, match="lambda_composition"):
        load_config("albef_coco", ["loss.lambda_composition=0.25", "loss.lambda_add=0.5"])
    saved = loaded.to_dict()["loss"]
    assert (saved["lambda_add"], saved["lambda_composition"]) == (0.25, None)


def test_lambda_composition_weighs_the_addition_term_logged_as_add():
    model = tiny_albef(momentum=False)
    batch = hist_batch(model)
    base = dict(schedule="constant", capture_layers=(0,), queue_size=0)
    outs = {}
    for key, cfg in (("add", HistLossConfig(**base, lambda_add=0.3)),
                     ("composition", HistLossConfig(**base, lambda_composition=0.3))):
        torch.manual_seed(0)
        outs[key] = HistLoss(cfg, model)(model, batch, 0.5)
    assert outs["add"]["add"] > 0 and "composition" not in outs["composition"]
    torch.testing.assert_close(outs["composition"]["loss"], outs["add"]["loss"], rtol=0, atol=0)
    torch.testing.assert_close(outs["composition"]["add"], outs["add"]["add"], rtol=0, atol=0)


# ---------------------------------------------------------------------------- item: what the backbone has


def test_capture_layers_beyond_the_backbone_fail_when_the_loss_is_built():
    model = tiny_blip()  # 3 cross-attention layers; blip_coco's layer 8 is BLIP-base's
    with pytest.raises(ValueError, match=r"loss\.capture_layers: layer 8 does not exist.* 3 cross-attention layers"):
        HistLoss(HistLossConfig(capture_layers=(8,)), model)
    with pytest.raises(ValueError, match=r"loss\.capture_head: head 4 does not exist"):
        HistLoss(HistLossConfig(capture_layers=(2,), capture_head=4), model)
    HistLoss(HistLossConfig(capture_layers=(2,), capture_head=3), model)


def test_a_language_term_the_backbone_cannot_compute_is_an_error_never_a_silent_zero():
    torch.manual_seed(0)
    model = build_backbone("blip", {"size": "tiny"})  # without its decoder: no language head
    with pytest.raises(ValueError, match=r"loss\.mlm_weight=1\.0: the blip backbone cannot compute the language"):
        HistLoss(HistLossConfig(mlm_weight=1.0), model)
    with pytest.raises(ValueError, match=r"loss\.mlm_subject_probability"):
        HistLoss(HistLossConfig(mlm_weight=0.0, mlm_subject_probability=0.5), model)
    batch = hist_batch(model)
    cfg = dict(schedule="constant", capture_layers=(1,))
    out = HistLoss(HistLossConfig(**cfg, mlm_weight=0.0), model)(model, batch, 0.5)
    out["loss"].backward()  # trains: ITC + ITM + the HIST terms, no language term
    assert torch.isfinite(out["loss"]) and out["add"] > 0
    assert {"itc", "itm", "phrase_itc", "subject_itm"} <= set(out) and not {"mlm", "phrase_mlm", "rank"} & set(out)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # unset (the default): the language term where the backbone has one, none where it has not
    default = HistLoss(HistLossConfig(**cfg), model)(model, batch, 0.5)
    torch.testing.assert_close(default["loss"], out["loss"], rtol=0, atol=0)
    captioner = tiny_blip()
    assert HistLoss(HistLossConfig(**cfg), captioner)(captioner, hist_batch(captioner), 0.5)["mlm"] > 0


@pytest.mark.parametrize("objectives, message", [
    (("itc", "itm", "rank"), r"^loss\.objectives: 'rank' needs a CaptioningModel, which the blip backbone is not; "
                             r"it computes: itc, itm$"),
    (("mlm",), r"^loss\.objectives: 'mlm' needs a language head"),
])
def test_an_objective_the_backbone_cannot_compute_is_a_one_line_error(objectives, message):
    torch.manual_seed(0)
    model = build_backbone("blip", {"size": "tiny"})  # ITC + ITM only
    with pytest.raises(ValueError, match=message):
        HistLoss(HistLossConfig(objectives=objectives), model)


def test_objectives_choose_what_each_level_sums():
    """The default is every objective the backbone has (rank only without an ITM head); a
    chosen subset computes and logs only those, and `mlm_weight` cannot contradict it."""
    from hist_vlm.losses.hist import check_backbone

    captioner = tiny_blip()
    assert check_backbone(HistLossConfig(), captioner) == (("itc", "itm", "mlm"), 1.0)
    assert check_backbone(HistLossConfig(objectives=("rank", "itc")), captioner) == (("itc", "rank"), 0.0)
    with pytest.raises(ValueError, match=r"^loss\.mlm_weight=1\.0 but loss\.objectives \['itc'\] has no 'mlm'"):
        check_backbone(HistLossConfig(objectives=("itc",), mlm_weight=1.0), captioner)
    with pytest.raises(ValueError, match="objectives must be distinct names"):
        HistLossConfig(objectives=("itc", "itx"))
    with pytest.raises(ValueError, match=r"^loss\.objectives \['mlm'\] with loss\.mlm_weight=0 leave nothing"):
        check_backbone(HistLossConfig(objectives=("mlm",), mlm_weight=0.0), captioner)
    lm_only = HistLoss(HistLossConfig(schedule="constant", capture_layers=(1,), objectives=("mlm",)), captioner)
    out = lm_only(captioner, hist_batch(captioner), 0.5)  # the subject level has no LM part: it computes nothing
    assert {"mlm", "phrase_mlm", "add"} <= set(out) and not any(k.startswith("subject_") for k in out)
    batch = hist_batch(captioner)
    out = HistLoss(HistLossConfig(schedule="constant", capture_layers=(1,), objectives=("itc", "rank")),
                   captioner)(captioner, batch, 0.5)
    assert {"itc", "rank", "phrase_itc", "phrase_rank", "subject_itc", "subject_rank", "add"} <= set(out)
    assert not {"itm", "mlm", "phrase_itm", "phrase_mlm", "subject_itm"} & set(out)
    # rank = mean softplus(s(T | other image) - s(T | own image)), written out for the captions:
    # the first shared-seed draws (nothing else draws here) pick each caption's other image
    from hist_vlm.batch import TextRows
    from hist_vlm.losses.itm import sample_rows

    caps = batch.captions
    with torch.no_grad():
        image_embeds = captioner.encode_image(batch.pixel_values)
        u = torch.rand(len(caps), generator=torch.Generator().manual_seed(0))
        other = sample_rows(1.0 - torch.eye(4), u)
        assert not torch.equal(other, caps.image_index)
        own = captioner.text_log_likelihood(caps, image_embeds)
        neg = captioner.text_log_likelihood(TextRows(caps.input_ids, caps.attention_mask, other), image_embeds)
    torch.testing.assert_close(out["rank"].detach(), torch.nn.functional.softplus(neg - own).mean())


def _trainer_overrides(tmp_path, *extra):
    from train_helpers import tiny_overrides, write_world

    phrases, images = write_world(tmp_path, size=32)
    return tiny_overrides(phrases, images, tmp_path / "run", "run.max_steps=1", *extra)


@pytest.mark.parametrize("extra, message", [
    ("loss.capture_layers=[8]", r"^loss\.capture_layers: layer 8 does not exist: the albef backbone has 2 "),
    ("loss.capture_head=5", r"^loss\.capture_head: head 5 does not exist"),
])
def test_the_trainer_reports_a_setting_the_model_lacks_before_reading_batches(tmp_path, monkeypatch, extra, message):
    from hist_vlm.train.distributed import setup_environment
    from hist_vlm.train.loop import Trainer
    from hist_vlm.train.tasks.hist import HistTask

    def no_loader(self, model):
        raise AssertionError("the batches were asked for before the objective was checked")

    monkeypatch.setattr(HistTask, "loader", no_loader)
    cfg = load_config("demo_tiny", _trainer_overrides(tmp_path, extra))
    with pytest.raises(ConfigError, match=message) as info:
        Trainer(cfg, setup_environment("cpu"), resume=False, progress=False)
    assert "\n" not in str(info.value)
