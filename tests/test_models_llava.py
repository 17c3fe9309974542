"""LLaVA wrapper: the decomposed pass equals transformers' forward, the capture equals the plain
pass and HF's eager attention, GradCAM written out by hand, checkpoints (ours, a transformers
folder, LoRA adapter-only), second-order gradients through LoRA, and the missing-peft error."""
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from hist_vlm.batch import TextRows
from hist_vlm.losses.gradcam import gradcam_head_maps, gradcam_maps
from hist_vlm.models import load_backbone
from hist_vlm.models.base import CaptioningModel, ContrastiveModel, MatchingModel
from hist_vlm.models.layout import WEIGHTS_FILE
from hist_vlm.models.llava import _CAPTURING, LlavaBackbone, _capturing_attention, llava_config, llava_tokenizer
from losses_fixtures import check_against_finite_differences, float64_rms_norm, tiny_backbone

TEXTS = ["a dog", "a man riding a red horse on the beach", "two cats"]
LORA = {"r": 2, "alpha": 4}


def _tiny(**overrides):
    return tiny_backbone("llava", **overrides).eval()


def _setup(model, texts=TEXTS, index=(0, 1, 0)):
    ids, mask = model.tokenize(texts)
    img = model.encode_image(torch.randn(2, 3, 32, 32, dtype=next(model.parameters()).dtype))
    return img, TextRows(ids, mask, torch.tensor(index))


def _randomize_adapters(model, seed=1):
    """LoRA's B starts at zero (the adapters a no-op): give every adapter a value to carry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _hf_folder(path, seed=3):
    """What a local copy of a hub LLaVA folder holds: transformers' save_pretrained + the tokenizer."""
    torch.manual_seed(seed)
    tokenizer = llava_tokenizer()
    LlavaForConditionalGeneration(llava_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _score_and_maps(model, img, rows):
    fused = model.fuse_rows(rows, img)
    return fused.score.detach(), gradcam_maps(model, img, rows, layers=model.default_capture_layers)


def test_tiny_builds_fast_with_the_protocol_sizes():
    _tiny()
    start = time.perf_counter()
    model = _tiny()
    assert time.perf_counter() - start < 1.0
    assert isinstance(model, CaptioningModel) and not isinstance(model, (ContrastiveModel, MatchingModel))
    assert model.momentum_twin() is None
    assert model.patch_grid == (4, 4) and model.num_image_tokens == 16 and model.image_size == 32
    assert model.num_cross_attention_layers == 4 and model.num_cross_attention_heads == 4
    assert model.default_capture_layers == (2,)
    # "user :" <image> "what is in the image ? assistant :" (the tiny tokenizer has no BOS)
    assert len(model.prefix_ids) == 2 and len(model.suffix_ids) == 8
    assert model.max_text_length == 128 - (2 + 16 + 8)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("llava.model.vision_tower.") for n in trains)  # LLaVA freezes the vision tower
    assert any(n.startswith("llava.lm_head.") for n in trains)


def test_tokenize_is_the_text_only_right_padded():
    model = _tiny()
    ids, mask = model.tokenize(["A dog", "two small cats"])
    tok = model.tokenizer
    assert ids[0].tolist() == tok.convert_tokens_to_ids(["a", "dog"]) + [tok.pad_token_id]
    assert ids[1].tolist() == tok.convert_tokens_to_ids(["two", "small", "cats"])
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert model.tokenize(["word " * 200])[0].shape[1] == model.max_text_length


