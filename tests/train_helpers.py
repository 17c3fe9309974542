"""Shared by the training and dataset tests: a tiny parse file + image folder, written by hand."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "star", "triangle"]


def _phrase(captions: list[str], index: int, text: str) -> dict:
    """A `hist-vlm parse` phrase record; the subject is the last word."""
    start = captions[index].index(text)
    subject = text.split()[-1]
    sub_start = start + text.rindex(subject)
    return {"text": text, "subject": subject, "caption_index": index, "start": start,
            "end": start + len(text), "subject_start": sub_start, "subject_end": sub_start + len(subject),
            "subject_lemma": subject}


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
        captions = [f"{a} {relation} {b}", f"there is {b}"]
        lines.append({
            "image": name,
            "captions": captions,
            "phrases": [_phrase(captions, 0, a), _phrase(captions, 0, b)],
            "pairs": [[0, 1], [1, 0]] if k % 3 else [],   # some images have no pair
        })
    path = root / "phrases.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, images


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIGS = Path(__file__).resolve().parent.parent / "src" / "hist_vlm" / "demo" / "configs"


def tiny_overrides(phrases: Path, images: Path, run_dir: Path, *extra: str) -> list[str]:
    """demo_tiny.yaml shrunk to a few-second run on hand-written data: image 32 px, width 32,
    no dropout (so one process and many give the same numbers), one log line per step."""
    return [
        "data.synthetic.enabled=false", f"data.phrases={phrases}", f"data.image_root={images}",
        "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
        "model.params.image_size=32", "model.params.vision_width=32", "model.params.text_width=32",
        "model.params.text_intermediate_size=64", "model.params.embed_dim=16",
        "model.params.hidden_dropout=0.0", "model.params.attention_dropout=0.0",
        "loss.queue_size=32", "schedule.epochs=2", "schedule.warmup_steps=2",
        "run.log_every=1", "run.save_every=1000", f"run.dir={run_dir}", *extra,
    ]


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


#: a tiny ALBEF training config for the CLI tests (RUNDIR: the run folder)
TINY_ALBEF_YAML = """
model:
  name: albef
  params: {image_size: 64, patch_size: 16, vision_width: 32, vision_depth: 2, vision_heads: 2,
           text_width: 32, text_layers: 3, text_heads: 2, text_intermediate_size: 64,
           fusion_layer: 1, embed_dim: 16, momentum: false, max_position_embeddings: 40}
loss:
  capture_layers: [1]
run:
  dir: RUNDIR
"""
