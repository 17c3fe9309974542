"""BLIP-2 wrapper: decomposed ITM/ITC == HF's forward, the query GradCAM written out by hand,
checkpoints (ours and a transformers folder), a HIST step, and the train -> eval CLI."""
import json

import pytest
import torch
from typer.testing import CliRunner

from hist_vlm.batch import TextRows
from hist_vlm.losses.gradcam import gradcam_maps
from hist_vlm.losses.itc import similarity
from hist_vlm.models import get_backbone, load_backbone
from hist_vlm.models.base import CaptioningModel, MaskedLanguageModel
from hist_vlm.models.blip2 import Blip2Backbone, blip2_config, blip2_tokenizer
from losses_fixtures import hist_batch, tiny_backbone
from train_helpers import write_world

TEXTS = ["A dog.", "a man riding a red horse on the beach", "two cats"]


def _tiny():
    return tiny_backbone("blip2").eval()


def _setup(texts=TEXTS, index=(0, 1, 0)):
    model = _tiny()
    ids, mask = model.tokenize(texts)
    px = torch.randn(2, 3, 32, 32)
    return model, px, ids, mask, TextRows(ids, mask, torch.tensor(index))


def test_tokenizer_and_sizes():
    tok = blip2_tokenizer()
    assert len(tok) == 30523 and tok.bos_token_id == 30522  # LAVIS: bert-base-uncased + [DEC]
    model = _tiny()
    ids, mask = model.tokenize(["A dog.", "Two (small) cats!"])
    assert ids[0].tolist() == tok("a dog")["input_ids"] + [0]  # "[CLS] a dog [SEP]", LAVIS' cleaning
    assert model.tokenize(["word " * 60])[0].shape[1] == 32    # LAVIS max_txt_len
    assert model.cross_layers == (0, 2, 4) and model.num_cross_attention_layers == 3
    assert model.default_capture_layers == (1,) and model.num_query_tokens == 4
    assert model.patch_grid == (4, 4) and model.embed_dim == 16 and model.max_text_length == 64
    assert model.momentum_twin() is None
    assert not isinstance(model, (CaptioningModel, MaskedLanguageModel))
    assert not torch.equal(model.retrieval.query_tokens[0, 0], model.retrieval.query_tokens[0, 1])


