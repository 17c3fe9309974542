"""Image-text retrieval: ALBEF's two-stage protocol (Retrieval.py `evaluation` + `itm_eval`).

Why two stages: the ITM head needs one fusion pass per (image, text) pair, too many for a
full test set, so ALBEF ranks everything by ITC cosine similarity first and re-scores only the
top k candidates of each query with the ITM match logit. What is ranked, how k works and the
metric are in docs/retrieval.md. Shapes: I images, N texts, k candidates per query.

The model side (`encode_corpus`, `rerank`, `evaluate_retrieval`) only uses the backbone
protocol of `hist_vlm.models.base`, so ALBEF and BLIP run through the same code; the metric
(`retrieval_metrics`) is a pure function of the two score matrices.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from hist_vlm._io import atomic_file
from hist_vlm.models.base import ContrastiveModel, MatchingModel
from hist_vlm.data.retrieval import RetrievalCorpus
from hist_vlm.losses.itc import similarity

#: ALBEF's `k_test` (configs/Retrieval_coco.yaml, Retrieval_flickr.yaml); synthetic: ours
DEFAULT_K = {"coco": 256, "flickr30k": 128, "synthetic": 16}
#: ALBEF fills the scores of candidates outside the top k with this
NOT_RERANKED = -100.0
#: how a re-ranked candidate is scored: ALBEF uses the ITM match logit alone; BLIP's
#: train_retrieval.py adds the ITC cosine of the candidate
SCORES = ("itm", "itm+itc")
RECALL_AT = (1, 5, 10)
_NO_GOLD = np.iinfo(np.int64).max  # rank of a query without any gold candidate: never a hit


# ----------------------------------------------------------------------------- the metric

def _as_index(mapping: Mapping[int, int] | Sequence[int], n: int) -> np.ndarray:
    return np.asarray([int(mapping[i]) for i in range(n)], dtype=np.int64)


def gold_ranks(scores: np.ndarray, query: np.ndarray, gold: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """0-based rank of candidate gold[m] in row query[m] of `scores` [Q, C], for M pairs.

    The rank is the position in ALBEF's `np.argsort(score)[::-1]`, read as a stable sort:
    candidates scoring higher come first, and among equal scores the higher index comes first.
    Counting instead of sorting: O(M * C), chunked so memory stays at `chunk` rows.
    """
    out = np.empty(len(query), dtype=np.int64)
    cols = np.arange(scores.shape[1])
    for lo in range(0, len(query), chunk):
        q, g = query[lo:lo + chunk], gold[lo:lo + chunk]
        rows = scores[q]                                  # [m, C]
        own = rows[np.arange(len(q)), g][:, None]         # [m, 1]
        ahead = (rows > own) | ((rows == own) & (cols[None, :] > g[:, None]))
        out[lo:lo + chunk] = ahead.sum(1)
    return out


def retrieval_ranks(
    scores_i2t, scores_t2i, txt2img: Mapping[int, int] | Sequence[int], img2txt: Mapping[int, Sequence[int]] | Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(image -> text ranks [I], text -> image ranks [N]), 0-based.

    An image's rank is the best rank among its gold captions (`img2txt`); a text's is its one
    gold image's (`txt2img`). The maps may be lists or ALBEF's dicts keyed 0..n-1.
    """
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i must be [{n_txt}, {n_img}] (texts x images), got {list(scores_t2i.shape)}")
    t2i = gold_ranks(scores_t2i, np.arange(n_txt), _as_index(txt2img, n_txt))
    query = np.asarray([i for i in range(n_img) for _ in img2txt[i]], dtype=np.int64)
    gold = np.asarray([t for i in range(n_img) for t in img2txt[i]], dtype=np.int64)
    i2t = np.full(n_img, _NO_GOLD, dtype=np.int64)
    np.minimum.at(i2t, query, gold_ranks(scores_i2t, query, gold))
    return i2t, t2i


def metrics_from_ranks(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> dict[str, float]:
    """ALBEF's keys: txt_r1/5/10 (image -> text), img_r1/5/10 (text -> image), in percent,
    their means txt_r_mean, img_r_mean and r_mean = (txt_r_mean + img_r_mean) / 2."""
    out: dict[str, float] = {}
    for side, ranks in (("txt", i2t_ranks), ("img", t2i_ranks)):
        for k in RECALL_AT:
            out[f"{side}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        out[f"{side}_r_mean"] = sum(out[f"{side}_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def retrieval_metrics(scores_i2t, scores_t2i, txt2img, img2txt) -> dict[str, float]:
    """ALBEF's `itm_eval`: scores_i2t [I, N], scores_t2i [N, I] -> recall@1/5/10 and means."""
    return metrics_from_ranks(*retrieval_ranks(scores_i2t, scores_t2i, txt2img, img2txt))


# ----------------------------------------------------------------------------- the model side

@dataclass
class EncodedCorpus:
    """Every image and text of a corpus encoded once, on the evaluation device."""

    image_embeds: Tensor    # [I, 1+P, Dv]
    image_feats: Tensor     # [I, E] (or [I, K, E], losses.itc.similarity), L2-normalised
    text_embeds: Tensor     # [N, T, D] unimodal text encoder output
    text_feats: Tensor      # [N, E], L2-normalised
    input_ids: Tensor       # [N, T]
    attention_mask: Tensor  # [N, T]


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], preprocess):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        """The i-th image, preprocessed; `open_rgb` reads it (16-bit scaled) or raises one
        ImageError line naming the file."""
        from hist_vlm.data.images import open_rgb

        return self.preprocess(open_rgb(self.paths[i]))