def test_build_config_errors():
    with pytest.raises(ValueError, match="must contain <image> exactly once"):
        _tiny(prompt="USER: describe it. ASSISTANT:")
    with pytest.raises(ValueError, match="must contain <image> exactly once"):
        _tiny(prompt="<image> <image>")
    with pytest.raises(ValueError, match="unknown LLaVA config key 'vision_width'; known: base, freeze_vision"):
        LlavaBackbone.from_config({"vision_width": 32})
    with pytest.raises(ValueError, match="unknown LLaVA lora key 'rank'"):
        _tiny(lora={"rank": 4})
    with pytest.raises(ValueError, match="unknown LLaVA size 'huge'"):
        LlavaBackbone.from_config({"size": "huge"})
    with pytest.raises(ValueError, match="base and size exclude each other"):
        LlavaBackbone.from_config({"size": "tiny", "base": "somewhere"})
    config = _tiny().llava.config.to_dict()
    assert LlavaBackbone.from_config({"transformers": config, "prompt": "<image> Caption:"}).suffix_ids.tolist() \
        == llava_tokenizer()("caption:", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="image_size=64 but the LLaVA model is for 32 px"):
        LlavaBackbone.from_config({"transformers": config, "image_size": 64})


def test_lm_loss_and_score_equal_transformers_forward():
    """One row through HF's own forward: [prefix, <image> x K, suffix, text] with the image
    tokens replaced by the projected features inside transformers, labels on the text only."""
    model = _tiny()
    px = torch.randn(1, 3, 32, 32)
    ids, mask = model.tokenize(["a man riding a red horse"])
    rows = TextRows(ids, mask, torch.tensor([0]))
    img = model.encode_image(px)
    image = torch.full((model.num_image_tokens,), model.llava.config.image_token_id)
    full = torch.cat([model.prefix_ids, image, model.suffix_ids, ids[0]])[None]
    t0, t = model._text_start, ids.shape[1]
    labels = torch.full_like(full, -100)
    labels[:, t0:] = ids
    hf = model.llava(input_ids=full, pixel_values=px, labels=labels)
    torch.testing.assert_close(model.lm_loss(rows, img), hf.loss)
    logp = hf.logits[0, t0 - 1: t0 - 1 + t].log_softmax(-1).gather(-1, ids[0, :, None]).squeeze(-1)  # [T]
    torch.testing.assert_close(model.fuse_rows(rows, img).score, logp.sum()[None])
    torch.testing.assert_close(model.text_log_likelihood(rows, img), logp.mean()[None])


def test_batched_rows_equal_each_row_alone_and_image_index_gathers():
    model = _tiny()
    img, rows = _setup(model, index=(1, 0, 1))
    fused = model.fuse_rows(rows, img, capture_layer=1)
    for i, text in enumerate(TEXTS):
        ids, mask = model.tokenize([text])
        alone = model.fuse_rows(TextRows(ids, mask, torch.tensor([0])), img[rows.image_index[i:i + 1]],
                                capture_layer=1)  # its own image alone
        torch.testing.assert_close(fused.score[i:i + 1], alone.score)
        t = ids.shape[1]  # the padded positions come after the row's own
        torch.testing.assert_close(fused.cross_attention[i, :, :1 + t, :model._text_start + t],
                                   alone.cross_attention[0])
    # the lm loss is the token mean over the whole batch, the likelihood each row's own mean
    per_row = model.text_log_likelihood(rows, img)
    torch.testing.assert_close(model.lm_loss(rows, img), -(per_row * rows.attention_mask.sum(1)).sum()
                               / rows.attention_mask.sum())


