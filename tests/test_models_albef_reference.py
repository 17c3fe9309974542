"""Parity with salesforce/ALBEF's own code: its checkpoint, its outputs (tests/fixtures/albef/README.md)."""
from pathlib import Path

import pytest
import torch

from hist_vlm.losses.gradcam import paired_gradcam
from hist_vlm.models.albef_checkpoint import load_albef_model, read_albef_state_dict
from hist_vlm.models.tokenization import AlbefTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "albef"
SIZES = dict(vision_heads=2, text_heads=2)  # head counts cannot be read off the weights
# the reference maps are ALBEF Grounding.py's block_num=4: cross-attention layer 4 - fusion_layer


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURES / "albef_tiny_reference_outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def model():
    return load_albef_model(FIXTURES / "albef_tiny_reference.pth", verbose=False, **SIZES).eval()


def close(ours, theirs):
    """The bar: 1e-5 absolute, on outputs large enough for that to mean something."""
    assert theirs.abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_itm_and_itc_match_reference(model, ref):
    with torch.no_grad():
        close(model.itm_logits_from(ref["image"], ref["ids"], ref["mask"]), ref["itm"])
        close(model.itc_similarity(ref["image"], ref["ids"], ref["mask"]), ref["itc"])
        close(model.itc_similarity(ref["image"], ref["ids"], ref["mask"], divide_by_temp=True), ref["itc_temp"])


def test_gradcam_matches_grounding_recipe(model, ref):
    ours = paired_gradcam(model, ref["image"], ref["ids"], ref["mask"], layer=4 - model.config.fusion_layer)
    assert ours.shape == ref["gradcam"].shape == (4, 4, 4)
    torch.testing.assert_close(ours, ref["gradcam"], rtol=1e-4, atol=1e-10)
    assert ref["gradcam"].abs().max() > 1e-6


def test_mlm_logits_online_and_momentum_match_reference(model, ref):
    twin = model.momentum_twin()
    image, ids, mask = ref["image"], ref["ids"], ref["mask"]
    with torch.no_grad():
        close(model.mlm_logits(ids, mask, model.encode_image(image)), ref["mlm"])
        close(twin.mlm_logits(ids, mask, twin.encode_image(image)), ref["mlm_m"])
        sim_m = twin.image_features(twin.encode_image(image)) @ twin.text_features(twin.encode_text(ids, mask)).t()
    close(sim_m, ref["itc_m"])


def test_checkpoint_loaded_at_another_resolution_matches_grounding_loader(ref):
    model = load_albef_model(FIXTURES / "albef_tiny_reference.pth", verbose=False, image_size=48, **SIZES).eval()
    assert model.load_report.interpolated == {"visual_encoder.pos_embed": (16, 36), "visual_encoder_m.pos_embed": (16, 36)}
    image, ids, mask = ref["image48"], ref["ids"], ref["mask"]
    with torch.no_grad():
        close(model.itm_logits_from(image, ids, mask), ref["itm48"])
        close(model.itc_similarity(image, ids, mask), ref["itc48"])
    torch.testing.assert_close(paired_gradcam(model, image, ids, mask, layer=4 - model.config.fusion_layer), ref["gradcam48"], rtol=1e-4, atol=1e-10)


def test_load_report_names_reference_extras():
    report = load_albef_model(FIXTURES / "albef_tiny_reference.pth", verbose=False, **SIZES).load_report
    state, _ = read_albef_state_dict(FIXTURES / "albef_tiny_reference.pth")
    assert report.layout == "pretrain"
    assert report.dropped == sorted(
        ["image_queue", "text_queue", "queue_ptr",
         "text_encoder.bert.embeddings.position_ids", "text_encoder_m.bert.embeddings.position_ids"]
    )
    assert report.missing == []
    assert all(k in state for k in report.dropped)


def test_tokenizer_matches_albef_tokenizer(ref):
    tok = AlbefTokenizer(max_words=30)
    for max_length, key in ((None, "caption_ids"), (25, "caption_ids_25")):
        ids, mask = tok(ref["captions"], max_length=max_length)
        assert torch.equal(ids, ref[key])
        assert torch.equal(mask, (ref[key] != 0).long())
