"""One training step (forward, backward, AdamW) with the baseline losses (ITC+ITM+MLM on
captions, `schedule=off`) and with the full HIST loss, on the same images, side by side.

    python benchmarks/bench_step.py                          # tiny ALBEF on CPU
    python benchmarks/bench_step.py --size base --device cuda  # ViT-B/16 256px + BERT-base, bf16

Peak memory: CUDA `max_memory_allocated` on GPU; on CPU the peak resident set size (VmHWM,
reset through /proc/self/clear_refs before each run) minus the RSS at the start of the run.
Random init, synthetic texts: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import time
from dataclasses import dataclass

import torch

from hist_vlm.losses.hist import HistLoss, HistLossConfig
from hist_vlm.models.base import HistBatch, TextRows

WORDS = "man woman dog cat horse red small wooden table frisbee bus umbrella beach street green tall".split()


@dataclass
class Size:
    batch: int
    queue: int
    capture_layer: int


SIZES = {"tiny": Size(batch=8, queue=256, capture_layer=1), "base": Size(batch=56, queue=65536, capture_layer=2)}


def build_model(size: str, backbone: str):
    if backbone == "blip":
        from hist_vlm.models.blip import BlipBackbone, blip_config

        return BlipBackbone.from_config(blip_config(size, image_size=256 if size == "base" else None),
                                        with_decoder=True)
    from hist_vlm.models.albef import AlbefConfig, AlbefModel

    if size == "base":
        return AlbefModel(AlbefConfig(image_size=256))
    return AlbefModel(AlbefConfig(
        image_size=32, patch_size=8, vision_width=64, vision_depth=2, vision_heads=2, text_width=64,
        text_layers=4, text_heads=4, text_intermediate_size=128, fusion_layer=2, embed_dim=32,
    ))


def synthetic_batch(model, n: int, image_size: int, device) -> HistBatch:
    rng = random.Random(0)
    phrase = lambda: " ".join(["a"] + rng.sample(WORDS, rng.randint(1, 3)))  # noqa: E731

    def rows(texts):
        ids, mask = model.tokenize(texts)
        return TextRows(ids, mask, torch.arange(n))

    firsts, seconds = [phrase() for _ in range(n)], [phrase() for _ in range(n)]
    caps = [" ".join(rng.choices(WORDS, k=rng.randint(10, 20))) for _ in range(n)]
    phrases = [phrase() for _ in range(n)]
    return HistBatch(
        pixel_values=torch.randn(n, 3, image_size, image_size),
        image_ids=torch.arange(n),
        captions=rows(caps), phrases=rows(phrases), subjects=rows([p.split()[-1] for p in phrases]),
        pair_first=rows(firsts), pair_second=rows(seconds),
        composites=rows([f"{a} and {b}" for a, b in zip(firsts, seconds)]),
    ).to(device)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def run(model, loss_fn, batch, args, device) -> tuple[float, float]:
    """(ms/step, peak memory MiB) over args.steps timed steps after args.warmup."""
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = loss_fn(model, batch, progress=0.5)
        out["loss"].backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = 0
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM
        base_mem = _rss_kb("VmRSS:") * 1024
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kb("VmHWM:") * 1024 - base_mem
    return (time.perf_counter() - t0) * 1000 / args.steps, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--backbone", choices=["albef", "blip"], default="albef")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: 8 tiny, 56 base)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: on for --size base on CUDA)")
    args = ap.parse_args()
    device = torch.device(args.device)
    size = SIZES[args.size]
    if args.bf16 is None:
        args.bf16 = args.size == "base" and device.type == "cuda"
    n = args.batch or size.batch
    torch.manual_seed(0)
    model = build_model(args.size, args.backbone).to(device).train()
    image_size = 256 if args.size == "base" else 32
    batch = synthetic_batch(model, n, image_size, device)
    layer = min(size.capture_layer if args.backbone == "albef" else 8, model.num_cross_attention_layers - 1)
    results = {}
    for name, schedule in (("baseline (ITC+ITM+MLM)", "off"), ("HIST (full)", "constant")):
        cfg = HistLossConfig(schedule=schedule, capture_layers=(layer,), queue_size=size.queue)
        loss_fn = HistLoss(cfg, model).to(device)
        results[name] = run(model, loss_fn, batch, args, device)
    mem = "peak CUDA alloc MiB" if device.type == "cuda" else "peak RSS delta MiB"
    print(f"\n{args.backbone} {args.size}, batch {n}, {device}, bf16={args.bf16}, "
          f"{args.steps} steps after {args.warmup} warm-up\n")
    print(f"| loss | ms/step | images/s | {mem} |\n|---|---|---|---|")
    for name, (ms, peak) in results.items():
        print(f"| {name} | {ms:.1f} | {n * 1000 / ms:.1f} | {peak:.0f} |")
    (b_ms, b_mem), (h_ms, h_mem) = results.values()
    print(f"| HIST / baseline | {h_ms / b_ms:.2f}x | {b_ms / h_ms:.2f}x | {h_mem / max(b_mem, 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
