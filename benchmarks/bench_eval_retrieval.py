"""Retrieval evaluation: `hist_vlm.eval.retrieval.evaluate_retrieval` (many queries per fusion
pass, each distinct image's keys/values projected once) against the straightforward loop of
ALBEF's Retrieval.py (one query per pass, its image repeated k times for image -> text), side
by side on the same synthetic-world corpus and the same encodings. Both must give the same
scores; the script checks it and prints images/s, texts/s and the ratio.

    python benchmarks/bench_eval_retrieval.py                                  # small ALBEF, CPU
    python benchmarks/bench_eval_retrieval.py --size base --device cuda --images 256 --k 128
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from hist_vlm.data.retrieval import read_caption_corpus
from hist_vlm.demo.synthetic import generate_world
from hist_vlm.eval.retrieval import NOT_RERANKED, encode_corpus, rerank
from hist_vlm.eval.grounding import eval_transform
from hist_vlm.models.albef import AlbefConfig, AlbefModel

SIZES = {
    "small": dict(image_size=128, patch_size=16, vision_width=256, vision_depth=4, vision_heads=4, text_width=256,
                  text_layers=6, text_heads=4, text_intermediate_size=1024, fusion_layer=3, momentum=False),
    "base": dict(image_size=384, momentum=False),
}


@torch.no_grad()
def per_query(model, enc, sims, k, queries):
    """ALBEF's loop: for each query row, one fusion pass over its k candidates, the image
    embeddings repeated (image queries) or gathered (text queries) to k rows."""
    out = torch.full(sims.shape, NOT_RERANKED, device=sims.device)
    for q, row in enumerate(sims):
        _, top = row.topk(k)
        text = top if queries == "image" else torch.full_like(top, q)
        image = enc.image_embeds[q].expand(k, -1, -1) if queries == "image" else enc.image_embeds[top]
        fused = model.fuse(enc.text_embeds[text], enc.attention_mask[text], image, None)
        out[q, top] = model.itm_logits(fused)[:, 1].float()
    return out


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--itm-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = AlbefModel(AlbefConfig(**SIZES[args.size])).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_world(tmp, 0, 0, args.images, image_size=96, seed=0, progress=False)
        corpus = read_caption_corpus(paths.captions["test"])
        t_enc, enc = timed(lambda: encode_corpus(model, corpus, eval_transform(model), device=device, progress=False))
    sims = enc.image_feats.float() @ enc.text_feats.float().t()  # [I, N]
    k = min(args.k, *sims.shape)

    def ours():
        return [rerank(model, enc, s, k, queries=q, pair_batch=args.itm_batch, progress=False)
                for s, q in ((sims, "image"), (sims.t(), "text"))]

    def loop():
        return [per_query(model, enc, s, k, q) for s, q in ((sims, "image"), (sims.t(), "text"))]

    ours(), loop()  # warm-up
    t_ours, a = min((timed(ours) for _ in range(2)), key=lambda r: r[0])
    t_loop, b = min((timed(loop) for _ in range(2)), key=lambda r: r[0])
    err = max((x - y).abs().max().item() for x, y in zip(a, b))
    n_img, n_txt = sims.shape
    print(f"ALBEF {args.size} {model.config.image_size}px on {args.device}: {n_img} images, {n_txt} texts, "
          f"k {k}, itm batch {args.itm_batch}; encoding once: {t_enc:.2f} s")
    for name, t in (("batched (ours)", t_ours), ("per query (ALBEF loop)", t_loop)):
        print(f"  ITM re-rank, {name:<22}: {t:7.2f} s  ({n_img / (t + t_enc):7.1f} images/s, "
              f"{n_txt / (t + t_enc):7.1f} texts/s end to end)")
    print(f"  re-rank speed-up {t_loop / t_ours:.2f}x, end to end {(t_loop + t_enc) / (t_ours + t_enc):.2f}x; "
          f"max score difference {err:.1e}")


if __name__ == "__main__":
    main()
