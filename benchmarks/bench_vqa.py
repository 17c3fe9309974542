"""VQA: one fine-tuning step (ALBEF's recipe: weighted answer loss, distillation, AdamW) and the
ranking inference, side by side with ranking that scores every candidate's whole sequence
(k = all candidates): questions/s of both and the ratio; both must pick the same answers
whenever the best candidate is among the top k first tokens (the script counts agreements).

    python benchmarks/bench_vqa.py                                   # tiny ALBEF, CPU
    python benchmarks/bench_vqa.py --size base --device cuda         # ALBEF-base, 384 px, 3,128 candidates
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from hist_vlm.models.albef import AlbefConfig, AlbefModel
from hist_vlm.models.albef_vqa import AlbefVqaModel
from hist_vlm.batch import TextRows
from hist_vlm.data.vqa import VqaBatch
from hist_vlm.train.config import VqaConfig
from hist_vlm.train.tasks.vqa import VqaObjective

SIZES = {
    "tiny": dict(image_size=64, patch_size=8, vision_width=64, vision_depth=2, vision_heads=2, text_width=64,
                 text_layers=4, text_heads=2, text_intermediate_size=128, fusion_layer=2, embed_dim=32),
    "base": dict(image_size=384),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeat: int) -> tuple[float, object]:
    out = fn()                      # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    _sync(device)
    return (time.perf_counter() - start) / repeat, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="training questions per step (ALBEF: 32 per GPU)")
    ap.add_argument("--questions", type=int, default=16, help="questions per ranking batch (ALBEF: 16)")
    ap.add_argument("--candidates", type=int, default=None, help="answer list size (VQA v2: 3,128)")
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    base = args.size == "base"
    batch, n_cand = args.batch or (32 if base else 16), args.candidates or (3128 if base else 300)
    dev = args.device

    torch.manual_seed(0)
    backbone = AlbefModel(AlbefConfig(**SIZES[args.size], momentum=True))
    model, _ = AlbefVqaModel.from_backbone(backbone, distill=True)
    model = model.to(dev)
    words = [w for w in model.tokenizer._tok.vocab if w.isalpha()][1000:1000 + 2 * n_cand]
    candidates = [words[i] if i % 2 else f"{words[i]} {words[i + 1]}" for i in range(n_cand)]
    size = model.config.image_size

    # --- one training step: 3 answers per question, as ALBEF's expanded VQA targets
    q_ids, q_mask = model.tokenize_question([f"what is the {w}" for w in words[:batch]])
    a_ids, a_mask = model.tokenize_answers(candidates[: 3 * batch])
    vb = VqaBatch(torch.randn(batch, 3, size, size), TextRows(q_ids, q_mask, torch.arange(batch)),
                  TextRows(a_ids, a_mask, torch.arange(batch).repeat_interleave(3)),
                  torch.full((3 * batch,), 1 / 3)).to(dev)
    objective = VqaObjective(VqaConfig())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.startswith("cuda") else nullcontext

    def step():
        with amp():
            loss = objective(model, vb, 0.5)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step_s, _ = _timed(step, dev, args.repeat)

    # --- ranking: top-k first tokens then sequences, against every candidate's sequence
    model.eval()
    c_ids, c_mask = model.tokenize_answers(candidates)
    cands = TextRows(c_ids, c_mask, torch.zeros(n_cand, dtype=torch.long)).to(dev)
    n = args.questions
    qi, qm = model.tokenize_question([f"what color is the {w}" for w in words[:n]])
    questions = TextRows(qi, qm, torch.arange(n)).to(dev)
    pixels = torch.randn(n, 3, size, size, device=dev)

    def rank(k):
        with amp():
            return model.rank_answers(pixels, questions, cands, k)[0][:, 0]

    topk_s, picked = _timed(lambda: rank(args.k), dev, args.repeat)
    full_s, best = _timed(lambda: rank(n_cand), dev, args.repeat)
    print(f"ALBEF-{args.size} VQA on {dev}: decoder {model.vqa_config.depth(model.config)} layers, "
          f"{n_cand} candidates, k={args.k}")
    print(f"  training step ({batch} questions, {3 * batch} answers, distillation): {step_s * 1000:.1f} ms")
    print(f"  ranking top-{args.k}: {n / topk_s:.1f} questions/s; every candidate: {n / full_s:.1f} questions/s; "
          f"ratio {full_s / topk_s:.2f}x; same answer for {int((picked == best).sum())}/{n} questions")


if __name__ == "__main__":
    main()
