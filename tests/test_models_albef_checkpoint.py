"""ALBEF checkpoints: official layouts in, our safetensors in and out, the load report."""
import argparse
import json

import pytest
import torch

from hist_vlm.models.albef import AlbefConfig, AlbefModel
from hist_vlm.models.albef_checkpoint import (
    config_from_state_dict,
    interpolate_pos_embed,
    load_albef_checkpoint,
    load_albef_model,
    to_albef_state_dict,
)

TINY = dict(
    image_size=32, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2,
    text_width=32, text_layers=4, text_heads=2, text_intermediate_size=64, fusion_layer=2,
    embed_dim=16, max_position_embeddings=40,
)
QUEUES = {"image_queue": torch.randn(16, 8), "text_queue": torch.randn(16, 8), "queue_ptr": torch.zeros(1, dtype=torch.long)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = AlbefModel(AlbefConfig(**TINY))
    with torch.no_grad():  # momentum weights differ from the online ones, so a mix-up shows
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def inputs(model):
    ids, mask = model.tokenize(["a dog on the grass", "two red cars near a tree"])
    return torch.randn(2, 3, 32, 32), ids, mask


def outputs(model, px, ids, mask):
    twin = model.momentum_twin()
    with torch.no_grad():
        return torch.cat([
            model.itm_logits_from(px, ids, mask).flatten(),
            model.itc_similarity(px, ids, mask).flatten(),
            model.mlm_logits(ids, mask, model.encode_image(px))[:, :, :50].flatten(),
            twin.mlm_logits(ids, mask, twin.encode_image(px))[:, :, :50].flatten(),
        ])


def fresh(**kw) -> AlbefModel:
    torch.manual_seed(123)
    return AlbefModel(AlbefConfig(**{**TINY, **kw})).eval()


def test_pretrain_layout_pth_round_trip(model, inputs, tmp_path):
    path = tmp_path / "ALBEF.pth"
    torch.save({"model": {**to_albef_state_dict(model), **QUEUES}, "epoch": 3}, path)
    loaded = fresh()
    report = load_albef_checkpoint(loaded, path, verbose=False)
    assert torch.equal(outputs(loaded, *inputs), outputs(model, *inputs))
    assert report.layout == "pretrain" and report.missing == [] and not report.momentum_from_online
    assert report.dropped == sorted([*QUEUES, "text_encoder.bert.embeddings.position_ids",
                                     "text_encoder_m.bert.embeddings.position_ids"])


def test_retrieval_layout_names_missing_mlm_head(model, inputs, tmp_path, capsys):
    sd = to_albef_state_dict(model, layout="retrieval")
    assert "text_encoder.embeddings.word_embeddings.weight" in sd and not any(".bert." in k or ".cls." in k for k in sd)
    path = tmp_path / "refcoco.pth"
    torch.save({"model": {**sd, **QUEUES, "idx_queue": torch.full((1, 8), -100)}}, path)
    loaded = load_albef_model(path, AlbefConfig(**TINY))
    printed = capsys.readouterr().err
    report = loaded.load_report
    assert report.layout == "retrieval" and report.source == str(path)
    assert "idx_queue" in report.dropped and "text_encoder.embeddings.position_ids" in report.dropped
    head = ["bias", "decoder.bias", "transform.LayerNorm.bias", "transform.LayerNorm.weight",
            "transform.dense.bias", "transform.dense.weight"]
    assert report.missing == sorted(f"{t}.cls.predictions.{h}" for t in ("text_encoder", "text_encoder_m") for h in head)
    assert "missing 12 key(s)" in printed and "text_encoder.cls.predictions.transform.dense.weight" in printed
    with torch.no_grad():
        px, ids, mask = inputs
        assert torch.equal(loaded.itm_logits_from(px, ids, mask), model.itm_logits_from(px, ids, mask))
        assert torch.equal(loaded.itc_similarity(px, ids, mask), model.itc_similarity(px, ids, mask))


def test_bare_state_dict_and_sizes_read_from_weights(model, inputs):
    sd = to_albef_state_dict(model)
    cfg = config_from_state_dict(sd, vision_heads=2, text_heads=2)
    assert cfg == AlbefConfig(**TINY)
    loaded = load_albef_model(sd, verbose=False, vision_heads=2, text_heads=2)
    assert torch.equal(outputs(loaded, *inputs), outputs(model, *inputs))


def test_checkpoint_without_momentum_copies_initialises_them_from_online(model, inputs):
    sd = {k: v for k, v in to_albef_state_dict(model).items() if "_m." not in k}
    loaded = fresh()
    report = load_albef_checkpoint(loaded, sd, verbose=False)
    assert report.momentum_from_online
    assert "visual_encoder_m.pos_embed" in report.missing and "text_proj_m.weight" in report.missing
    assert torch.equal(loaded.visual_encoder_m.pos_embed, model.visual_encoder.pos_embed)
    assert "initialised from the online weights" in str(report)


def test_config_mismatch_is_an_error(model):
    with pytest.raises(ValueError, match="does not match the model config"):
        load_albef_checkpoint(fresh(embed_dim=8), to_albef_state_dict(model), verbose=False)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_albef_checkpoint(fresh(), {"epoch": 1}, verbose=False)
    with pytest.raises(FileNotFoundError, match="no ALBEF checkpoint"):
        load_albef_model("/nonexistent/ALBEF.pth")


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_albef_model(path)


def test_pos_embed_interpolation():
    pos = torch.randn(1, 17, 32)
    assert interpolate_pos_embed(pos, (4, 4)) is pos
    bigger = interpolate_pos_embed(pos, (6, 6))
    assert bigger.shape == (1, 37, 32)
    assert torch.equal(bigger[:, 0], pos[:, 0])  # CLS position kept
    # a constant grid stays constant under bicubic resizing; a ramp keeps its ends ordered
    flat = torch.cat([pos[:, :1], torch.full((1, 16, 32), 0.5)], dim=1)
    assert torch.allclose(interpolate_pos_embed(flat, (6, 6))[:, 1:], torch.full((1, 36, 32), 0.5), atol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        interpolate_pos_embed(torch.randn(1, 16, 8), (4, 4))


def test_loading_at_another_resolution_interpolates_online_and_momentum(model):
    report = load_albef_checkpoint(fresh(image_size=48), to_albef_state_dict(model), verbose=False)
    assert report.interpolated == {"visual_encoder.pos_embed": (16, 36), "visual_encoder_m.pos_embed": (16, 36)}
    assert "interpolated visual_encoder.pos_embed: 16 -> 36" in str(report)


def test_safetensors_round_trip(model, inputs, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["backbone"] == "albef" and saved["config"]["fusion_layer"] == 2
    loaded = AlbefModel.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(outputs(loaded, *inputs), outputs(model, *inputs))
    assert loaded.text_encoder.cls.predictions.decoder.weight is loaded.text_encoder.bert.embeddings.word_embeddings.weight
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        AlbefModel.from_pretrained(tmp_path / "nothing")


def test_report_names_every_key_compactly():
    from hist_vlm.models.albef_checkpoint import LoadReport

    keys = [f"text_encoder.bert.encoder.layer.{i}.attention.self.query.weight" for i in (0, 1, 3)] + ["image_queue"]
    text = str(LoadReport(source="x.pth", layout="pretrain", dropped=keys))
    assert "text_encoder.bert.encoder.layer.{0,1,3}.attention.self.query.weight" in text
    assert "image_queue" in text and "dropped 4 key(s)" in text and "missing 0 key(s)" in text
