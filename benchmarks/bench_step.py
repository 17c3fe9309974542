"""One training step (forward, backward, AdamW) with the baseline losses (the backbone's own
objectives on captions, `schedule=off`: ITC+ITM+MLM for ALBEF, LM+rank for LLaVA) and with the
full HIST loss, on the same images, side by side.

    python benchmarks/bench_step.py                          # tiny ALBEF on CPU
    python benchmarks/bench_step.py --size base --device cuda  # ViT-B/16 256px + BERT-base, bf16
    python benchmarks/bench_step.py --backbone llava --size base --batch 8 --device cuda
                                     # CLIP ViT-L/14 336px + a 1.1B Llama (TinyLLaVA's scale)

Peak memory: CUDA `max_memory_allocated` on GPU; on CPU the peak resident set size (VmHWM,
reset through /proc/self/clear_refs before each run) minus the RSS at the start of the run.
Random init, synthetic texts: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from dataclasses import dataclass

import torch

from hist_vlm.losses.hist import HistLoss, HistLossConfig
from hist_vlm.models import backbone_names, build_sized
from hist_vlm.batch import HistBatch, TextRows

WORDS = "man woman dog cat horse red small wooden table frisbee bus umbrella beach street green tall".split()


@dataclass
class Size:
    batch: int
    queue: int


SIZES = {"tiny": Size(batch=8, queue=256), "base": Size(batch=56, queue=65536)}


#: backbones whose base size keeps its own resolution (LLaVA: 336 px, patch 14)
NATIVE_RESOLUTION = {"llava"}


def build_model(size: str, backbone: str):
    """The registry's named size (base at 256 px, the paper's ALBEF training resolution)."""
    at_256 = size == "base" and backbone not in NATIVE_RESOLUTION
    return build_sized(backbone, size, **({"image_size": 256} if at_256 else {}))


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


class Stepper:
    """One loss + its AdamW on the shared model; `timed(steps)` -> (ms/step, peak MiB)."""

    def __init__(self, model, loss_fn, batch, args, device) -> None:
        self.model, self.loss_fn, self.batch, self.device = model, loss_fn, batch, device
        params = list(model.parameters()) + list(loss_fn.parameters())
        self.opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5)
        self.bf16 = args.bf16

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            out = self.loss_fn(self.model, self.batch, progress=0.5)
        out["loss"].backward()
        self.opt.step()

    def timed(self, steps: int) -> tuple[float, float]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = 0
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM
            base_mem = _rss_kb("VmRSS:") * 1024
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM:") * 1024 - base_mem
        return (time.perf_counter() - t0) * 1000 / steps, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--backbone", choices=backbone_names(), default="albef")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed blocks of --steps, alternating baseline and HIST; the median block is reported")
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
    batch = synthetic_batch(model, n, model.image_size, device)
    steppers = {}
    for name, schedule in (("baseline (L_vl)", "off"), ("HIST (full)", "constant")):
        cfg = HistLossConfig(schedule=schedule, queue_size=size.queue)  # the backbone's default GradCAM layer
        steppers[name] = Stepper(model, HistLoss(cfg, model).to(device), batch, args, device)
        for _ in range(args.warmup):
            steppers[name].step()
    blocks: dict[str, list[tuple[float, float]]] = {name: [] for name in steppers}
    for _ in range(args.repeats):  # alternate, so load changes hit both sides
        for name, stepper in steppers.items():
            blocks[name].append(stepper.timed(args.steps))
    results = {
        name: (statistics.median(ms for ms, _ in runs), max(peak for _, peak in runs)) for name, runs in blocks.items()
    }
    mem = "peak CUDA alloc MiB" if device.type == "cuda" else "peak RSS delta MiB"
    print(f"\n{args.backbone} {args.size}, batch {n}, {device}, bf16={args.bf16}, "
          f"median of {args.repeats} blocks of {args.steps} steps, after {args.warmup} warm-up\n")
    print(f"| loss | ms/step | images/s | {mem} |\n|---|---|---|---|")
    for name, (ms, peak) in results.items():
        print(f"| {name} | {ms:.1f} | {n * 1000 / ms:.1f} | {peak:.0f} |")
    (b_ms, b_mem), (h_ms, h_mem) = results.values()
    print(f"| HIST / baseline | {h_ms / b_ms:.2f}x | {b_ms / h_ms:.2f}x | {h_mem / max(b_mem, 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