def test_capture_equals_the_plain_pass_and_hf_eager_attention():
    model = _tiny()
    img, rows = _setup(model)
    plain = model.fuse_rows(rows, img)
    fused = model.fuse_rows(rows, img, capture_layer=(3, 0))
    torch.testing.assert_close(fused.last_hidden_state, plain.last_hidden_state)
    torch.testing.assert_close(fused.score, plain.score)
    assert fused.cross_attention is None and len(fused.cross_attentions) == 2
    n, t = rows.input_ids.shape
    t0 = model._text_start
    length = t0 + t
    for probs in fused.cross_attentions:  # the rows' own positions: the last prompt token, the text
        assert probs.shape == (n, 4, 1 + t, length) and probs.requires_grad
        torch.testing.assert_close(probs.sum(-1), torch.ones(n, 4, 1 + t))
        assert (probs[..., ~torch.ones(1 + t, length, dtype=torch.bool).tril(t0 - 1)] == 0).all()  # causal
        padded = (rows.attention_mask == 0).nonzero()  # no position reads a padded token
        assert (probs[padded[:, 0], :, :, t0 + padded[:, 1]] == 0).all()
        tokens, patches = fused.capture_block
        assert probs[..., tokens, patches].shape == (n, 4, t, 16)  # [N, heads, T, P]
    assert model.language_model.config._attn_implementation == "sdpa"  # restored after the pass
    assert not _CAPTURING
    # the same probabilities as transformers' own eager attention (GQA, scaling, masks) in one
    # pass over the whole sequence, at the rows' own positions
    model.llava.set_attn_implementation("eager")
    embed = model.language_model.get_input_embeddings()
    embeds = torch.cat([embed(model.prefix_ids).expand(n, -1, -1), img[rows.image_index],
                        embed(model.suffix_ids).expand(n, -1, -1), embed(rows.input_ids)], 1)
    mask = torch.cat([torch.ones(n, t0, dtype=torch.long), rows.attention_mask], 1)
    eager = model.language_model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True).attentions
    torch.testing.assert_close(fused.cross_attentions[0], eager[3][:, :, t0 - 1:])
    torch.testing.assert_close(fused.cross_attentions[1], eager[0][:, :, t0 - 1:])


def test_capturing_attention_aligns_a_short_query_to_the_last_keys():
    """A row pass's Q queries continue the cached keys: query i reads keys 0 .. K-Q+i, whether
    the mask is SDPA's boolean [N, 1, Q, K] or None (what transformers leaves for Q = 1)."""
    module = torch.nn.Module()
    module.is_causal = True
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g) for n in (3, 7, 7))
    allowed = torch.ones(3, 7, dtype=torch.bool).tril(7 - 3)  # [Q, K]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2)
    for mask in (None, allowed.expand(2, 1, 3, 7)):
        _CAPTURING[id(module)] = store = []
        try:
            out, probs = _capturing_attention(module, q, k, v, mask)
        finally:
            del _CAPTURING[id(module)]
        torch.testing.assert_close(out, expected)
        assert store[0] is probs and (probs[..., ~allowed] == 0).all() and (probs[..., allowed] > 0).all()


def _full_pass(monkeypatch):
    """From here on every row runs all L positions, as under gradient checkpointing."""
    monkeypatch.setattr(LlavaBackbone, "_checkpointing", property(lambda self: True))


def test_gradient_checkpointing_runs_the_full_pass_and_leaves_the_captured_layer_alone():
    """transformers drops a checkpointed layer's cache: every row then runs all L positions,
    with the shared pass's score, LM losses and maps. A checkpointed layer's backward replays
    its forward: a captured one would replay SDPA, not the eager graph it recorded. The capture
    runs it uncheckpointed, the others stay so."""
    model = tiny_backbone("llava")  # train mode: checkpointing is on only in training
    img, rows = _setup(model)

    def outputs():
        fused = model.fuse_rows(rows, img, capture_layer=1)
        return (fused.cross_attention.shape, fused.score, model.lm_token_losses(rows, img)[0],
                gradcam_maps(model, img, rows, layers=(1, 2)))

    shape, *expected = outputs()
    n, t = rows.input_ids.shape
    assert shape == (n, 4, 1 + t, model._text_start + t)
    model.llava.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.language_model.layers)
    shape, *got = outputs()
    assert shape == (n, 4, model._text_start + t, model._text_start + t)
    torch.testing.assert_close(got, expected)
    assert all(layer.gradient_checkpointing for layer in model.language_model.layers)


