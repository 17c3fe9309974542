"""Images per second of the real training input pipeline in ONE loader process, and how many
DataLoader workers a GPU step of a given speed needs.

Side by side, on the same generated COCO-like JPEGs (640 x 480) at the training size:
  HIST      `HistDataset` + `HistCollate` as a HIST run builds them: JPEG decode, random resized
            crop, flip, normalise, and the tokenisation of the 5 text kinds (caption, phrase,
            subject, the pair's two phrases and their composite) for every image
  images    the same datasets' image work only (decode, crop, flip, normalise): the floor any
            objective pays, what a baseline run would cost with a caption-only collate
The collate's share is the difference. One process, one torch thread: what each DataLoader
worker does (workers are separate processes, so the throughput adds up over them until the
cores run out).

    python benchmarks/bench_loader.py                         # 256 px, batch 56, ALBEF's tokenizer
    python benchmarks/bench_loader.py --target 300 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hist_vlm.data.dataset import HistCollate, HistDataset, read_parse_output
from hist_vlm.models.tokenization import AlbefTokenizer
from hist_vlm.text.corpus import ImageRecord as ParsedImage
from hist_vlm.text.types import Phrase

WORDS = "man woman dog cat horse red small wooden table frisbee bus umbrella beach street green tall".split()


def write_corpus(root: Path, n: int, seed: int = 0) -> Path:
    """`n` 640 x 480 JPEGs (smooth colour fields plus noise: COCO-like file sizes) and a
    `hist-vlm parse`-style JSONL with 5 captions, 3 phrases and a pair per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    lines = []
    for k in range(n):
        base = np.stack([np.sin(xx / rng.uniform(20, 90) + c) * np.cos(yy / rng.uniform(20, 90)) for c in range(3)], -1)
        pixels = np.clip(127 + 90 * base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{k:05d}.jpg", quality=90)
        subjects = rng.choice(WORDS, 3, replace=False)
        captions = [f"a {w} " + " ".join(rng.choice(WORDS, rng.integers(8, 14))) for w in (*subjects, "man", "dog")]
        phrases = [(c, Phrase(f"a {w}", 0, 2 + len(w), str(w), 2, 2 + len(w), str(w))) for c, w in enumerate(subjects)]
        lines.append(ParsedImage(f"{k:05d}.jpg", captions, phrases, [(0, 1), (1, 2)]).to_json())
    path = root / "phrases.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def images_per_second(dataset: HistDataset, collate, batch: int, batches: int, tokenize: bool) -> float:
    """Throughput of `batches` batches of `batch` images, epoch 0 onwards (a fresh draw each)."""
    keys = [(b // (len(dataset) // batch), (b * batch + i) % len(dataset)) for b in range(batches) for i in range(batch)]
    start = time.perf_counter()
    for b in range(batches):
        samples = [dataset[key] for key in keys[b * batch:(b + 1) * batch]]
        if tokenize:
            collate(samples)
        else:
            torch.stack([s.pixel_values for s in samples])
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=224, help="generated JPEGs")
    ap.add_argument("--size", type=int, default=256, help="training image size")
    ap.add_argument("--batch", type=int, default=56)
    ap.add_argument("--batches", type=int, default=4, help="batches per timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", type=float, default=300.0, help="images/s the GPU step consumes")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        phrases = write_corpus(root, args.images)
        kb = statistics.mean(p.stat().st_size for p in root.glob("*.jpg")) / 1024
        records, _ = read_parse_output(phrases, root)
        dataset = HistDataset(records, root, args.size, crop_scale=(0.5, 1.0), hflip=True)
        collate = HistCollate(AlbefTokenizer(), 25)
        images_per_second(dataset, collate, args.batch, 1, True)                # warm-up
        runs = {"HIST": [], "images": []}
        for _ in range(args.repeats):                                           # interleaved
            runs["HIST"].append(images_per_second(dataset, collate, args.batch, args.batches, True))
            runs["images"].append(images_per_second(dataset, collate, args.batch, args.batches, False))
    median = {k: statistics.median(v) for k, v in runs.items()}
    print(f"one loader process, 1 torch thread, {args.size} px from 640 x 480 JPEGs ({kb:.0f} KB on average; "
          f"COCO's average about 160 KB), batch {args.batch}, median of {args.repeats}:")
    for name, value in median.items():
        workers = math.ceil(args.target / value)
        print(f"  {name:7s} {value:7.1f} images/s per worker -> {workers} workers for {args.target:.0f} images/s")
    print(f"  HIST collate share: {1 - median['HIST'] / median['images']:.1%} of the HIST pipeline's time "
          f"(images / HIST = {median['images'] / median['HIST']:.2f}x)")


if __name__ == "__main__":
    main()
