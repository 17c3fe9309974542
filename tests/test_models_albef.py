"""The ALBEF backbone: key layout, modes, gathering, captured attention, momentum."""
import pytest
import torch

from hist_vlm.models import build_backbone
from hist_vlm.losses.gradcam import paired_gradcam
from hist_vlm.models.albef import AlbefConfig, AlbefModel
from hist_vlm.models.base import MaskedLanguageModel, MomentumTwin, VisionLanguageBackbone
from hist_vlm.batch import TextRows

TINY = dict(
    image_size=32, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2,
    text_width=32, text_layers=5, text_heads=2, text_intermediate_size=64, fusion_layer=2,
    embed_dim=16, max_position_embeddings=40,
)
CAPTIONS = ["a dog on the grass", "two red cars", "a man riding a horse near the sea", "a cat"]


def tiny(**kw) -> AlbefModel:
    torch.manual_seed(0)
    return AlbefModel(AlbefConfig(**{**TINY, **kw}))


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


def test_state_dict_uses_albef_key_names(model):
    keys = set(model.state_dict())
    for key in (
        "temp", "visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
        "visual_encoder.blocks.1.attn.qkv.weight", "visual_encoder.blocks.1.mlp.fc2.bias", "visual_encoder.norm.weight",
        "text_encoder.bert.embeddings.word_embeddings.weight", "text_encoder.bert.embeddings.LayerNorm.weight",
        "text_encoder.bert.encoder.layer.0.attention.self.query.weight",
        "text_encoder.bert.encoder.layer.0.attention.output.LayerNorm.bias",
        "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight",
        "text_encoder.bert.encoder.layer.4.crossattention.output.dense.weight",
        "text_encoder.bert.encoder.layer.4.intermediate.dense.weight", "text_encoder.bert.encoder.layer.4.output.LayerNorm.weight",
        "text_encoder.cls.predictions.bias", "text_encoder.cls.predictions.decoder.weight",
        "text_encoder.cls.predictions.transform.dense.weight", "vision_proj.weight", "text_proj.bias", "itm_head.weight",
        "visual_encoder_m.pos_embed", "text_encoder_m.bert.encoder.layer.3.crossattention.self.value.bias",
        "vision_proj_m.weight", "text_proj_m.weight",
    ):
        assert key in keys, key
    assert not any(".layer.1.crossattention" in k for k in keys)  # text-only below fusion_layer
    assert not any(k.startswith("visual_encoder.head") or "fc_norm.weight" in k for k in keys)
    assert model.visual_encoder.blocks[0].norm1.eps == 1e-6
    assert model.itm_head.out_features == 2 and model.vision_proj.out_features == 16
    assert model.temp.item() == pytest.approx(0.07)
    words = model.text_encoder.bert.embeddings.word_embeddings.weight
    assert model.text_encoder.cls.predictions.decoder.weight is words  # MLM decoder tied
    assert model.text_encoder_m.cls.predictions.decoder.weight is model.text_encoder_m.bert.embeddings.word_embeddings.weight
    assert not any(p.requires_grad for n, p in model.named_parameters() if "_m." in n)
    assert model.patch_grid == (4, 4) and model.num_cross_attention_layers == 3


def test_text_then_fusion_equals_multimodal_pass(model):
    ids, mask = model.tokenize(CAPTIONS)
    px = torch.randn(2, 3, 32, 32)
    index = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        image = model.encode_image(px)
        fused = model.fuse(model.encode_text(ids, mask), mask, image, index)
        via_fusion = model.text_encoder.cls(fused.last_hidden_state)
        assert torch.allclose(model.mlm_logits(ids, mask, image, index), via_fusion, atol=1e-5)
        chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3  # [N, T]
        some = model.mlm_logits(ids, mask, image, index, positions=chosen)  # [K, V]
        assert some.shape == (int(chosen.sum()), via_fusion.shape[-1])
        assert torch.allclose(some, via_fusion[chosen], atol=1e-5)
        assert fused.cross_attention is None
        assert model.encode_text(ids, mask).shape == (4, ids.shape[1], 32)
        assert image.shape == (2, 17, 32)