def test_the_shared_pass_equals_the_full_pass(monkeypatch):
    """The prompt but its last token run once per image and the rows read their keys/values:
    the same as every row running all L positions, for the score, the LM losses, the maps of two
    layers and the gradients (double backward included) of an addition-style loss plus the LM
    loss; rows of 3 of 4 images in mixed order, of different lengths, in float64."""
    float64_rms_norm(monkeypatch)
    model = _tiny(dtype=torch.float64)
    texts = ["a dog and two cats", "a man riding a red horse on the beach", "two cats", "a dog", "a dog",
             "two cats"]
    ids, mask = model.tokenize(texts)
    rows = TextRows(ids, mask, torch.tensor([3, 0, 2, 0, 3, 3]))  # image 1 unused
    px = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def outputs():
        img = model.encode_image(px)  # through the projector, which trains
        maps = gradcam_head_maps(model, img, rows, layers=(1, 2), create_graph=True)  # [N, 2, heads, 4, 4]
        losses = model.lm_token_losses(rows, img)[0]
        loss = (maps[0] - maps[4] - maps[5]).pow(2).sum() + model.lm_loss(rows, img)
        return [model.fuse_rows(rows, img).score, losses, maps, *torch.autograd.grad(loss, list(trained.values()))]

    shared = outputs()
    _full_pass(monkeypatch)
    full = outputs()
    grads = dict(zip(trained, shared[3:]))
    assert sum(bool(g.abs().sum() > 0) for g in grads.values()) > 0.9 * len(grads)
    assert all(g.abs().sum() > 0 for name, g in grads.items() if "multi_modal_projector" in name)
    for what, a, b in zip(["score", "lm losses", "maps"] + list(grads), shared, full):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")


def test_gradcam_is_the_text_rows_patch_columns_written_out():
    """ReLU(A * d score / dA) on the rows predicting the text and the patch columns, head mean,
    mean over each row's valid tokens: by backward and A.grad on the captured probabilities."""
    model = _tiny()
    img, rows = _setup(model)
    layer = model.default_capture_layers[0]
    got = gradcam_maps(model, img, rows, layers=(layer,))
    fused = model.fuse_rows(rows, img, capture_layer=layer)
    a = fused.cross_attention
    a.retain_grad()
    fused.score.sum().backward()
    t = rows.input_ids.shape[1]
    block = (a * a.grad)[:, :, :t, 2: 18].clamp(min=0).mean(1)  # [N, T, P]; queries from t0-1, image at 2..17
    m = rows.attention_mask.float()[..., None]
    expected = ((block * m).sum(1) / m.sum(1)).reshape(3, 4, 4)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-12)
    assert (got > 0).any()
    # the position after the last text token predicts nothing scored: no gradient reaches it
    assert (a.grad[:, :, t:] == 0).all()


