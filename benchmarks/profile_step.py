"""Where the time and memory of one HIST training step go, next to the baseline step.

    python benchmarks/profile_step.py --size base --batch 4          # ALBEF-base on CPU
    python benchmarks/profile_step.py --size base --device cuda      # batch 56, bf16

Three steps on the same model and batch: the baseline (ITC+ITM+MLM on captions), HIST without
the addition term (its `AdditionTerm.loss` replaced by a zero), and full HIST. The differences
give what each part costs, forward AND backward. Inside each step the forward is split by
component with `torch.profiler.record_function` ranges that this script wraps around the
library's functions (the library itself is not instrumented): total time per range, as the
profiler measures it (ranges nest: the momentum passes are inside the text / MLM ranges that
call them).
Peak memory: CUDA max allocated, or on CPU the peak RSS delta (as bench_step.py; it depends on
the allocator and on other processes). Saved activations: the distinct storages autograd keeps
for backward during one forward, parameters and buffers excluded: a deterministic measure of the
activation memory a step holds.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import hist_vlm.losses.terms as terms_module
from bench_step import SIZES, Stepper, build_model, synthetic_batch

from hist_vlm.losses.hist import HistLoss, HistLossConfig
from hist_vlm.losses.itc import ItcLoss
from hist_vlm.losses.terms import AdditionTerm, Itm, Lm
from hist_vlm.models import backbone_names

#: (label, owner, attribute): the forward components of a step
RANGES = (
    ("image encoder (online)", "model", "encode_image"),
    ("image encoder (momentum)", "twin", "encode_image"),
    ("momentum update", "model", "update_momentum"),
    ("text encoders, every kind (+ momentum)", HistLoss, "_encode_texts"),
    ("ITC terms (+ queue)", ItcLoss, "forward"),
    ("ITM negative sampling", Itm, "block"),
    ("ITM fusion, all kinds + negatives", terms_module, "itm_losses"),
    ("MLM captions + phrases (+ momentum)", Lm, "__call__"),
    ("addition: GradCAM fusion + create_graph grad", AdditionTerm, "loss"),
)


def _wrapped(label: str, fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return run


@contextlib.contextmanager
def instrumented(model):
    """Wrap every component of RANGES in a named profiler range; restore on exit."""
    owners = {"model": model, "twin": model.momentum_twin()}
    saved = []
    for label, owner, attr in RANGES:
        target = owners.get(owner, owner) if isinstance(owner, str) else owner
        if target is None:
            continue
        saved.append((target, attr, target.__dict__.get(attr), getattr(target, attr)))
        setattr(target, attr, _wrapped(label, getattr(target, attr)))
    try:
        yield
    finally:
        for target, attr, own, _ in reversed(saved):
            if own is None:
                delattr(target, attr)
            else:
                setattr(target, attr, own)


class ProfiledStepper(Stepper):
    """A Stepper whose backward and optimizer step are named ranges too."""

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with record_function("forward (all losses)"):
            with autocast:
                out = self.loss_fn(self.model, self.batch, progress=0.5)
        with record_function("backward (incl. double backward)"):
            out["loss"].backward()
        with record_function("optimizer (AdamW)"):
            self.opt.step()


def saved_activation_mib(stepper: ProfiledStepper) -> float:
    """MiB of distinct tensor storages autograd saves for backward during one forward: the
    activation memory of the step, deterministic (no allocator caching, no other processes)."""
    weights = {p.untyped_storage().data_ptr() for p in [*stepper.model.parameters(), *stepper.model.buffers(),
                                                          *stepper.loss_fn.parameters(), *stepper.loss_fn.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:  # parameters and queues are held anyway
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast(stepper.device.type, dtype=torch.bfloat16) if stepper.bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = stepper.loss_fn(stepper.model, stepper.batch, progress=0.5)
    del out
    return sum(seen.values()) / 2**20


def _no_addition(step):
    return step.image_embeds.new_zeros(())


def profile_step(stepper: ProfiledStepper, device) -> dict[str, float]:
    """ms per named range over one profiled step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with instrumented(stepper.model), profile(activities=activities) as prof:
        stepper.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    labels = {r[0] for r in RANGES} | {"forward (all losses)", "backward (incl. double backward)", "optimizer (AdamW)"}
    out = {}
    for ev in prof.key_averages():
        if ev.key in labels:
            dev_ms = getattr(ev, "device_time_total", 0) / 1000 if device.type == "cuda" else 0.0
            out[ev.key] = max(ev.cpu_time_total / 1000, dev_ms)
    return out


VARIANTS = {"baseline": ("off", False), "HIST - addition": ("constant", True), "HIST": ("constant", False)}


def run_variant(args) -> dict:
    """One variant in this process: ms/step, peak memory, ms per profiled range."""
    device = torch.device(args.device)
    size = SIZES[args.size]
    torch.manual_seed(0)
    model = build_model(args.size, args.backbone).to(device).train()
    batch = synthetic_batch(model, args.batch or size.batch, model.image_size, device)
    schedule, no_add = VARIANTS[args.only]
    loss = HistLoss(HistLossConfig(schedule=schedule, queue_size=size.queue), model)
    if no_add:
        next(term for name, _, term in loss.terms if name == "add").loss = _no_addition
    stepper = ProfiledStepper(model, loss.to(device), batch, args, device)
    for _ in range(args.warmup):
        stepper.step()
    ms, peak = stepper.timed(args.steps)
    return {"ms": ms, "peak": peak, "saved": saved_activation_mib(stepper), "ranges": profile_step(stepper, device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--backbone", choices=backbone_names(), default="albef")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per variant (peak memory, ms/step)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--only", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # the per-variant child
    args = ap.parse_args()
    if args.bf16 is None:
        args.bf16 = args.size == "base" and args.device.startswith("cuda")
    if args.only:
        print(json.dumps(run_variant(args)))
        return
    # each variant in a fresh process: a process's allocator keeps what an earlier variant freed,
    # which would hide the later variants' peak memory
    variants = {}
    for name in VARIANTS:
        child = [sys.executable, __file__, *sys.argv[1:], "--only", name]
        done = subprocess.run(child, check=True, capture_output=True, text=True)
        variants[name] = json.loads(done.stdout.strip().splitlines()[-1])

    n = args.batch or SIZES[args.size].batch
    mem = "peak CUDA alloc MiB" if args.device.startswith("cuda") else "peak RSS delta MiB"
    print(f"\n{args.backbone} {args.size}, batch {n}, {args.device}, bf16={args.bf16}, "
          f"{args.steps} timed step(s) after {args.warmup} warm-up, one process per variant\n")
    print(f"| step | ms/step | {mem} | saved activations MiB | vs baseline (time, memory, activations) |\n"
          f"|---|---|---|---|---|")
    base = variants["baseline"]
    for name, v in variants.items():
        print(f"| {name} | {v['ms']:.0f} | {v['peak']:.0f} | {v['saved']:.0f} | {v['ms'] / base['ms']:.2f}x, "
              f"{v['peak'] / max(base['peak'], 1e-9):.2f}x, {v['saved'] / base['saved']:.2f}x |")
    labels = ["forward (all losses)"] + [r[0] for r in RANGES] + ["backward (incl. double backward)", "optimizer (AdamW)"]
    print("\n| range (profiled step, ms) | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants))
    for label in labels:
        cells = [f"{v['ranges'][label]:.0f}" if label in v["ranges"] else "-" for v in variants.values()]
        if any(c != "-" for c in cells):
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
