"""ITC/ITM/MLM pieces and the HIST objective on tiny BLIP and ALBEF."""
import pytest
import torch

from hist_vlm.losses.hist import HistLoss, HistLossConfig, hist_weight
from hist_vlm.losses.itc import ItcQueue, positive_masks, text_keys
from hist_vlm.losses.itm import hard_negatives, sample_rows
from hist_vlm.losses.mlm import mask_tokens
from hist_vlm.losses.terms import addition_loss
from losses_fixtures import hist_batch, tiny_albef, tiny_blip


def test_addition_loss_is_zero_for_additive_maps_and_pulls_toward_the_sum():
    g_i, g_j = torch.rand(3, 4, 4), torch.rand(3, 4, 4)
    assert addition_loss(g_i, g_j, g_i + g_j) == 0
    g_ij = (0.5 * (g_i + g_j)).requires_grad_()  # composite map too small
    loss = addition_loss(g_i, g_j, g_ij)
    assert loss > 0
    (grad,) = torch.autograd.grad(loss, g_ij)
    assert (grad < 0).all()  # increasing G_ij lowers the loss
    g_i2 = g_i.clone().requires_grad_()
    (grad_i,) = torch.autograd.grad(addition_loss(g_i2, g_j, g_ij.detach()), g_i2)
    assert (grad_i > 0).all()  # the parts must shrink


def test_schedules():
    assert [hist_weight("paper", t) for t in (0, 1, 2, 5)] == [1.0, 0.5, 0.0, 0.0]
    assert hist_weight("constant", 7) == 1.0 and hist_weight("off", 0) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        HistLossConfig(schedule="cosine")


def test_identical_texts_are_positives_and_never_sampled_as_negatives():
    model = tiny_blip()
    ids, mask = model.tokenize(["a man", "a dog", "a man", "a cat"])
    keys = text_keys(ids, mask)
    pad = torch.nn.functional.pad  # keys do not depend on how far a row is padded
    torch.testing.assert_close(text_keys(pad(ids, (0, 4)), pad(mask, (0, 4))), keys)
    image_ids = torch.tensor([10, 11, 12, 13])
    pos, pos_i2t = positive_masks(image_ids, keys, image_ids, image_ids, keys, image_ids)
    assert pos[0, 2] and pos[2, 0] and pos_i2t[0, 2] and not pos[0, 1]
    feat = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    # the most similar image of row 0 is image 2, a positive: it must never be drawn
    img_feat = feat.clone()
    img_feat[2] = feat[0]
    u = torch.linspace(0, 0.999, 4)
    for shift in torch.linspace(0, 0.25, 25):
        neg_img, neg_txt = hard_negatives(feat, img_feat, torch.tensor(0.07), pos, (u + shift) % 1, (u + shift) % 1)
        assert not pos[torch.arange(4), neg_img].any()
        assert not pos[neg_txt, torch.arange(4)].any()


