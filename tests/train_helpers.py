"""Shared by the training and dataset tests: a tiny parse file + image folder, written by hand."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "star", "triangle"]


def write_world(root: Path, n_images: int = 8, size: int = 40, side_words: bool = False) -> tuple[Path, Path]:
    """n_images PNGs (random noise, so flips and crops change pixels) and their parse records.
    Returns (phrase file, image root)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(n_images):
        name = f"img{k:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / name)
        a = f"a {COLOURS[k % 4]} {SHAPES[k % 4]}"
        b = f"a {COLOURS[(k + 1) % 4]} {SHAPES[(k + 2) % 4]}"
        relation = "to the left of" if side_words else "near"
        phrases = [
            {"text": a, "subject": SHAPES[k % 4]},
            {"text": b, "subject": SHAPES[(k + 2) % 4]},
        ]
        lines.append({
            "image": name,
            "captions": [f"{a} {relation} {b}", f"there is {b}"],
            "phrases": phrases,
            "pairs": [[0, 1], [1, 0]] if k % 3 else [],   # some images have no pair
        })
    path = root / "phrases.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, images