def test_save_pretrained_and_transformers_folders_load(tmp_path):
    model = _tiny()
    img, rows = _setup(model)
    model.save_pretrained(tmp_path / "ours")
    ours = load_backbone(tmp_path / "ours", "llava")
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(ours.fuse_rows(rows, img).score, model.fuse_rows(rows, img).score, rtol=0, atol=0)

    hf_dir = _hf_folder(tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir)
    loaded = load_backbone(hf_dir, "llava")
    assert loaded.base == str(hf_dir.resolve()) and loaded.lora is None
    assert all(torch.equal(v, loaded.llava.state_dict()[k]) for k, v in hf.state_dict().items())
    custom = load_backbone(hf_dir, "llava", params={"lora": LORA, "prompt": "<image> Caption:"})
    assert custom.lora["r"] == 2 and custom.prompt == "<image> Caption:" and len(custom.prefix_ids) == 0
    with pytest.raises(ValueError, match="unknown LLaVA load key 'temp'"):
        load_backbone(hf_dir, "llava", params={"temp": 0.1})
    weights = load_file(str(hf_dir / WEIGHTS_FILE))
    del weights["language_model.lm_head.weight"]  # the hub layout: transformers converts the names
    save_file(weights, str(hf_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not a complete LlavaForConditionalGeneration checkpoint: 1 weights "
                                         r"missing \(e.g. lm_head.weight\)$"):
        load_backbone(hf_dir, "llava")


def test_lora_freezes_the_lm_and_a_model_without_base_saves_everything(tmp_path):
    model = _tiny(lora=LORA)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all("lora_" in n or n.startswith("llava.model.multi_modal_projector.") for n in trains)
    assert any("mlp.down_proj.lora_A" in n for n in trains)  # the MLP is a default target too
    assert not any(n.startswith("llava.model.vision_tower.") and "lora_" in n for n, _ in model.named_parameters())
    _randomize_adapters(model)
    img, rows = _setup(model)
    model.save_pretrained(tmp_path / "full")  # randomly initialised: no base to refer to
    with safe_open(str(tmp_path / "full" / WEIGHTS_FILE), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    again = LlavaBackbone.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(again.fuse_rows(rows, img).score, model.fuse_rows(rows, img).score, rtol=0, atol=0)


def test_lora_adapter_only_checkpoint_reloads_and_resumes_onto_its_base(tmp_path):
    hf_dir = _hf_folder(tmp_path / "hf")
    model = load_backbone(hf_dir, "llava", params={"lora": LORA})
    _randomize_adapters(model)
    with torch.no_grad():
        model.llava.model.multi_modal_projector.linear_2.bias.add_(0.5)  # trained projector
    img, rows = _setup(model)
    score, maps = _score_and_maps(model, img, rows)
    out = tmp_path / "adapters"
    model.save_pretrained(out)
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
    assert keys and all("lora_" in k or k.startswith("llava.model.multi_modal_projector.") for k in keys)
    assert (out / WEIGHTS_FILE).stat().st_size * 20 < (hf_dir / WEIGHTS_FILE).stat().st_size
    reloaded = load_backbone(out, "llava")
    assert reloaded.base == str(hf_dir.resolve())
    for other in (reloaded, load_backbone(hf_dir, "llava", params={"lora": LORA}).eval()):
        if other is not reloaded:  # the training resume: an already-built model from the same base
            other.load_saved_weights(out)
        got_score, got_maps = _score_and_maps(other, img, rows)
        torch.testing.assert_close(got_score, score, rtol=0, atol=0)
        torch.testing.assert_close(got_maps, maps, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"^{out / WEIGHTS_FILE}: 40 tensors this model does not have"):
        load_backbone(hf_dir, "llava", params={"lora": {**LORA, "target_modules": ["q_proj", "o_proj"]}}) \
            .load_saved_weights(out)
    with pytest.raises(ValueError, match=f"^{out / WEIGHTS_FILE}: .* trained tensors missing .*vision_tower"):
        load_backbone(hf_dir, "llava", params={"lora": LORA, "freeze_vision": False}).load_saved_weights(out)
    hf_dir.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=f"LLaVA base model {hf_dir} not found"):
        load_backbone(out, "llava")


def test_lora_training_checkpoints_hold_the_adapters_and_resume_exactly(tmp_path):
    """Fine-tune a transformers folder with LoRA: each checkpoint holds only what trains, loads
    as the trained model, and a resumed run ends where an uninterrupted one does."""
    from dataclasses import replace

    from hist_vlm.train.config import load_config
    from hist_vlm.train.distributed import setup_environment
    from hist_vlm.train.loop import Trainer
    from train_helpers import tiny_overrides, write_world

    hf_dir = _hf_folder(tmp_path / "hf")
    phrases, images = write_world(tmp_path, size=32)

    def train(run, steps, resume=False):
        cfg = load_config("demo_tiny", tiny_overrides(phrases, images, tmp_path / run, f"run.max_steps={steps}"))
        cfg = replace(cfg, model=replace(cfg.model, name="llava", checkpoint=str(hf_dir), params={"lora": LORA},
                                         derive_vocab=False))
        trainer = Trainer(cfg, setup_environment("cpu"), resume=resume, progress=False)
        return trainer, trainer.run()

    _, first = train("resumed", 1)
    with safe_open(str(first.checkpoint / "model" / WEIGHTS_FILE), "pt") as f:
        assert all("lora_" in k or "multi_modal_projector" in k for k in f.keys())
    resumed, result = train("resumed", 2, resume=True)
    straight, _ = train("straight", 2)
    assert result.global_step == 2
    img, rows = _setup(straight.model.eval())
    torch.testing.assert_close(_score_and_maps(resumed.model.eval(), img, rows),
                               _score_and_maps(straight.model, img, rows), rtol=0, atol=0)
    torch.testing.assert_close(_score_and_maps(load_backbone(result.checkpoint, "llava"), img, rows),
                               _score_and_maps(straight.model, img, rows), rtol=0, atol=0)


def test_second_order_gradient_through_lora_matches_finite_differences(monkeypatch):
    """An addition-style loss (the composite's map against the sum of its parts' maps) through
    create_graph GradCAM: d/dw for an adapter below the captured layer and one above it (only
    the double backward carries gradient there)."""
    float64_rms_norm(monkeypatch)
    torch.manual_seed(0)
    model = _tiny(lora=LORA, dtype=torch.float64)
    _randomize_adapters(model)
    img, rows = _setup(model, ["a dog and two cats", "a dog", "two cats"], (0, 0, 0))
    layer = model.default_capture_layers[0]

    def f():
        maps = gradcam_maps(model, img, rows, layers=(layer,), create_graph=True)
        return (maps[0] - maps[1] - maps[2]).pow(2).sum()

    below = dict(model.named_parameters())["llava.model.language_model.layers.0.self_attn.v_proj.lora_B.default.weight"]
    above = dict(model.named_parameters())["llava.model.language_model.layers.3.mlp.up_proj.lora_A.default.weight"]
    grads = torch.autograd.grad(f(), [below, above])
    for what, param, g in zip(("below", "above"), (below, above), grads):
        check_against_finite_differences(f, param, g, what)


def test_lora_without_peft_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ImportError, match=r"^LoRA needs peft: pip install 'hist-vlm\[lora\]'$"):
        _tiny(lora=LORA)


