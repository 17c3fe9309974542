"""Retrieval evaluation end to end on the synthetic world's test split: a scripted backbone whose
features and ITM logits are known tables, and tiny random ALBEF and BLIP against a per-pair
reference."""
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hist_vlm.data.retrieval import read_caption_corpus
from hist_vlm.demo.synthetic import generate_world
from hist_vlm.eval.retrieval import NOT_RERANKED, evaluate_retrieval
from hist_vlm.eval.grounding import eval_transform
from hist_vlm.batch import TextRows
from hist_vlm.models.base import ContrastiveModel, FusionOutput, MatchingModel
from losses_fixtures import tiny_albef, tiny_blip

E = 8  # feature size of the scripted backbone


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = generate_world(root, n_train=0, n_val=0, n_test=5, image_size=32, seed=1, progress=False)
    return read_caption_corpus(paths.captions["test"])


def pixel_code(image: Image.Image) -> int:
    return zlib.crc32(np.asarray(image.convert("RGB")).tobytes())


def text_code(text: str) -> int:
    return zlib.crc32(text.encode())


def unit_vector(kind: int, code: int) -> np.ndarray:
    v = np.random.default_rng([kind, code]).standard_normal(E)
    return v / np.linalg.norm(v)


def random_logit(image: int, text: int) -> float:
    return float(np.random.default_rng([2, image, text]).standard_normal())


class ScriptedBackbone(nn.Module, ContrastiveModel, MatchingModel):
    """The members of the protocol that retrieval uses, over content codes: an image is its
    pixels' crc32, a text its crc32; ITC features are seeded unit vectors of the codes and the
    ITM match logit is `itm(image, text)`. It counts encoded images and records every pair it fuses."""

    max_text_length = 64
    name = "scripted"
    embed_dim = E

    def __init__(self, itm):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # codes stay exact in float64
        self.itm, self.images_encoded, self.fused = itm, 0, []

    @staticmethod
    def preprocess(image):
        return torch.tensor([pixel_code(image)], dtype=torch.float64)  # [1]

    def tokenize(self, texts, max_length=None):
        ids = torch.tensor([[text_code(t)] for t in texts])  # [N, 1]
        return ids, torch.ones_like(ids)

    def encode_image(self, pixel_values):
        self.images_encoded += len(pixel_values)
        return pixel_values[:, None, :]  # [B, 1, 1]

    def encode_text(self, input_ids, attention_mask):
        return input_ids[:, :, None].double()  # [N, 1, 1]

    def image_features(self, image_embeds):
        return torch.tensor(np.stack([unit_vector(0, int(c)) for c in image_embeds[:, 0, 0]]))

    def text_features(self, text_embeds):
        return torch.tensor(np.stack([unit_vector(1, int(c)) for c in text_embeds[:, 0, 0]]))

    def fuse_rows(self, rows, image_embeds, *, text_embeds=None, capture_layer=None):
        pairs = [(int(image_embeds[i, 0, 0]), int(t)) for i, t in zip(rows.image_index, rows.input_ids[:, 0])]
        self.fused += pairs
        logits = torch.tensor([[0.0, self.itm(i, t)] for i, t in pairs], dtype=torch.float64)
        return FusionOutput(logits[:, None, :], None)  # [M, 1, 2]

    def itm_logits(self, fused):
        return fused.last_hidden_state[:, 0]


def albef_second_stage(sims, k, itm):
    """The oracle for one direction, as ALBEF's evaluation() loops: a row of -100, then the
    ITM score at each of the row's top-k ITC candidates."""
    out = np.full(sims.shape, NOT_RERANKED)
    for q, row in enumerate(sims):
        for c in np.argsort(-row)[:k]:
            out[q, c] = itm(q, c)
    return out


def codes(corpus):
    images = []
    for p in corpus.images:
        with Image.open(p) as im:
            images.append(pixel_code(im))
    return images, [text_code(t) for t in corpus.texts]