def test_sample_rows_is_an_inverse_cdf():
    w = torch.tensor([[0.0, 1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    assert sample_rows(w, torch.tensor([0.0, 0.0])).tolist() == [1, 0]
    assert sample_rows(w, torch.tensor([0.2, 0.99])).tolist() == [1, 3]
    assert sample_rows(w, torch.tensor([0.3, 0.5])).tolist() == [3, 2]


def test_mlm_masking_never_touches_pad_or_cls():
    ids = torch.tensor([[101, 5, 6, 7, 0, 0]] * 200)
    mask = (ids != 0).long()
    u = torch.rand(3, *ids.shape, generator=torch.Generator().manual_seed(0))
    masked, labels = mask_tokens(ids, mask, u, mask_id=103, vocab_size=1000, never_mask=(0, 101))
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 4:].any()
    assert 0.08 < chosen[:, 1:4].float().mean() < 0.25
    assert ((masked == 103) == (chosen & (u[1] < 0.8))).all()
    assert (masked[~chosen] == ids[~chosen]).all()


def test_queue_wraps_around():
    q = ItcQueue(dim=2, size=5)
    for step in range(3):
        f = torch.full((2, 2), float(step))
        q.enqueue(f, f, torch.tensor([step, step]))
    assert q.ptr.item() == 1
    assert q.id_queue.tolist() == [2, 0, 1, 1, 2]


@pytest.mark.parametrize("name", ["blip", "albef"])
def test_every_loss_runs_with_finite_values_and_reaches_the_parameters(name):
    model = tiny_blip() if name == "blip" else tiny_albef()
    batch = hist_batch(model)
    loss_fn = HistLoss(HistLossConfig(schedule="constant", capture_layers=(1,), queue_size=12), model)
    out = loss_fn(model, batch, progress=0.5)
    terms = ["itc", "itm", "mlm", "phrase_itc", "phrase_itm", "phrase_mlm", "subject_itc", "subject_itm", "add"]
    for key in terms + ["loss"]:
        assert torch.isfinite(out[key]), key
        assert out[key] > 0, key
    expected = sum(out[k] for k in terms)
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    named = dict(model.named_parameters())
    if name == "blip":
        must = ["retrieval.itm_head.weight", "retrieval.vision_proj.weight", "retrieval.text_proj.weight", "temp",
                "retrieval.text_encoder.encoder.layer.2.crossattention.self.key.weight",
                "decoder.bert.encoder.layer.0.output.dense.weight",
                "retrieval.vision_model.embeddings.patch_embedding.weight"]
    else:
        must = ["itm_head.weight", "vision_proj.weight", "text_proj.weight", "temp",
                "text_encoder.cls.predictions.transform.dense.weight", "visual_encoder.patch_embed.proj.weight"]
        assert all(p.grad is None for n, p in named.items() if "_m." in n), "momentum twin got gradient"
    for n in must:
        assert named[n].grad is not None and named[n].grad.abs().sum() > 0, n
    if name == "albef":
        assert loss_fn.itc.queue.ptr.item() == 4  # the 4 captions were enqueued


def test_addition_term_alone_trains_layers_above_the_capture():
    """Only create_graph carries the addition loss into the ITM head and the layers above."""
    model = tiny_blip()
    cfg = HistLossConfig(schedule="constant", capture_layers=(1,))
    out = HistLoss(cfg, model)(model, hist_batch(model), 0.0)
    (g,) = torch.autograd.grad(out["add"], [model.retrieval.itm_head.weight])
    assert g.abs().sum() > 0


def test_off_schedule_is_the_baseline_and_skips_hist_terms():
    model = tiny_albef()
    batch = hist_batch(model)
    calls = []
    orig = model.fuse_rows
    model.fuse_rows = lambda *a, **k: calls.append(k.get("capture_layer")) or orig(*a, **k)
    out = HistLoss(HistLossConfig(schedule="off", capture_layers=(1,), queue_size=8), model)(model, batch, 0.0)
    assert out["hist_weight"] == 0 and out["add"] == 0 and out["phrase_itc"] == 0
    torch.testing.assert_close(out["loss"], out["itc"] + out["itm"] + out["mlm"])
    assert calls == [None]  # one fusion pass: the captions' ITM; no GradCAM capture


@pytest.mark.parametrize("name", ["blip", "albef"])
def test_one_fusion_pass_for_all_itm_terms_equals_separate_passes(name):
    from hist_vlm.losses.itm import itm_block, itm_losses

    model = (tiny_blip if name == "blip" else tiny_albef)(dtype=torch.float64).eval()
    batch = hist_batch(model)
    img = model.encode_image(batch.pixel_values)
    img_feat = model.image_features(img)
    blocks = []
    for rows in (batch.captions, batch.subjects):  # different padded lengths
        emb = model.encode_text(rows.input_ids, rows.attention_mask)
        blocks.append(itm_block(
            img, rows, text_embeds=emb, text_feat=model.text_features(emb), image_feat=img_feat,
            image_ids=batch.image_ids, keys=text_keys(rows.input_ids, rows.attention_mask),
            temp=torch.tensor(0.07), u_text=torch.rand(4), u_image=torch.rand(4),
        ))
    assert blocks[0].rows.input_ids.shape[1] != blocks[1].rows.input_ids.shape[1]
    merged = itm_losses(model, img, blocks)
    separate = [itm_losses(model, img, [blk])[0] for blk in blocks]
    torch.testing.assert_close(torch.stack(merged), torch.stack(separate))


def test_addition_loss_normalisations_by_value():
    g = torch.Generator().manual_seed(3)
    g_i, g_j, g_ij = (torch.rand(2, 3, 3, generator=g) for _ in range(3))

    def mm(x):  # SelfEQ's per-map min-max, written out: g -= g.min(); g /= g.max() + 1e-7
        x = x - x.flatten(1).min(1).values[:, None, None]
        return x / (x.flatten(1).max(1).values[:, None, None] + 1e-7)

    want_mm = (mm(g_i) + mm(g_j) - mm(g_ij)).abs().sum((1, 2)).mean()
    torch.testing.assert_close(addition_loss(g_i, g_j, g_ij, normalize="minmax"), want_mm)
    p = (g_i + g_j) / (g_i + g_j).sum((1, 2), keepdim=True)
    q = g_ij / g_ij.sum((1, 2), keepdim=True)
    torch.testing.assert_close(addition_loss(g_i, g_j, g_ij, normalize="distribution"), (p - q).abs().sum((1, 2)).mean())
    # distribution: free of the scale of either side (shrinking every map changes nothing) ...
    torch.testing.assert_close(addition_loss(0.01 * g_i, 0.01 * g_j, 5 * g_ij, normalize="distribution"),
                               addition_loss(g_i, g_j, g_ij, normalize="distribution"))
    # ... while the raw formula is lowered by shrinking all three maps
    assert addition_loss(0.01 * g_i, 0.01 * g_j, 0.01 * g_ij) < addition_loss(g_i, g_j, g_ij)
    # a composite that looks where its parts look together, at any scale, costs nothing
    assert addition_loss(g_i, g_j, 0.5 * (g_i + g_j), normalize="distribution") < 1e-6
    with pytest.raises(ValueError, match="add_normalize"):
        HistLossConfig(add_normalize="softmax")


def test_gradcam_minmax_option_is_selfeqs_minmax_of_each_map():
    from hist_vlm.losses.gradcam import gradcam_maps

    model = tiny_albef().eval()
    batch = hist_batch(model)
    with torch.no_grad():
        image_embeds = model.encode_image(batch.pixel_values)
    raw = gradcam_maps(model, image_embeds, batch.phrases, layers=[0])
    mm = gradcam_maps(model, image_embeds, batch.phrases, layers=[0], normalize="minmax")
    lo = raw.flatten(1).min(1).values[:, None, None]
    span = raw.flatten(1).max(1).values - raw.flatten(1).min(1).values  # [N] each map's range r
    torch.testing.assert_close(mm, (raw - lo) / (span[:, None, None] + 1e-7))  # SelfEQ's min-max
    torch.testing.assert_close(mm.flatten(1).max(1).values, span / (span + 1e-7))  # r / (r + 1e-7), not 1
    assert (mm.flatten(1).min(1).values == 0).all()
    with pytest.raises(ValueError, match="normalisation"):
        gradcam_maps(model, image_embeds, batch.phrases, layers=[0], normalize="l2")


def test_hard_negatives_never_draw_a_positive_when_the_softmax_underflows():
    # row i is most similar to its own image; at temp 1e-3 the other columns' softmax weights
    # underflow to 0 in float32 when the positives are masked after the softmax
    feat = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]]), dim=1)
    pos = torch.eye(3, dtype=torch.bool)
    for u in torch.linspace(0, 0.999, 50):
        neg_img, neg_txt = hard_negatives(feat, feat, torch.tensor(1e-3), pos, u.repeat(3), u.repeat(3))
        assert not pos[torch.arange(3), neg_img].any() and not pos[neg_txt, torch.arange(3)].any()


