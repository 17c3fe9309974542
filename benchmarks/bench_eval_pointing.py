"""Grounding evaluation: each distinct image of a batch encoded once and shared by its queries
(what `hist_vlm.eval.grounding.evaluate` does), against encoding the image again for every query,
side by side on the same synthetic-world queries (about 5 queries per image). Both paths must
give the same points; the script checks it.

    python benchmarks/bench_eval_pointing.py                          # small ALBEF, CPU
    python benchmarks/bench_eval_pointing.py --size base --device cuda  # ALBEF-base at 384 px
    python benchmarks/bench_eval_pointing.py --backbone blip --size tiny  # any registered backbone
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from hist_vlm.data.grounding import read_synthetic
from hist_vlm.demo.synthetic import generate_world
from hist_vlm.eval.grounding import GradcamMaps, evaluate
from hist_vlm.models import backbone_names, build_sized



def build_model(backbone: str, size: str):
    """The registry's named size; "base" at 384 px, as ALBEF evaluates grounding."""
    return build_sized(backbone, size, **({"image_size": 384} if size == "base" else {}))


class PerQuery:
    """The naive path: every query gets its own copy of its image's pixels."""

    def __init__(self, source: GradcamMaps):
        self.source, self.preprocess = source, source.preprocess

    def __call__(self, pixel_values, texts, image_index):
        return self.source(pixel_values[image_index], texts, torch.arange(len(texts)))


def timed(records, source, batch_size, out) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    evaluate(records, source, batch_size=batch_size, out=out, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=backbone_names(), default="albef")
    ap.add_argument("--size", default="small", help="a size the backbone registers (albef: tiny, small, base)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.backbone, args.size)
    source = GradcamMaps(model, device=args.device)  # the backbone's default GradCAM layer
    with tempfile.TemporaryDirectory() as tmp:
        generate_world(tmp, 0, 0, args.images, image_size=96, seed=0, progress=False)
        records = read_synthetic(f"{tmp}/grounding.jsonl")
        timed(records[: args.batch_size], source, args.batch_size, None)  # warm-up
        shared, naive = [], []
        for _ in range(args.repeats):  # interleaved, best of: other load on the machine hits both
            shared.append(timed(records, source, args.batch_size, f"{tmp}/shared.jsonl"))
            naive.append(timed(records, PerQuery(source), args.batch_size, f"{tmp}/naive.jsonl"))
        shared, naive = min(shared), min(naive)
        same = [json.loads(a)["point"] == json.loads(b)["point"]
                for a, b in zip(open(f"{tmp}/shared.jsonl"), open(f"{tmp}/naive.jsonl"))]
    n = len(records)
    print(f"{args.backbone} {args.size} {model.image_size}px on {args.device}: {n} queries over {args.images} images, "
          f"batch {args.batch_size}")
    print(f"  image once per batch : {shared:7.2f} s  ({n / shared:7.1f} queries/s)")
    print(f"  image once per query : {naive:7.2f} s  ({n / naive:7.1f} queries/s)")
    print(f"  speed-up {naive / shared:.2f}x; identical points: {sum(same)}/{len(same)}")


if __name__ == "__main__":
    main()