LLAVA_YAML = """
model:
  name: llava
  params: {size: tiny, freeze_vision: false, lora: {r: 2, alpha: 4}}
  derive_vocab: false
data: {phrases: PHRASES, image_root: IMAGES, image_size: 32, batch_size: 4, max_length: 16, num_workers: 0}
loss: {schedule: constant, capture_layers: [1], add_normalize: minmax}
schedule: {epochs: 2, warmup_steps: 1}
run: {dir: RUNDIR, log_every: 1, save_every: 1000, max_steps: 2}
"""


def test_cli_trains_a_tiny_llava_then_points_sweeps_and_grounds_with_its_checkpoint(tmp_path):
    """The commands work on the decoder unchanged: train (LM + rank + HIST), eval pointing,
    the layer/head sweep, ground; retrieval, which needs ITC and ITM, is one error line."""
    import json

    from typer.testing import CliRunner

    from hist_vlm.cli import app
    from hist_vlm.demo.synthetic import generate_world
    from train_helpers import write_world

    phrases, images = write_world(tmp_path, size=32)
    config = tmp_path / "llava_tiny.yaml"
    config.write_text(LLAVA_YAML.replace("PHRASES", str(phrases)).replace("IMAGES", str(images))
                      .replace("RUNDIR", str(tmp_path / "run")))
    runner, env = CliRunner(), {"COLUMNS": "400"}
    res = runner.invoke(app, ["train", str(config)], env=env)
    assert res.exit_code == 0, res.output
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [x for x in log if "loss" in x]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(x["loss"])) for x in steps)
    assert {"mlm", "rank", "phrase_mlm", "phrase_rank", "subject_rank", "add"} <= set(steps[-1])
    assert not {"itc", "itm", "temp"} & set(steps[-1])
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert isinstance(load_backbone(ckpt, "llava"), LlavaBackbone)
    world = tmp_path / "world"
    generate_world(world, n_train=0, n_val=2, n_test=2, image_size=64, seed=2, progress=False)
    common = ["--checkpoint", str(ckpt), "--data", "synthetic", "--data-root", str(world), "--split", "test",
              "--device", "cpu", "--num-workers", "0"]
    res = runner.invoke(app, ["eval", "pointing", str(config), *common], env=env)
    assert res.exit_code == 0, res.output
    assert "layers [2], head mean" in res.output and "test: pointing" in res.output  # the evaluation map: the middle layer
    res = runner.invoke(app, ["eval", "pointing", str(config), *common, "--sweep", "--sweep-heads", "mean,0",
                              "--out", str(tmp_path / "sweep.jsonl")], env=env)
    assert res.exit_code == 0, res.output
    table = (tmp_path / "sweep.sweep.csv").read_text().splitlines()
    assert len(table) - 1 >= 4 * 2 and "captured in one pass" in res.output  # every decoder layer x (mean, head 0)
    image = next(world.rglob("*.png"))
    res = runner.invoke(app, ["ground", str(image), "a red circle and a blue square", "--checkpoint", str(ckpt),
                              "--config", str(config), "--out", str(tmp_path / "heat.png")], env=env)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["eval", "retrieval", str(config), "--checkpoint", str(ckpt), "--data", "synthetic",
                              "--ann", str(world / "captions_test.jsonl"), "--image-root", str(world)], env=env)
    assert res.exit_code == 2 and "the llava backbone has no ITC features and ITM head" in res.output