def test_fuse_gathers_image_embeddings_like_recomputation(model):
    ids, mask = model.tokenize(CAPTIONS + ["a dog", "the sea"])
    index = torch.tensor([0, 1, 1, 0, 2, 1])
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        gathered = model.fuse(text, mask, model.encode_image(px), index, capture_layer=1)
        recomputed = model.fuse(text, mask, model.encode_image(px[index]), None, capture_layer=1)
    assert torch.allclose(gathered.last_hidden_state, recomputed.last_hidden_state, atol=1e-5)
    assert torch.allclose(gathered.cross_attention, recomputed.cross_attention, atol=1e-6)
    assert torch.allclose(model.itm_logits(gathered), model.itm_logits(recomputed), atol=1e-5)
    assert not torch.allclose(gathered.last_hidden_state[1], gathered.last_hidden_state[0])


def test_captured_cross_attention_is_pre_dropout_probabilities_in_graph():
    model = tiny(attention_dropout=0.5).train()
    ids, mask = model.tokenize(CAPTIONS)
    image = model.encode_image(torch.randn(2, 3, 32, 32))
    fused = model.fuse(model.encode_text(ids, mask), mask, image, torch.tensor([0, 1, 0, 1]), capture_layer=2)
    probs = fused.cross_attention
    assert probs.shape == (4, 2, ids.shape[1], 17)  # [N, heads, T, 1+P]
    assert torch.allclose(probs.sum(-1), torch.ones(4, 2, ids.shape[1]), atol=1e-5)  # dropout would break this
    assert (probs >= 0).all() and probs.requires_grad
    grad = torch.autograd.grad(model.itm_logits(fused)[:, 1].sum(), probs)[0]
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="capture_layer"):
        model.fuse(model.encode_text(ids, mask), mask, image, torch.tensor([0, 1, 0, 1]), capture_layer=3)