@pytest.mark.parametrize("k, score", [(3, "itm"), (2, "itm+itc"), (1000, "itm")])
def test_scores_are_albef_two_stages_on_known_tables(corpus, k, score):
    img, txt = codes(corpus)
    model = ScriptedBackbone(random_logit)
    report = evaluate_retrieval(model, corpus, k_test=k, score=score, batch_size=2, text_batch_size=3,
                                pair_batch=4, preprocess=ScriptedBackbone.preprocess, progress=False)
    sims = np.stack([unit_vector(0, c) for c in img]) @ np.stack([unit_vector(1, c) for c in txt]).T  # [I, N]
    plus = (lambda s: s) if score == "itm+itc" else (lambda s: 0.0)
    i2t = albef_second_stage(sims, k, lambda i, t: random_logit(img[i], txt[t]) + plus(sims[i, t]))
    t2i = albef_second_stage(sims.T, k, lambda t, i: random_logit(img[i], txt[t]) + plus(sims[i, t]))
    np.testing.assert_allclose(report.scores_i2t, i2t, atol=1e-6)
    np.testing.assert_allclose(report.scores_t2i, t2i, atol=1e-6)
    assert model.images_encoded == len(corpus.images)  # each image once
    n_img, n_txt = sims.shape
    assert len(model.fused) == n_img * min(k, n_txt) + n_txt * min(k, n_img)  # only the top-k pairs
    assert report.k_test == k and report.i2t_ranks.shape == (n_img,) and report.t2i_ranks.shape == (n_txt,)


def test_itm_reranking_decides_within_the_top_k(corpus):
    """With a perfect ITM (gold pairs +10, others -10) and random ITC features: re-ranking
    everything gives 100 everywhere; re-ranking only the ITC top 1 keeps ITC's recall@1."""
    img, txt = codes(corpus)
    assert len(set(corpus.texts)) == len(corpus.texts)  # no caption of two images: one gold each
    gold = {(img[i], txt[t]) for i, ts in enumerate(corpus.img2txt) for t in ts}
    model = ScriptedBackbone(lambda i, t: 10.0 if (i, t) in gold else -10.0)
    common = dict(preprocess=ScriptedBackbone.preprocess, progress=False)
    everything = evaluate_retrieval(model, corpus, k_test=len(corpus.texts), **common)
    assert everything.itc_metrics["r_mean"] < 100
    assert set(everything.metrics.values()) == {100.0}
    top1 = evaluate_retrieval(model, corpus, k_test=1, **common)
    for key in ("txt_r1", "img_r1"):
        assert top1.metrics[key] == top1.itc_metrics[key]
    assert top1.metrics["img_r5"] <= top1.itc_metrics["img_r5"]  # golds outside the top 1 fall to -100


def sharpen_blip_vision(model):
    """HF's BlipVisionConfig initialises with std 1e-10, so a random tiny BLIP sees every image
    alike; larger random weights make its features and ITM depend on the image."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.retrieval.vision_model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05, generator=g)
    return model


@pytest.mark.parametrize("name, pair_batch", [("albef", 7), ("blip", 2)])
def test_tiny_backbones_match_a_per_pair_reference(corpus, name, pair_batch):
    """Batched evaluation == each image, text and pair on its own through the protocol."""
    model = tiny_albef() if name == "albef" else sharpen_blip_vision(tiny_blip(decoder=False))
    k = 3
    report = evaluate_retrieval(model, corpus, k_test=k, batch_size=2, text_batch_size=4,
                                pair_batch=pair_batch, progress=False)
    preprocess = eval_transform(model)
    with torch.no_grad():
        images = []
        for p in corpus.images:
            with Image.open(p) as im:
                images.append(model.encode_image(preprocess(im.convert("RGB"))[None]))  # [1, 1+P, Dv]
        texts = [model.tokenize([t], max_length=30) for t in corpus.texts]
        text_embeds = [model.encode_text(ids, mask) for ids, mask in texts]
        sims = (torch.cat([model.image_features(e) for e in images])
                @ torch.cat([model.text_features(e) for e in text_embeds]).T).numpy()  # [I, N]
        itm = np.array([[
            model.itm_logits(model.fuse_rows(TextRows(ids, mask, torch.tensor([0])), image, text_embeds=emb))[0, 1].item()
            for (ids, mask), emb in zip(texts, text_embeds)] for image in images])   # [I, N]
    for scores, ref_sims, ref_itm in ((report.scores_i2t, sims, itm), (report.scores_t2i, sims.T, itm.T)):
        for q in range(len(scores)):
            chosen = np.flatnonzero(scores[q] != NOT_RERANKED)
            rest = np.setdiff1d(np.arange(scores.shape[1]), chosen)
            assert len(chosen) == k
            # a top-k of the reference ITC row (tie-tolerant: random tiny models give near ties)
            assert ref_sims[q, chosen].min() >= ref_sims[q, rest].max() - 1e-5
            np.testing.assert_allclose(scores[q, chosen], ref_itm[q, chosen], atol=1e-5)
    # the reference ITM depends on the image, so a pair pointing at the wrong image would fail
    assert np.abs(itm - itm.mean(0)).max() > 1e-3
