"""The HIST objective by value: every term recomputed here from its formula, on tiny float64
models and hand-made inputs, and compared with what the library returns.

    L = L_vl + w(t) * (l_p L_phrase + l_s L_subject + l_a L_add)
    L_add = mean over pairs of sum over patches |G_i + G_j - G_ij|
    ITM negatives ~ softmax(sim / temp), positives excluded; ITC targets
    alpha * softmax(momentum sim / temp) + (1 - alpha) * ground truth; MLM 15%, 80/10/10.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import hist_vlm.losses.terms as terms_module
from hist_vlm.losses.terms import addition_loss
from hist_vlm.losses.gradcam import gradcam_maps
from hist_vlm.losses.hist import HistLoss, HistLossConfig, hist_weight
from hist_vlm.losses.itc import ItcLoss, text_keys
from hist_vlm.losses.itm import hard_negatives, itm_block
from hist_vlm.losses.mlm import mask_tokens
from hist_vlm.batch import HistBatch, TextRows
from losses_fixtures import CAPTIONS, PAIRS, PHRASES, hist_batch, pairs_only_on, rows, tiny_albef

F64 = dict(rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- hand formulas

def hand_positives(texts: list[str], row_image: list[int], n_images: int):
    """t2i [N, B]: the row's own image, or an image holding the same text; i2t [B, N]: the
    image holds a text equal to row n."""
    n = len(texts)
    t2i = torch.zeros(n, n_images, dtype=torch.bool)
    i2t = torch.zeros(n_images, n, dtype=torch.bool)
    for a in range(n):
        for b in range(n_images):
            t2i[a, b] = row_image[a] == b or any(texts[m] == texts[a] and row_image[m] == b for m in range(n))
            i2t[b, a] = any(row_image[m] == b and texts[m] == texts[a] for m in range(n))
    return t2i, i2t


def soft_ce_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.log_softmax(1)).sum(1).mean()


def hand_itc(text_feat, image_feat, texts, row_image, temp) -> torch.Tensor:
    """In-batch multi-positive ITC without momentum: (t2i + i2t) / 2."""
    t2i, i2t = hand_positives(texts, row_image, image_feat.shape[0])
    sim = text_feat @ image_feat.t() / temp  # [N, B]
    tgt_t2i = t2i.double() / t2i.sum(1, keepdim=True)
    tgt_i2t = i2t.double() / i2t.sum(1, keepdim=True)
    return (soft_ce_mean(sim, tgt_t2i) + soft_ce_mean(sim.t(), tgt_i2t)) / 2


def hand_sample(weights: torch.Tensor, u: float) -> int:
    """Inverse CDF of one row of non-negative weights: the first k with cdf_k > u * total."""
    total = float(weights.sum())
    acc = 0.0
    for k, w in enumerate(weights.tolist()):
        acc += w
        if acc > u * total:
            return k
    return len(weights) - 1


# ----------------------------------------------------------------------------- w(t) and the total

def test_schedule_weight_at_several_progress_points():
    points = (0.0, 0.3, 1.0, 1.7, 2.0, 3.5)
    assert [hist_weight("paper", t) for t in points] == pytest.approx([1.0, 0.85, 0.5, 0.15, 0.0, 0.0])
    assert [hist_weight("paper", t, ramp_epochs=4.0) for t in points] == pytest.approx(
        [1.0, 1 - 0.3 / 4, 0.75, 1 - 1.7 / 4, 0.5, 1 - 3.5 / 4])
    assert hist_weight("paper", -1.0) == 1.0  # before the start: the full weight
    assert [hist_weight("constant", t) for t in points] == [1.0] * len(points)
    assert [hist_weight("off", t) for t in points] == [0.0] * len(points)


@pytest.mark.parametrize("progress, ramp, w", [(0.5, 2.0, 0.75), (3.0, 4.0, 0.25)])
def test_total_is_vl_plus_weighted_lambda_sum_of_hist_terms(progress, ramp, w):
    model = tiny_albef(dtype=torch.float64)
    lp, ls, la = 0.3, 1.7, 2.5
    cfg = HistLossConfig(schedule="paper", paper_ramp_epochs=ramp, lambda_phrase=lp, lambda_subject=ls,
                         lambda_add=la, capture_layers=(0,), queue_size=8)
    out = HistLoss(cfg, model)(model, hist_batch(model), progress)
    assert float(out["hist_weight"]) == pytest.approx(w)
    vl = out["itc"] + out["itm"] + out["mlm"]
    phrase = out["phrase_itc"] + out["phrase_itm"] + out["phrase_mlm"]
    subject = out["subject_itc"] + out["subject_itm"]
    hist = lp * phrase + ls * subject + la * out["add"]
    assert float(hist.detach()) > 0.1  # the weight matters at this size
    torch.testing.assert_close(out["loss"], vl + w * hist, **F64)
    # neither of the easy wrong totals
    assert abs(float((out["loss"] - (vl + hist)).detach())) > 0.05
    assert abs(float((out["loss"] - (vl + w * (phrase + subject + out["add"]))).detach())) > 0.05


def test_mlm_weight_scales_both_language_terms_and_zero_skips_the_pass(monkeypatch):
    """l_m multiplies the caption and the phrase MLM; l_m = 0 (retrieval fine-tuning) never
    runs the MLM head, and the rest of the total is unchanged."""
    model = tiny_albef(dtype=torch.float64)
    batch = hist_batch(model)
    base = dict(schedule="constant", capture_layers=(0,), queue_size=0)  # no random initial queue
    full = HistLoss(HistLossConfig(**base), model)(model, batch, 0.5)
    half = HistLoss(HistLossConfig(**base, mlm_weight=0.5), model)(model, batch, 0.5)
    assert float(full["mlm"].detach()) > 0.1 and float(full["phrase_mlm"].detach()) > 0.1
    expected = full["loss"] - 0.5 * (full["mlm"] + full["phrase_mlm"])
    torch.testing.assert_close(half["loss"], expected, **F64)

    def no_mlm(*args, **kwargs):
        raise AssertionError("mlm_weight=0 must not run the MLM head")

    monkeypatch.setattr(model, "mlm_logits", no_mlm)
    off = HistLoss(HistLossConfig(**base, mlm_weight=0.0), model)(model, batch, 0.5)
    assert float(off["mlm"]) == 0.0 and float(off["phrase_mlm"]) == 0.0
    torch.testing.assert_close(off["loss"], full["loss"] - full["mlm"] - full["phrase_mlm"], **F64)
    with pytest.raises(ValueError, match="mlm_weight"):
        HistLossConfig(mlm_weight=-1.0)


def test_a_zero_weight_addition_term_is_skipped_and_changes_nothing_else(monkeypatch):
    """lambda_add = 0 (the ablation's "+ phrase" row) computes no GradCAM map; every other
    term keeps its value (the addition term draws nothing) and the total is theirs."""
    import hist_vlm.losses.terms as terms

    model = tiny_albef(dtype=torch.float64)
    batch = hist_batch(model)
    base = dict(schedule="constant", capture_layers=(0,), queue_size=0)
    full = HistLoss(HistLossConfig(**base), model)(model, batch, 0.5)
    assert float(full["add"].detach()) > 0

    def no_maps(*args, **kwargs):
        raise AssertionError("lambda_add=0 must not compute GradCAM maps")

    monkeypatch.setattr(terms, "gradcam_maps", no_maps)
    off = HistLoss(HistLossConfig(**base, lambda_add=0.0), model)(model, batch, 0.5)
    assert float(off["add"]) == 0.0
    for key in ("itc", "itm", "mlm", "phrase_itc", "phrase_itm", "phrase_mlm", "subject_itc", "subject_itm"):
        torch.testing.assert_close(off[key], full[key], **F64)
    torch.testing.assert_close(off["loss"], full["loss"] - full["add"], **F64)


# ----------------------------------------------------------------------------- the addition term

def test_addition_term_is_the_sum_rule_on_the_pair_rows():
    """|G_i + G_j - G_ij| summed over patches, averaged over the pairs, with G recomputed here
    from pair_first / pair_second / composites (only images 1 and 3 have pairs)."""
    model = tiny_albef(dtype=torch.float64)
    batch = pairs_only_on(hist_batch(model), [1, 3])
    cfg = HistLossConfig(schedule="constant", capture_layers=(0,), queue_size=8)
    out = HistLoss(cfg, model)(model, batch, 0.5)

    image_embeds = model.encode_image(batch.pixel_values)
    g = [gradcam_maps(model, image_embeds, r, layers=(0,), recipe="train")
         for r in (batch.pair_first, batch.pair_second, batch.composites)]  # 3 x [2, gh, gw]
    assert g[0].shape == (2, *model.patch_grid)
    per_pair = [float((g[0][k] + g[1][k] - g[2][k]).abs().sum()) for k in range(2)]
    expected = sum(per_pair) / 2
    assert float(out["add"].detach()) == pytest.approx(expected, rel=1e-6)
    # the roles of the three maps are not interchangeable here
    swapped = float((g[0] + g[2] - g[1]).abs().sum((1, 2)).mean())
    assert abs(swapped - expected) > 1e-3 * expected
    # and the maps are those of the pair rows' own images
    other = TextRows(batch.pair_first.input_ids, batch.pair_first.attention_mask, torch.tensor([0, 2]))
    assert not torch.allclose(gradcam_maps(model, image_embeds, other, layers=(0,)), g[0])


# ----------------------------------------------------------------------------- ITM hard negatives

def _sim_setup():
    torch.manual_seed(3)
    text_feat = F.normalize(torch.randn(3, 6, dtype=torch.float64), dim=1)
    image_feat = F.normalize(torch.randn(4, 6, dtype=torch.float64), dim=1)
    pos = torch.zeros(3, 4, dtype=torch.bool)
    pos[0, 0] = pos[1, 1] = pos[2, 2] = pos[2, 3] = True   # text 2 is positive for images 2 and 3
    temp = torch.tensor(0.25, dtype=torch.float64)
    return text_feat, image_feat, pos, temp


def _hand_weights(text_feat, image_feat, pos, temp, sign=1.0):
    sim = sign * (text_feat @ image_feat.t()) / temp
    w_t2i = torch.exp(sim - sim.max(1, keepdim=True).values)
    w_t2i = (w_t2i / w_t2i.sum(1, keepdim=True)) * ~pos                  # [N, B]
    w_i2t = torch.exp(sim.t() - sim.t().max(1, keepdim=True).values)
    w_i2t = (w_i2t / w_i2t.sum(1, keepdim=True)) * ~pos.t()              # [B, N]
    return w_t2i, w_i2t


def test_hard_negatives_are_the_inverse_cdf_of_masked_softmax_similarity():
    text_feat, image_feat, pos, temp = _sim_setup()
    w_t2i, w_i2t = _hand_weights(text_feat, image_feat, pos, temp)
    for u in torch.linspace(0.01, 0.99, 23, dtype=torch.float64):
        neg_img, neg_txt = hard_negatives(text_feat, image_feat, temp, pos, u.repeat(3), u.repeat(4))
        assert neg_img.tolist() == [hand_sample(w_t2i[n], float(u)) for n in range(3)]
        assert neg_txt.tolist() == [hand_sample(w_i2t[b], float(u)) for b in range(4)]


def test_hard_negative_frequencies_follow_softmax_of_itc_similarity():
    """Many evenly spread uniform draws: the frequency of each negative is its masked
    softmax(sim / temp) probability (and far from softmax(-sim / temp))."""
    text_feat, image_feat, pos, temp = _sim_setup()
    m = 2000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    freq_t2i = torch.zeros(3, 4, dtype=torch.float64)
    freq_i2t = torch.zeros(4, 3, dtype=torch.float64)
    # each text (image) drawn m times: repeat the rows, keep the columns
    neg_img, _ = hard_negatives(text_feat.repeat_interleave(m, 0), image_feat, temp,
                                pos.repeat_interleave(m, 0), u.repeat(3), torch.zeros(4))
    _, neg_txt = hard_negatives(text_feat, image_feat.repeat_interleave(m, 0), temp,
                                pos.repeat_interleave(m, 1), torch.zeros(3), u.repeat(4))
    for r, k in zip(torch.arange(3).repeat_interleave(m).tolist(), neg_img.tolist()):
        freq_t2i[r, k] += 1 / m
    for r, k in zip(torch.arange(4).repeat_interleave(m).tolist(), neg_txt.tolist()):
        freq_i2t[r, k] += 1 / m
    w_t2i, w_i2t = _hand_weights(text_feat, image_feat, pos, temp)
    p_t2i, p_i2t = w_t2i / w_t2i.sum(1, keepdim=True), w_i2t / w_i2t.sum(1, keepdim=True)
    torch.testing.assert_close(freq_t2i, p_t2i, rtol=0, atol=2.0 / m)
    torch.testing.assert_close(freq_i2t, p_i2t, rtol=0, atol=2.0 / m)
    e_t2i, _ = _hand_weights(text_feat, image_feat, pos, temp, sign=-1.0)
    assert (freq_t2i - e_t2i / e_t2i.sum(1, keepdim=True)).abs().max() > 0.2


def test_itm_block_lays_out_positives_and_sampled_negatives():
    """The fusion rows of one ITM term: the N positives, each text with its drawn negative
    image, each image with its drawn negative text; labels 1, 0, 0."""
    text_feat, image_feat, pos, temp = _sim_setup()
    ids = torch.tensor([[101, 7, 102, 0], [101, 8, 9, 102], [101, 10, 102, 0]])
    mask = (ids != 0).long()
    rws = TextRows(ids, mask, torch.tensor([0, 1, 2]))
    image_ids = torch.tensor([50, 51, 52, 52])  # images 2 and 3 are one dataset image
    u_text, u_image = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), torch.tensor([0.2, 0.4, 0.6, 0.95])
    embeds = torch.randn(3, 4, 5)
    blk = itm_block(torch.zeros(4, 2, 5), rws, text_embeds=embeds, text_feat=text_feat, image_feat=image_feat,
                    image_ids=image_ids, keys=text_keys(ids, mask), temp=temp, u_text=u_text, u_image=u_image)
    w_t2i, w_i2t = _hand_weights(text_feat, image_feat, pos, temp)
    neg_img = [hand_sample(w_t2i[n], float(u_text[n])) for n in range(3)]
    neg_txt = [hand_sample(w_i2t[b], float(u_image[b])) for b in range(4)]
    assert blk.labels.tolist() == [1] * 3 + [0] * 7
    assert blk.rows.image_index.tolist() == [0, 1, 2] + neg_img + [0, 1, 2, 3]
    assert torch.equal(blk.rows.input_ids, torch.cat([ids, ids, ids[neg_txt]]))
    assert torch.equal(blk.embeds, torch.cat([embeds, embeds, embeds[neg_txt]]))


# ----------------------------------------------------------------------------- ITC distillation

def test_itc_distillation_targets_weigh_the_momentum_softmax_by_alpha():
    torch.manual_seed(1)
    f = lambda n: F.normalize(torch.randn(n, 6, dtype=torch.float64), dim=1)  # noqa: E731
    image_feat, text_feat, image_feat_m, text_feat_m = f(3), f(4), f(3), f(4)
    ids = torch.tensor([[101, 5, 102], [101, 6, 102], [101, 7, 102], [101, 8, 102]])
    mask = torch.ones_like(ids)
    image_ids = torch.tensor([20, 21, 22])
    row_image = [0, 1, 2, 0]  # image 0 has two texts
    itc = ItcLoss(embed_dim=6, queue_size=2).double()
    queue = itc.queue
    queue.id_queue.copy_(torch.tensor([21, -100]))  # one queued pair belongs to image 21
    temp, alpha = torch.tensor(0.2, dtype=torch.float64), 0.3
    args = (image_feat, text_feat, image_ids, torch.tensor(row_image), text_keys(ids, mask), temp)
    got = itc(*args, image_feat_m=image_feat_m, text_feat_m=text_feat_m, alpha=alpha)

    def expected(a: float) -> float:
        img_cols = torch.cat([image_feat_m, queue.image_queue])  # [3 + 2, E]
        txt_cols = torch.cat([text_feat_m, queue.text_queue])    # [4 + 2, E]
        gt_t2i = torch.zeros(4, 5, dtype=torch.float64)
        gt_i2t = torch.zeros(3, 6, dtype=torch.float64)
        for n in range(4):
            gt_t2i[n, row_image[n]] = 1
            gt_t2i[n, 3] = float(n == 1)   # queue slot 0 holds image 21 = image 1
        for b in range(3):
            for n in range(4):
                gt_i2t[b, n] = float(row_image[n] == b)
            gt_i2t[b, 4] = float(b == 1)
        gt_t2i /= gt_t2i.sum(1, keepdim=True)
        gt_i2t /= gt_i2t.sum(1, keepdim=True)
        tgt_t2i = a * (text_feat_m @ img_cols.t() / temp).softmax(1) + (1 - a) * gt_t2i
        tgt_i2t = a * (image_feat_m @ txt_cols.t() / temp).softmax(1) + (1 - a) * gt_i2t
        t2i = soft_ce_mean(text_feat @ img_cols.t() / temp, tgt_t2i)
        i2t = soft_ce_mean(image_feat @ txt_cols.t() / temp, tgt_i2t)
        return float((t2i + i2t) / 2)

    assert float(got) == pytest.approx(expected(alpha), rel=1e-9)
    assert abs(expected(alpha) - expected(1 - alpha)) > 0.05  # the test tells alpha from 1 - alpha
    # alpha 0: the ground truth alone, the momentum features only as columns
    got0 = itc(*args, image_feat_m=image_feat_m, text_feat_m=text_feat_m, alpha=0.0)
    assert float(got0) == pytest.approx(expected(0.0), rel=1e-9)


# ----------------------------------------------------------------------------- MLM masking

def test_mlm_masks_exactly_15_percent_with_an_80_10_10_split():
    """Evenly spread uniforms on 800 maskable tokens: exactly 120 chosen; of those 96 become
    [MASK], 12 a random token floor(u2 * V), 12 stay; CLS and PAD never, even with u = 0."""
    n, t, vocab, mask_id = 10, 91, 30522, 103
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, t), generator=g)
    ids[:, 0], ids[:, 81:] = 101, 0
    att = (ids != 0).long()
    eligible = torch.zeros(n, t, dtype=torch.bool)
    eligible[:, 1:81] = True
    u = torch.zeros(3, n, t)                          # u0 = 0 on CLS / PAD: chosen unless excluded
    u[0][eligible] = (torch.randperm(800, generator=g).double() + 0.5).float() / 800
    chosen = eligible & (u[0] < 0.15)
    assert int(chosen.sum()) == 120
    u[1][chosen] = (torch.arange(120).double() + 0.5).float() / 120   # rank among the chosen
    u[2] = torch.rand(n, t, generator=g)
    masked, labels = mask_tokens(ids, att, u, mask_id=mask_id, vocab_size=vocab, never_mask=(0, 101))

    assert torch.equal(labels != -100, chosen)
    assert torch.equal(labels[chosen], ids[chosen])
    to_mask = chosen & (u[1] < 0.8)
    to_random = chosen & (u[1] >= 0.8) & (u[1] < 0.9)
    kept = chosen & (u[1] >= 0.9)
    assert (int(to_mask.sum()), int(to_random.sum()), int(kept.sum())) == (96, 12, 12)
    assert (masked[to_mask] == mask_id).all()
    assert masked[to_random].tolist() == [math.floor(float(x) * vocab) for x in u[2][to_random]]
    assert torch.equal(masked[kept], ids[kept]) and torch.equal(masked[~chosen], ids[~chosen])


# ----------------------------------------------------------------------------- phrase and subject terms

PERM = [2, 0, 3, 1]  # phrase / subject row k belongs to image PERM[k]


def permuted_batch(model) -> HistBatch:
    """Captions in image order; phrase and subject rows shuffled across images (each still
    with its own image); subjects "man" twice (images 0 and 2)."""
    base = hist_batch(model)
    size = model.image_size
    assert base.pixel_values.shape[-1] == size
    return HistBatch(
        base.pixel_values, base.image_ids, base.captions,
        rows(model, [PHRASES[i][0] for i in PERM], PERM),
        rows(model, [PHRASES[i][1] for i in PERM], PERM),
        base.pair_first, base.pair_second, base.composites,
    )


def _spy_run(model, batch, monkeypatch, **cfg):
    """HistLoss forward recording the ITM fusion passes (one per kind: captions, phrases,
    subjects, each at its own padded length) and every MLM mask."""
    fusions, masks = [], []
    orig_fuse = model.fuse_rows

    def fuse_spy(rws, image_embeds, **kw):
        if kw.get("capture_layer") is None:
            fusions.append(rws)
        return orig_fuse(rws, image_embeds, **kw)

    real_mask = terms_module.mask_tokens

    def mask_spy(*a, **kw):
        out = real_mask(*a, **kw)
        masks.append((out, kw["probability"]))
        return out

    monkeypatch.setattr(model, "fuse_rows", fuse_spy)
    monkeypatch.setattr(terms_module, "mask_tokens", mask_spy)
    loss = HistLoss(HistLossConfig(schedule="constant", capture_layers=(0,), **cfg), model)
    out = loss(model, batch, 0.0)
    monkeypatch.undo()
    assert len(fusions) == 3
    kinds = (batch.captions, batch.phrases, batch.subjects)
    assert [f.input_ids.shape[1] for f in fusions] == [k.input_ids.shape[1] for k in kinds]
    return out, fusions, masks


def _check_itm_block(model, image_embeds, block: TextRows, texts: TextRows, text_list, out_value):
    """Positives = the rows themselves; negatives never positives; loss = CE with 1, 0, 0."""
    n, b = len(texts), image_embeds.shape[0]
    t = texts.input_ids.shape[1]
    assert len(block) == 2 * n + b and (block.input_ids[:, t:] == 0).all()
    assert torch.equal(block.input_ids[:n, :t], texts.input_ids)
    assert torch.equal(block.image_index[:n], texts.image_index)
    t2i, _ = hand_positives(text_list, texts.image_index.tolist(), b)
    for k in range(n):
        assert not t2i[k, block.image_index[n + k]], "a positive image drawn as negative"
        assert torch.equal(block.input_ids[n + k, :t], texts.input_ids[k])
    assert block.image_index[2 * n:].tolist() == list(range(b))
    for bi in range(b):
        src = [k for k in range(n) if torch.equal(block.input_ids[2 * n + bi, :t], texts.input_ids[k])]
        assert src and not t2i[src[0], bi], "a positive text drawn as negative"
    logits = model.itm_logits(model.fuse_rows(block, image_embeds))  # [2n+b, 2]
    labels = torch.tensor([1] * n + [0] * (n + b))
    expected = -logits.log_softmax(1)[torch.arange(2 * n + b), labels].mean()
    torch.testing.assert_close(out_value, expected, **F64)


def test_phrase_terms_itc_itm_and_mlm_by_value(monkeypatch):
    model = tiny_albef(momentum=False, dtype=torch.float64)
    batch = permuted_batch(model)
    out, fused, masks = _spy_run(model, batch, monkeypatch, mlm_probability=0.5)
    phrases = [PHRASES[i][0] for i in PERM]
    image_embeds = model.encode_image(batch.pixel_values)
    feat = lambda r: model.text_features(model.encode_text(r.input_ids, r.attention_mask))  # noqa: E731
    img_feat = model.image_features(image_embeds)
    temp = out["temp"]

    # ITC: phrase k against image PERM[k]; "a man" of images 0 and 2 positive for both
    torch.testing.assert_close(out["phrase_itc"], hand_itc(feat(batch.phrases), img_feat, phrases, PERM, temp), **F64)
    # ITM: the phrases' fusion pass (the second of captions, phrases, subjects)
    block = fused[1]
    _check_itm_block(model, image_embeds, block, batch.phrases, phrases, out["phrase_itm"])
    # MLM: the phrases' masks (second of two: captions, phrases), cross-entropy on the masked tokens
    assert [p for _, p in masks] == [0.5, 0.5]
    (masked, labels), _ = masks[1]
    sel = labels != -100
    assert int(sel.sum()) >= 2 and not sel[:, 0].any()
    logits = model.mlm_logits(masked, batch.phrases.attention_mask, image_embeds, batch.phrases.image_index)
    expected = -logits.log_softmax(-1)[sel].gather(1, labels[sel].unsqueeze(1)).mean()
    torch.testing.assert_close(out["phrase_mlm"], expected, **F64)


def test_subject_terms_pair_each_subject_with_its_phrase_image(monkeypatch):
    model = tiny_albef(momentum=False, dtype=torch.float64)
    batch = permuted_batch(model)
    assert torch.equal(batch.subjects.image_index, batch.phrases.image_index)
    out, fused, _ = _spy_run(model, batch, monkeypatch)
    subjects = [PHRASES[i][1] for i in PERM]
    assert subjects.count("man") == 2
    image_embeds = model.encode_image(batch.pixel_values)
    sub_feat = model.text_features(model.encode_text(batch.subjects.input_ids, batch.subjects.attention_mask))
    img_feat = model.image_features(image_embeds)
    expected = hand_itc(sub_feat, img_feat, subjects, PERM, out["temp"])
    torch.testing.assert_close(out["subject_itc"], expected, **F64)
    # paired with image k instead of its phrase's image, the value would differ
    assert abs(float((hand_itc(sub_feat, img_feat, subjects, [0, 1, 2, 3], out["temp"]) - expected).detach())) > 1e-3
    block = fused[2]
    _check_itm_block(model, image_embeds, block, batch.subjects, subjects, out["subject_itm"])