def test_padding_does_not_change_a_row(model):
    px = torch.randn(1, 3, 32, 32)
    ids, mask = model.tokenize(["a dog on the grass"])
    padded_ids, padded_mask = model.tokenize(["a dog on the grass", "a much longer caption with many more words"])
    with torch.no_grad():
        alone = model.itm_logits_from(px, ids, mask)
        padded = model.itm_logits_from(px.expand(2, -1, -1, -1), padded_ids, padded_mask)[:1]
    assert padded_ids.shape[1] > ids.shape[1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_itc_similarity_is_cosine_and_temperature_scaled(model):
    ids, mask = model.tokenize(CAPTIONS[:3])
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sim = model.itc_similarity(px, ids, mask)
        logits = model.itc_similarity(px, ids, mask, divide_by_temp=True)
        manual = model.image_features(model.encode_image(px)) @ model.text_features(model.encode_text(ids, mask)).t()
    assert sim.shape == (2, 3) and sim.abs().max() <= 1 + 1e-6
    assert torch.allclose(sim, manual, atol=1e-6)
    assert torch.allclose(logits, sim / 0.07, atol=1e-5)


def test_paired_gradcam_shape_and_mode(model):
    ids, mask = model.tokenize(CAPTIONS[:2])
    model.train()
    maps = paired_gradcam(model, torch.randn(2, 3, 32, 32), ids, mask, layer=2)
    assert model.training  # restored
    model.eval()
    assert maps.shape == (2, 4, 4) and (maps >= 0).all() and maps.sum() > 0 and not maps.requires_grad
    with pytest.raises(ValueError, match="out of range"):
        paired_gradcam(model, torch.randn(2, 3, 32, 32), ids, mask, layer=-1)


def test_momentum_update_math_and_twin():
    model = tiny()
    with torch.no_grad():  # make online and momentum weights differ
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    pairs = [(n, p) for n, p in model.named_parameters() if "_m." not in n and n != "temp" and not n.startswith("itm_head")]
    online = {n: p.detach().clone() for n, p in pairs}
    ema_before = {n: model.get_parameter(n.split(".", 1)[0] + "_m." + n.split(".", 1)[1]).detach().clone() for n, _ in pairs}
    model.update_momentum(0.9)
    for n, _ in pairs:
        ema = model.get_parameter(n.split(".", 1)[0] + "_m." + n.split(".", 1)[1])
        assert torch.allclose(ema, 0.9 * ema_before[n] + 0.1 * online[n], atol=1e-6), n
    model.copy_params_to_momentum()
    twin = model.momentum_twin()
    ids, mask = model.tokenize(CAPTIONS[:2])
    px = torch.randn(2, 3, 32, 32)
    model.eval()
    out_m = twin.text_features(twin.encode_text(ids, mask))
    assert not out_m.requires_grad
    assert torch.allclose(out_m, model.text_features(model.encode_text(ids, mask)), atol=1e-6)
    assert twin.fuse(twin.encode_text(ids, mask), mask, twin.encode_image(px), None, 0).cross_attention.shape[-1] == 17
    assert {k.split(".")[0] for k in twin.state_dict()} == {"visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m"}
    assert isinstance(twin, MomentumTwin) and isinstance(twin, MaskedLanguageModel)
    assert not isinstance(twin, VisionLanguageBackbone)  # no ITM head: not a backbone of its own


def test_without_momentum():
    model = tiny(momentum=False)
    assert model.momentum_twin() is None
    assert not any("_m." in k for k in model.state_dict())
    with pytest.raises(RuntimeError, match="momentum=False"):
        model.update_momentum(0.99)


def test_user_errors_are_one_line_messages(model):
    with pytest.raises(ValueError, match="configured for 32x32"):
        model.encode_image(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="fusion_layer"):
        AlbefConfig(**{**TINY, "fusion_layer": 5})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        AlbefConfig(**{**TINY, "image_size": 30})
    with pytest.raises(ValueError, match="unknown ALBEF config key 'widht'"):
        AlbefConfig.from_dict({"widht": 3})


def test_config_accepts_albef_names_and_build_backbone():
    cfg = AlbefConfig.from_dict({**TINY, "image_res": 48, "hidden_size": 32})
    assert cfg.image_size == 48 and cfg.text_width == 32
    model = build_backbone("albef", {**TINY, "image_res": 48, "hidden_size": 32})
    assert isinstance(model, AlbefModel) and model.patch_grid == (6, 6) and model.config == cfg
    assert build_backbone("ALBEF", TINY).config == AlbefConfig(**TINY)
    blip = build_backbone("blip", {"size": "tiny"})
    assert type(blip).__name__ == "BlipBackbone"
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("clip", {})


def test_protocol_rows_through_fuse_rows(model):
    ids, mask = model.tokenize(CAPTIONS)
    rows = TextRows(ids, mask, torch.tensor([1, 0, 1, 0]))
    image = model.encode_image(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        a = model.fuse_rows(rows, image)
        b = model.fuse(model.encode_text(ids, mask), mask, image, rows.image_index)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_unpaired_rows_need_an_index(model):
    ids, mask = model.tokenize(CAPTIONS[:3])
    image = model.encode_image(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="pass image_index"):
        model.fuse(model.encode_text(ids, mask), mask, image)
    with pytest.raises(ValueError, match="pass image_index"):
        model.mlm_logits(ids, mask, image)


def test_default_capture_layer_is_the_third_cross_attention_layer():
    from hist_vlm.models.albef import AlbefConfig, AlbefModel

    base_like = AlbefModel(AlbefConfig(image_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2,
                                       text_width=32, text_layers=6, text_heads=2, text_intermediate_size=64,
                                       fusion_layer=2, vocab_size=64, embed_dim=16, max_position_embeddings=32))
    assert base_like.default_capture_layers == (2,)  # absolute block fusion_layer + 2, as block 8 of ALBEF-base
    small = AlbefModel(AlbefConfig(image_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2,
                                   text_width=32, text_layers=4, text_heads=2, text_intermediate_size=64,
                                   fusion_layer=2, vocab_size=64, embed_dim=16, max_position_embeddings=32))
    assert small.default_capture_layers == (1,)
