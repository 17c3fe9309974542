"""LLaVA's decoder pass, side by side in one run: prefix, image and suffix run once per image and
every row reads their keys/values, running only its last prompt token and its text (the shared
pass, `LlavaBackbone._decode`), against every row running the whole sequence (the full pass,
what gradient checkpointing falls back to). One HIST-loss step (LM + rank + phrase, subject and
addition terms, GradCAM's double backward included): forward + backward, no optimizer.

The tiny LLaVA with a larger image grid: at 64 px, 8 x 8 = 64 image tokens of 73 shared
positions per row, against T ~ 2-20 text tokens (LLaVA-1.5: 576 of ~600).

    python benchmarks/bench_llava_prefix.py                       # 64 px, LM width 32, CPU
    python benchmarks/bench_llava_prefix.py --width 256           # compute rather than per-op overhead
    python benchmarks/bench_llava_prefix.py --image-size 96 --width 512 --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

from bench_step import synthetic_batch
from hist_vlm.losses.hist import HistLoss, HistLossConfig
from hist_vlm.models.llava import LlavaBackbone, llava_config, llava_tokenizer

#: position-table room for the text after the prompt and the image tokens
TEXT_ROOM = 64


def build(image_size: int, width: int) -> LlavaBackbone:
    """The tiny LLaVA at `image_size` px (patch 8) with an LM of `width` (4 layers, 4 query heads
    on 2 key/value heads), its position table long enough for the grid."""
    config = llava_config(llava_tokenizer(), "tiny", image_size=image_size)
    text = config.text_config
    text.hidden_size, text.intermediate_size = width, 2 * width
    text.head_dim = width // text.num_attention_heads
    text.max_position_embeddings = config.image_seq_length + TEXT_ROOM
    return LlavaBackbone.from_config({"transformers": config.to_dict()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=64, help="px; the grid is (size / 8)^2 image tokens")
    ap.add_argument("--width", type=int, default=32,
                    help="the LM's width (the tiny's: 32; 256 measures compute rather than per-op overhead)")
    ap.add_argument("--batch", type=int, default=8, help="images per step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed blocks of --steps, alternating the two passes; the median block is reported")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.image_size, args.width).to(device).train()
    batch = synthetic_batch(model, args.batch, model.image_size, device)
    loss_fn = HistLoss(HistLossConfig(schedule="constant"), model).to(device)
    passes = {  # the model as it is, and as if checkpointed: then every row runs all L positions
        "shared (once per image)": contextlib.nullcontext(),
        "full (every row)": mock.patch.object(LlavaBackbone, "_checkpointing", property(lambda self: True)),
    }

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch, progress=0.5)["loss"].backward()

    def timed(name: str) -> float:
        """ms per step of `args.steps` steps of the named pass."""
        with passes[name]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000 / args.steps

    for name in passes:
        with passes[name]:
            for _ in range(args.warmup):
                step()
    blocks: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.repeats):  # alternate, so load changes hit both sides
        for name in passes:
            blocks[name].append(timed(name))
    ms = {name: statistics.median(runs) for name, runs in blocks.items()}
    rows = sum(len(r) for r in (batch.captions, batch.phrases, batch.subjects, batch.pair_first, batch.pair_second,
                                batch.composites))
    print(f"\ntiny LLaVA (LM width {args.width}) at {args.image_size} px ({model.num_image_tokens} image tokens, "
          f"{model._text_start} prompt positions), {args.batch} images, {rows} text rows before negatives, "
          f"{device}, median of {args.repeats} blocks of {args.steps} steps after {args.warmup} warm-up\n")
    print("| decoder pass | ms/step |\n|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} |")
    shared, full = ms.values()
    print(f"| full / shared | {full / shared:.2f}x |")


if __name__ == "__main__":
    main()