def test_decomposed_itm_equals_hf_and_capture_is_the_queries_softmax():
    model, px, ids, mask, _ = _setup(TEXTS[:2], (0, 1))
    rows = TextRows(ids, mask, torch.tensor([0, 1]))
    img = model.encode_image(px)
    assert img.shape == (2, 1 + 16, 24)
    fused = model.fuse_rows(rows, img, capture_layer=1)
    hf = model.retrieval(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    torch.testing.assert_close(model.itm_logits(fused), hf.logits_per_image)
    torch.testing.assert_close(model.itm_logits(model.fuse_rows(rows, img)), hf.logits_per_image)
    a = fused.cross_attention
    assert a.shape == (2, 4, model.num_query_tokens, 1 + 16) and a.requires_grad  # [N, heads, Q, 1+P]
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    assert torch.equal(fused.capture_mask, torch.ones(2, model.num_query_tokens, dtype=mask.dtype))
    patched = [model.retrieval.qformer.encoder.layer[i].crossattention.attention for i in model.cross_layers]
    assert not any("forward" in m.__dict__ for m in patched)  # the capture is undone after the pass


def test_itc_features_equal_hf_contrastive_logits():
    model, px, ids, mask, _ = _setup()
    img_feat = model.image_features(model.encode_image(px))
    txt_feat = model.text_features(model.encode_text(ids, mask))
    assert img_feat.shape == (2, 4, 16) and txt_feat.shape == (3, 16)
    torch.testing.assert_close(img_feat.norm(dim=-1), torch.ones(2, 4))
    hf = model.retrieval(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    torch.testing.assert_close(similarity(img_feat, txt_feat), hf.logits_per_image)  # max over queries
    torch.testing.assert_close(similarity(txt_feat, img_feat), hf.logits_per_text)


def _per_query_attention(model, layer):
    """HF's own (eager) cross-attention probabilities [N, heads, Q, 1+P] of cross-attention
    `layer`, kept with their gradient: the by-hand route, no capture machinery involved."""
    model.retrieval.set_attn_implementation("eager")
    module = model.retrieval.qformer.encoder.layer[model.cross_layers[layer]].crossattention.attention
    kept = []

    def hook(_mod, _inp, out):
        out[1].retain_grad()
        kept.append(out[1])

    return module.register_forward_hook(hook), kept


def test_gradcam_is_the_query_mean_of_per_query_gradcam_written_out():
    """Definition: mean over heads and queries of ReLU(A_q * dITM/dA_q), by backward and A.grad."""
    model, px, ids, mask, rows = _setup()
    img = model.encode_image(px)
    got = {r: gradcam_maps(model, img, rows, layers=(1,), recipe=r) for r in ("train", "reference")}
    handle, kept = _per_query_attention(model, 1)
    try:
        model.itm_logits(model.fuse_rows(rows, img))[:, 1].sum().backward()
    finally:
        handle.remove()
    a = kept[0]
    assert a.shape == (3, 4, 4, 17)  # [N, heads, queries, 1+P]
    per_query = (a * a.grad).clamp(min=0)[..., 1:]
    expected = per_query.mean(2).mean(1).reshape(3, 4, 4)
    torch.testing.assert_close(got["train"], expected.detach(), rtol=1e-5, atol=1e-12)
    # every query is valid: the padded-length recipe is the same map
    torch.testing.assert_close(got["reference"], expected.detach(), rtol=1e-5, atol=1e-12)
    # the per-query ReLU matters: clamping after the query mean is another map
    clamp_after = (a * a.grad).mean(2).clamp(min=0)[..., 1:].mean(1).reshape(3, 4, 4)
    assert not torch.allclose(clamp_after, expected, rtol=1e-3, atol=0)


def test_image_index_gathers_image_embeddings():
    model = _tiny()
    ids, mask = model.tokenize(["a dog", "a dog"])
    img = model.encode_image(torch.randn(3, 3, 32, 32))
    both = model.fuse_rows(TextRows(ids, mask, torch.tensor([2, 0])), img, capture_layer=(0, 2))
    alone = model.fuse_rows(TextRows(ids[:1], mask[:1], torch.tensor([0])), img[[2]], capture_layer=(0, 2))
    torch.testing.assert_close(model.itm_logits(both)[0], model.itm_logits(alone)[0])
    for x, y in zip(both.cross_attentions, alone.cross_attentions):
        torch.testing.assert_close(x[0], y[0])


def test_build_config_keys():
    with pytest.raises(ValueError, match="unknown BLIP-2 config key 'vision_width'; known: image_size, size"):
        Blip2Backbone.from_config({"vision_width": 32})
    with pytest.raises(ValueError, match="unknown BLIP-2 size"):
        Blip2Backbone.from_config({"size": "huge"})
    assert Blip2Backbone.from_config({"size": "tiny", "image_size": 48}).patch_grid == (6, 6)
    model = Blip2Backbone.from_config({"transformers": _tiny().retrieval.config.to_dict(), "temp": 0.05})
    assert model.temp.item() == pytest.approx(0.05) and model.image_size == 32
    with pytest.raises(ValueError, match="image_size=64 but the transformers config is for 32 px"):
        Blip2Backbone.from_config({"transformers": model.retrieval.config.to_dict(), "image_size": 64})


def test_save_pretrained_and_transformers_folders_load(tmp_path):
    model, px, ids, mask, rows = _setup()
    with torch.no_grad():
        model.temp.fill_(0.03)
    model.save_pretrained(tmp_path / "ours")
    ours = load_backbone(tmp_path / "ours", "blip2")
    assert isinstance(ours, Blip2Backbone) and ours.temp.item() == pytest.approx(0.03)
    img = model.encode_image(px)
    torch.testing.assert_close(ours.itm_logits(ours.fuse_rows(rows, img)), model.itm_logits(model.fuse_rows(rows, img)))

    torch.manual_seed(1)
    from transformers import Blip2ForImageTextRetrieval

    hf = Blip2ForImageTextRetrieval(blip2_config("tiny")).eval()
    hf.save_pretrained(tmp_path / "hf")
    blip2_tokenizer().save_pretrained(tmp_path / "hf")  # a hub folder ships its tokenizer
    loaded = load_backbone(tmp_path / "hf")
    assert isinstance(loaded, Blip2Backbone) and not loaded.training
    assert torch.equal(loaded.tokenize(TEXTS)[0], ids) and len(loaded.tokenizer) == 30523
    assert get_backbone("blip2").foreign[0].claims(tmp_path / "hf")
    assert not get_backbone("blip2").foreign[0].claims(tmp_path / "ours")
    torch.testing.assert_close(loaded.encode_image(px), hf.vision_model(pixel_values=px).last_hidden_state)
    same_image = TextRows(ids, mask, torch.zeros(3, dtype=torch.long))
    expected = hf(pixel_values=px[:1].expand(3, -1, -1, -1), input_ids=ids, attention_mask=mask,
                  use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(loaded.itm_logits(loaded.fuse_rows(same_image, loaded.encode_image(px))), expected)
    assert load_backbone(tmp_path / "hf", params={"temp": 0.2}).temp.item() == pytest.approx(0.2)

    # a BLIP-2 folder without the ITM/ITC heads is an error, never a half-random model
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "hf" / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("itm_head")}, weights,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a Blip2ForImageTextRetrieval checkpoint.*itm_head"):
        load_backbone(tmp_path / "hf")


def test_hist_step_is_finite_and_reaches_queries_itm_head_and_vision():
    from hist_vlm.losses.hist import HistLoss, HistLossConfig

    model = tiny_backbone("blip2").train()
    loss_fn = HistLoss(HistLossConfig(schedule="constant", add_normalize="distribution"), model)
    out = loss_fn(model, hist_batch(model), progress=0.0)
    for key in ("loss", "itc", "itm", "phrase_itc", "phrase_itm", "subject_itc", "subject_itm", "add"):
        assert torch.isfinite(out[key]), key
    assert out["add"] > 0 and not {"mlm", "phrase_mlm", "rank"} & set(out)  # no language head
    out["loss"].backward()
    r = model.retrieval
    for name, p in [("itm_head", r.itm_head.weight), ("query_tokens", r.query_tokens),
                    ("patch_embedding", r.vision_model.embeddings.patch_embedding.weight),
                    ("vision_projection", r.vision_projection.weight), ("temp", model.temp)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


TRAIN_YAML = """
model:
  name: blip2
  params: {size: tiny}
data:
  phrases: PHRASES
  image_root: IMAGES
  image_size: 32
  batch_size: 4
  num_workers: 0
loss:
  capture_layers: [1]
schedule: {epochs: 2, warmup_steps: 1}
run: {dir: RUNDIR, log_every: 1, save_every: 1000, max_steps: 2}
"""


def test_cli_trains_a_tiny_blip2_then_evaluates_its_checkpoint(tmp_path):
    from hist_vlm.cli import app
    from hist_vlm.demo.synthetic import generate_world

    phrases, images = write_world(tmp_path, size=32)
    config = tmp_path / "blip2_tiny.yaml"
    config.write_text(TRAIN_YAML.replace("PHRASES", str(phrases)).replace("IMAGES", str(images))
                      .replace("RUNDIR", str(tmp_path / "run")))
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(config)], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log and all(torch.isfinite(torch.tensor(x["loss"])) for x in log if "loss" in x)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert isinstance(load_backbone(ckpt, "blip2"), Blip2Backbone)
    world = tmp_path / "world"
    generate_world(world, n_train=0, n_val=2, n_test=2, image_size=64, seed=2, progress=False)
    res = runner.invoke(app, [
        "eval", "pointing", str(config), "--checkpoint", str(ckpt), "--data", "synthetic",
        "--data-root", str(world), "--split", "test", "--device", "cpu", "--num-workers", "0",
    ], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert "layers [1], head mean" in res.output and "test: pointing" in res.output


def test_preset_fine_tunes_a_checkpoint_at_a_valid_layer():
    from hist_vlm.train.config import ConfigError, load_config
    from hist_vlm.train.model import build_model

    cfg = load_config("blip2_coco")
    assert cfg.model.name == "blip2" and cfg.model.require_checkpoint and cfg.model.checkpoint is None
    base = blip2_config("base")
    n_cross = len(range(0, base.qformer_config.num_hidden_layers, base.qformer_config.cross_attention_frequency))
    assert n_cross == 6 and 0 <= cfg.loss.capture_layers[0] < n_cross - 1
    assert base.vision_config.image_size == cfg.data.image_size and cfg.loss.queue_size == 0
    with pytest.raises(ConfigError, match="model.checkpoint is required"):
        build_model(cfg.model, cfg.data.image_size)


def test_no_language_term_is_offered_and_the_preset_says_so():
    """BLIP-2's ITG needs the Q-Former's LM head: no transformers class has one (if a version
    adds it, this fails and the LM term can be offered), so blip2 is not a CaptioningModel, a
    language term is a start-up error, and the preset sets `loss.mlm_weight: 0` explicitly."""
    from dataclasses import replace

    from transformers import Blip2QFormerModel

    from hist_vlm.losses.hist import HistLoss, HistLossConfig, check_backbone
    from hist_vlm.train.config import load_config

    model = _tiny()
    assert not isinstance(model, (CaptioningModel, MaskedLanguageModel))
    bare = Blip2QFormerModel(model.retrieval.config.qformer_config)
    for hf in (model.retrieval, bare):  # the retrieval model and the bare Q-Former: no LM head
        assert hf.get_output_embeddings() is None
        assert not any(n.split(".")[-1] in {"cls", "lm_head", "predictions"} for n, _ in hf.named_modules())
    with pytest.raises(ValueError, match=r"^loss\.mlm_weight=1\.0: the blip2 backbone cannot compute the language"):
        HistLoss(HistLossConfig(mlm_weight=1.0), model)
    cfg = load_config("blip2_coco")
    assert cfg.loss.mlm_weight == 0
    assert check_backbone(replace(cfg.loss, capture_layers=[1]), model) == (("itc", "itm"), 0)