def test_a_step_projects_each_image_to_keys_and_values_once_and_loses_nothing(monkeypatch):
    """ALBEF: one HIST step fuses its images for ITM (3 kinds), MLM (2 kinds, + momentum) and
    GradCAM; every cross-attention layer projects them to keys/values once (online and
    momentum), and the step's loss and gradients are those of passes that recompute them."""
    from contextlib import nullcontext

    from hist_vlm.models.albef import AlbefModel, AlbefSelfAttention

    def run():
        torch.manual_seed(0)
        model = tiny_albef().train()
        calls: dict[str, int] = {}
        for name, m in model.named_modules():
            if isinstance(m, AlbefSelfAttention) and "crossattention" in name:
                m.key.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
        out = HistLoss(HistLossConfig(schedule="constant", capture_layers=(0,)), model)(model, hist_batch(model), 0.5)
        out["loss"].backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls

    out, grads, calls = run()
    online = {n: c for n, c in calls.items() if "_m." not in n}
    assert len(online) == 2 and set(online.values()) == {1}              # the tiny ALBEF's 2 cross-attention layers
    assert len(calls) == 4 and set(calls.values()) == {1}                 # + the momentum copies (MLM distillation)
    monkeypatch.setattr(AlbefModel, "reusing_image_projections", lambda self: nullcontext())
    again, grads_again, calls_again = run()
    assert calls_again == {n: 6 if "_m." not in n else 2 for n in calls}  # per pass: ITM x3, MLM x2, GradCAM
    for key in ("loss", "itm", "phrase_itm", "phrase_mlm", "subject_itm", "add"):
        torch.testing.assert_close(out[key], again[key], rtol=0, atol=0)
    assert grads.keys() == grads_again.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, grads_again[n], rtol=1e-5, atol=1e-8, msg=lambda m: f"{n}: {m}")