def check_retrieval_backbone(model) -> None:
    """A ValueError unless `model` ranks by ITC and re-ranks by ITM (a decoder, LLaVA, does neither)."""
    if not (isinstance(model, ContrastiveModel) and isinstance(model, MatchingModel)):
        raise ValueError(f"the {model.name} backbone has no ITC features and ITM head: retrieval evaluation "
                         "ranks with the one and re-ranks with the other")


@torch.no_grad()
def encode_corpus(
    model,
    corpus: RetrievalCorpus,
    preprocess: Callable,
    *,
    device: torch.device,
    batch_size: int = 64,
    text_batch_size: int = 256,
    max_length: int = 30,
    num_workers: int = 0,
    progress: bool = True,
) -> EncodedCorpus:
    """Images in batches of `batch_size` (loaded by DataLoader workers), texts in batches of
    `text_batch_size` (ALBEF: 256), each exactly once. Texts are tokenized together, so they
    share one padded length T; ALBEF pads to max_length=30, which the attention mask makes
    equivalent."""
    dtype = next(model.parameters()).dtype
    loader = torch.utils.data.DataLoader(_ImageFiles(corpus.images, preprocess), batch_size=batch_size,
                                         num_workers=num_workers)
    image_embeds, image_feats = [], []
    for pixels in tqdm(loader, desc="encode images", unit="batch", disable=not progress):
        emb = model.encode_image(pixels.to(device, dtype))            # [b, 1+P, Dv]
        image_embeds.append(emb)
        image_feats.append(model.image_features(emb))                 # [b, E]
    ids, mask = model.tokenize(list(corpus.texts), max_length=max_length)
    ids, mask = ids.to(device), mask.to(device)
    text_embeds, text_feats = [], []
    for lo in tqdm(range(0, len(ids), text_batch_size), desc="encode texts", unit="batch", disable=not progress):
        emb = model.encode_text(ids[lo:lo + text_batch_size], mask[lo:lo + text_batch_size])  # [b, T, D]
        text_embeds.append(emb)
        text_feats.append(model.text_features(emb))                   # [b, E]
    return EncodedCorpus(torch.cat(image_embeds), torch.cat(image_feats), torch.cat(text_embeds),
                         torch.cat(text_feats), ids, mask)


@torch.no_grad()
def itm_scores(model, enc: EncodedCorpus, text_index: Tensor, image_index: Tensor) -> Tensor:
    """ITM match logits of M (text, image) pairs: [M] text rows, [M] images -> [M].
    Each distinct image is passed to the fusion once; its rows point at it (as in training)."""
    from hist_vlm.batch import TextRows

    images, local = torch.unique(image_index, return_inverse=True)
    rows = TextRows(enc.input_ids[text_index], enc.attention_mask[text_index], local)
    fused = model.fuse_rows(rows, enc.image_embeds[images], text_embeds=enc.text_embeds[text_index])
    return model.itm_logits(fused)[:, 1].float()