def test_a_hist_step_runs_the_shared_positions_once_and_loses_nothing(monkeypatch):
    """One HIST step's LM, rank and GradCAM passes all read the same images: within the step
    their prompt-and-image positions run through the decoder once, and the step's loss and
    gradients are those of passes that each run their own (float64: only the order of the
    gradient sums differs)."""
    from contextlib import nullcontext

    from hist_vlm.losses.hist import HistLoss, HistLossConfig
    from losses_fixtures import hist_batch

    float64_rms_norm(monkeypatch)

    def run():
        torch.manual_seed(0)
        model = _tiny(dtype=torch.float64).train()
        shared = []
        model.language_model.register_forward_pre_hook(
            lambda _, args, kwargs: shared.append(1) if kwargs.get("cache") is None else None, with_kwargs=True)
        loss = HistLoss(HistLossConfig(schedule="constant", capture_layers=(1,), add_normalize="minmax"), model)
        out = loss.to(torch.float64)(model, hist_batch(model), 0.5)
        out["loss"].backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(shared)

    out, grads, passes = run()
    assert passes == 1
    monkeypatch.setattr(LlavaBackbone, "reusing_image_projections", lambda self: nullcontext())
    again, grads_again, passes_again = run()
    assert passes_again == 6  # LM of captions and phrases, rank of 3 kinds, GradCAM
    for key in ("loss", "mlm", "rank", "phrase_mlm", "phrase_rank", "subject_rank", "add"):
        torch.testing.assert_close(out[key], again[key], rtol=1e-12, atol=1e-14)
    assert grads.keys() == grads_again.keys() and len(grads) > 0
    for n, g in grads.items():
        torch.testing.assert_close(g, grads_again[n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")


def test_the_rank_term_is_the_likelihood_ranking_written_out():
    """rank = mean softplus(s(T | other image) - s(T | own image)) over the captions, the other
    image from the first shared-seed draws (the LM term draws nothing); the tiny LLaVA's
    likelihood depends on its image, so the check has something to compare."""
    from hist_vlm.losses.hist import HistLoss, HistLossConfig
    from hist_vlm.losses.itm import sample_rows
    from losses_fixtures import hist_batch

    torch.manual_seed(0)
    model = _tiny()
    batch = hist_batch(model)
    out = HistLoss(HistLossConfig(schedule="off"), model)(model, batch, 0.5)
    caps = batch.captions
    with torch.no_grad():
        image_embeds = model.encode_image(batch.pixel_values)
        other = sample_rows(1.0 - torch.eye(4), torch.rand(4, generator=torch.Generator().manual_seed(0)))
        own = model.text_log_likelihood(caps, image_embeds)
        neg = model.text_log_likelihood(TextRows(caps.input_ids, caps.attention_mask, other), image_embeds)
    assert (own - neg).abs().max() > 1e-4  # the image matters
    torch.testing.assert_close(out["rank"].detach(), torch.nn.functional.softplus(neg - own).mean())
