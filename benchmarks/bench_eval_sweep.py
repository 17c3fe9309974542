"""The layer/head sweep (`hist_vlm.eval.sweep.evaluate_sweep`: one GradCAM pass per batch for
every setting) against a separate `evaluate` run per setting, side by side on the same
synthetic-world queries. Both must give the same per-query points; the script checks it.

    python benchmarks/bench_eval_sweep.py                               # small ALBEF, CPU
    python benchmarks/bench_eval_sweep.py --size base --device cuda     # ALBEF-base at 384 px
    python benchmarks/bench_eval_sweep.py --backbone blip --size tiny   # any registered backbone
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict

import torch

from hist_vlm.data.grounding import read_synthetic
from hist_vlm.demo.synthetic import generate_world
from hist_vlm.eval.grounding import GradcamMaps, evaluate
from hist_vlm.eval.sweep import GradcamSweep, build_grid, evaluate_sweep
from hist_vlm.models import backbone_names, build_sized

from bench_eval_retrieval import timed  # (seconds, result), CUDA-synchronised



def build_model(backbone: str, size: str):
    """The registry's named size; "base" at 384 px, as ALBEF evaluates grounding."""
    return build_sized(backbone, size, **({"image_size": 384} if size == "base" else {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=backbone_names(), default="albef")
    ap.add_argument("--size", default="small", help="a size the backbone registers (albef: tiny, small, base)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layers", default=None, help="--sweep-layers (default: all)")
    ap.add_argument("--heads", default=None, help="--sweep-heads (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.backbone, args.size)
    grid = build_grid(model.num_cross_attention_layers, model.num_cross_attention_heads,
                      layers=args.layers, heads=args.heads)
    sweep = GradcamSweep(model, grid, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        generate_world(tmp, 0, 0, args.images, image_size=96, seed=0, progress=False)
        records = read_synthetic(f"{tmp}/grounding.jsonl")
        evaluate_sweep(records[: args.batch_size], sweep, batch_size=args.batch_size, progress=False)  # warm-up
        one_pass, _ = timed(lambda: evaluate_sweep(records, sweep, batch_size=args.batch_size,
                                                out=f"{tmp}/sweep.jsonl", progress=False))
        points = defaultdict(list)
        for line in open(f"{tmp}/sweep.jsonl"):
            row = json.loads(line)
            points[row["setting"]].append(row["point"])

        def separate() -> int:
            same = 0
            for s in grid:
                source = GradcamMaps(model, layers=s.layers, head=s.head, combine=s.combine, device=args.device)
                evaluate(records, source, batch_size=args.batch_size, out=f"{tmp}/one.jsonl", progress=False)
                got = [json.loads(x)["point"] for x in open(f"{tmp}/one.jsonl")]
                same += sum(a == b for a, b in zip(got, points[s.label]))
            return same

        apart, same = timed(separate)
    n, s = len(records), len(grid)
    print(f"{args.backbone} {args.size} {model.image_size}px on {args.device}: {n} queries over {args.images} images, "
          f"batch {args.batch_size}, {s} settings ({model.num_cross_attention_layers} layers, "
          f"{model.num_cross_attention_heads} heads, mean + each head, adjacent pairs x mean/product)")
    print(f"  one-pass sweep        : {one_pass:8.2f} s  ({n * s / one_pass:9.1f} query-settings/s)")
    print(f"  a run per setting     : {apart:8.2f} s  ({n * s / apart:9.1f} query-settings/s)")
    print(f"  speed-up {apart / one_pass:.1f}x; identical points: {same}/{n * s}")


if __name__ == "__main__":
    main()