@torch.no_grad()
def rerank(
    model,
    enc: EncodedCorpus,
    sims: Tensor,
    k: int,
    *,
    queries: str,
    pair_batch: int = 256,
    score: str = "itm",
    progress: bool = True,
) -> Tensor:
    """ALBEF's second stage for one direction: sims [Q, C] (queries x candidates; `queries`
    is "image" for image->text, "text" for text->image) -> scores [Q, C], where the top-k
    candidates of each row hold their ITM match logit (+ the cosine for "itm+itc") and the
    rest NOT_RERANKED. k is capped at C. Fusion runs on `pair_batch` pairs at a time."""
    if queries not in ("image", "text"):
        raise ValueError(f"queries must be 'image' or 'text', got {queries!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    n_q, n_c = sims.shape
    k = min(k, n_c)
    out = torch.full((n_q, n_c), NOT_RERANKED, device=sims.device)
    per_chunk = max(1, pair_batch // k)  # whole queries per chunk
    bar = tqdm(total=n_q, desc=f"ITM re-rank ({queries} queries)", unit=queries, disable=not progress)
    for lo in range(0, n_q, per_chunk):
        top_sim, top_idx = sims[lo:lo + per_chunk].topk(k, dim=1)                      # [q, k]
        query = torch.arange(lo, lo + len(top_idx), device=sims.device).repeat_interleave(k)  # [q*k]
        cand = top_idx.reshape(-1)                                                     # [q*k]
        text_index, image_index = (cand, query) if queries == "image" else (query, cand)
        logits = torch.cat([
            itm_scores(model, enc, text_index[p:p + pair_batch], image_index[p:p + pair_batch])
            for p in range(0, len(cand), pair_batch)
        ]).view_as(top_sim)                                                            # [q, k]
        if score == "itm+itc":
            logits = logits + top_sim.float()
        out[lo:lo + len(top_idx)].scatter_(1, top_idx, logits)
        bar.update(len(top_idx))
    bar.close()
    return out


@dataclass
class RetrievalReport:
    """Scores, ranks and metrics of one evaluation."""

    k_test: int
    score: str
    scores_i2t: np.ndarray          # [I, N] after re-ranking
    scores_t2i: np.ndarray          # [N, I]
    i2t_ranks: np.ndarray           # [I] best rank of a gold caption, 0-based
    t2i_ranks: np.ndarray           # [N] rank of the gold image
    metrics: dict[str, float]       # ALBEF's itm_eval keys, after re-ranking
    itc_metrics: dict[str, float] = field(default_factory=dict)  # the same on the ITC sims alone

    def lines(self) -> list[str]:
        """A table in percent: TR@1/5/10, IR@1/5/10 and the means, for the ITC ranking alone
        and after ITM re-ranking."""
        keys = [f"{side}_r{k}" for side in ("txt", "img") for k in RECALL_AT] + ["txt_r_mean", "img_r_mean", "r_mean"]
        titles = [f"{side}@{k}" for side in ("TR", "IR") for k in RECALL_AT] + ["TR mean", "IR mean", "mean"]
        rows = [" " * 12 + "".join(f"{t:>8}" for t in titles)]
        for name, m in (("ITC", self.itc_metrics), (f"ITM top-{self.k_test}", self.metrics)):
            if m:
                rows.append(f"{name:<12}" + "".join(f"{m[key]:8.2f}" for key in keys))
        return rows

    def to_json(self) -> dict:
        return {
            "k_test": self.k_test, "score": self.score,
            "n_images": int(self.scores_i2t.shape[0]), "n_texts": int(self.scores_i2t.shape[1]),
            "metrics": self.metrics, "itc_metrics": self.itc_metrics,
            "ranks": {"image_to_text": _ranks_json(self.i2t_ranks), "text_to_image": _ranks_json(self.t2i_ranks)},
        }

    def write_json(self, path: str | Path, **extra) -> None:
        """`to_json()` plus `extra` keys, written to a temp file beside `path` and renamed:
        an interrupted write leaves `path` as it was."""
        with atomic_file(path, "w") as f:
            json.dump({**extra, **self.to_json()}, f, indent=1)
            f.write("\n")


def _ranks_json(ranks: np.ndarray) -> list[int | None]:
    return [None if r == _NO_GOLD else int(r) for r in ranks]  # None: no gold candidate


def evaluate_retrieval(
    model,
    corpus: RetrievalCorpus,
    *,
    k_test: int = 256,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    text_batch_size: int = 256,
    pair_batch: int = 256,
    max_length: int = 30,
    score: str = "itm",
    num_workers: int = 0,
    preprocess: Callable | None = None,
    progress: bool = True,
) -> RetrievalReport:
    """ALBEF's `evaluation()` + `itm_eval()` on a corpus, single process.

    Images and texts are encoded once; ITC similarity `image_feats @ text_feats.T` [I, N];
    image->text re-ranks the top `k_test` texts of each image, text->image the top `k_test`
    images of each text (ITM match logit; `score="itm+itc"` adds the cosine as BLIP does);
    everything else scores NOT_RERANKED. `preprocess` defaults to the model's eval transform.
    """
    from hist_vlm.eval.grounding import eval_transform, text_length_limit

    check_retrieval_backbone(model)
    if k_test < 1:
        raise ValueError(f"k_test must be at least 1, got {k_test}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    missing = corpus.missing_images()
    if missing:  # before any model work, not as a worker traceback halfway through
        raise FileNotFoundError(f"{missing[0]}: image not found ({len(missing)} images missing)")
    device = torch.device(device)
    model = model.to(device).eval()
    enc = encode_corpus(
        model, corpus, preprocess or eval_transform(model), device=device, batch_size=batch_size,
        text_batch_size=text_batch_size, max_length=text_length_limit(model, max_length),
        num_workers=num_workers, progress=progress,
    )
    sims = similarity(enc.image_feats.float(), enc.text_feats.float())  # [I, N] cosine, ALBEF's sims_matrix
    common = dict(pair_batch=pair_batch, score=score, progress=progress)
    i2t = rerank(model, enc, sims, k_test, queries="image", **common).cpu().numpy()
    t2i = rerank(model, enc, sims.t(), k_test, queries="text", **common).cpu().numpy()
    sims_np = sims.cpu().numpy()
    i2t_ranks, t2i_ranks = retrieval_ranks(i2t, t2i, corpus.txt2img, corpus.img2txt)
    return RetrievalReport(
        k_test=k_test, score=score, scores_i2t=i2t, scores_t2i=t2i, i2t_ranks=i2t_ranks, t2i_ranks=t2i_ranks,
        metrics=metrics_from_ranks(i2t_ranks, t2i_ranks),
        itc_metrics=retrieval_metrics(sims_np, sims_np.T, corpus.txt2img, corpus.img2txt),
    )
