"""Can a vision tower learn an attribute of the synthetic world's objects when it is told it?

A diagnostic of capacity, not a training recipe: HIST and the demo never see these labels. A
fresh ALBEF vision tower (the demo base's sizes, overridable) and a linear head on the patch
token at each object's box centre are trained on the world's labels (the shape, or the colour
where a query names one) and scored on a world with another seed. If the tower cannot learn
shapes even with labels, no caption loss will teach them quickly.

    python scripts/probe_vision_capacity.py [--target shape|colour] [--steps 600] [KEY=VALUE ...]
    python scripts/probe_vision_capacity.py --frozen [--model MODEL | KEY=VALUE ...]

KEY=VALUE are `AlbefConfig` fields, e.g. `patch_embed=conv conv_stem_extra=1`. `--frozen`
trains the head alone: how much of the attribute a tower (random, or `--model`'s, trained on
captions) already holds, linearly, at an object's centre token.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from PIL import Image

from hist_vlm.data.synthetic import COLOURS, SHAPES, generate_world
from hist_vlm.eval.runner import eval_transform
from hist_vlm.models import load_backbone
from hist_vlm.models.albef import AlbefConfig, build_vision_encoder

DEMO_VISION = dict(image_size=64, patch_size=4, vision_width=64, vision_depth=2, vision_heads=2)
CLASSES = {"shape": list(SHAPES), "colour": list(COLOURS)}


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def labelled_tokens(world: Path, split: str, target: str, grid: int, cell: int, preprocess):
    """(pixels [B, 3, H, W], per image a list of (patch index, class)) from single queries."""
    per_image: dict[str, list[tuple[int, int]]] = {}
    for line in (world / "grounding.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] != "single" or rec["split"] != split:
            continue
        named = [w for w in rec["text"].split() if w in CLASSES[target]]
        if not named:
            continue
        x1, y1, x2, y2 = rec["boxes"][0]
        patch = int((y1 + y2) / 2 / cell) * grid + int((x1 + x2) / 2 / cell)
        per_image.setdefault(rec["image"], []).append((patch, CLASSES[target].index(named[-1])))
    images = list(per_image)
    pixels = torch.stack([preprocess(Image.open(world / i).convert("RGB")) for i in images])
    return pixels, [per_image[i] for i in images]


def token_logits(vision, head, pixels, labels):
    tokens = vision.forward_features(pixels)[:, 1:]                          # [B, P, D]
    image = torch.tensor([b for b, items in enumerate(labels) for _ in items])
    patch = torch.tensor([p for items in labels for p, _ in items])
    return head(tokens[image, patch]), torch.tensor([c for items in labels for _, c in items])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=list(CLASSES), default="shape")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--train-scenes", type=int, default=2048)
    ap.add_argument("--test-scenes", type=int, default=640)
    ap.add_argument("--model", help="start from this trained model's vision tower (its config; no overrides)")
    ap.add_argument("--frozen", action="store_true", help="train the linear head only: what the tower already encodes")
    ap.add_argument("overrides", nargs="*", help="AlbefConfig fields as KEY=VALUE")
    args = ap.parse_args()
    if args.model and args.overrides:
        ap.error("--model brings its own config: give either --model or KEY=VALUE overrides")
    torch.manual_seed(0)
    params = {**DEMO_VISION, "init": "fan_in", "momentum": False,
              **{k: parse_value(v) for k, v in (o.split("=", 1) for o in args.overrides)}}
    if args.model:
        model = load_backbone(args.model)
        cfg, vision = model.config, model.visual_encoder
    else:
        cfg = AlbefConfig(**params)
        vision = build_vision_encoder(cfg)
    vision.requires_grad_(not args.frozen)
    head = torch.nn.Linear(cfg.vision_width, len(CLASSES[args.target]))
    grid, cell = cfg.image_size // cfg.patch_size, cfg.patch_size
    preprocess = eval_transform(SimpleNamespace(image_size=cfg.image_size))      # the evaluation's resize + CLIP norm
    with tempfile.TemporaryDirectory() as tmp:
        train_world, test_world = Path(tmp) / "train", Path(tmp) / "test"
        generate_world(train_world, n_train=args.train_scenes, n_val=0, n_test=0, image_size=cfg.image_size,
                       seed=0, progress=False)
        generate_world(test_world, n_train=0, n_val=0, n_test=args.test_scenes, image_size=cfg.image_size,
                       seed=1, progress=False)
        pixels, labels = labelled_tokens(train_world, "train", args.target, grid, cell, preprocess)
        test_pixels, test_labels = labelled_tokens(test_world, "test", args.target, grid, cell, preprocess)
    opt = torch.optim.AdamW([p for p in (*vision.parameters(), *head.parameters()) if p.requires_grad], lr=1e-3, weight_decay=0.02)
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(pixels), (32,))
        logits, classes = token_logits(vision, head, pixels[batch], [labels[i] for i in batch])
        loss = F.cross_entropy(logits, classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == args.steps:
            vision.eval()
            with torch.no_grad():
                logits, classes = token_logits(vision, head, test_pixels, test_labels)
            vision.train()
            accuracy = (logits.argmax(1) == classes).float().mean().item()
            print(f"step {step}: train loss {loss.item():.3f}, test {args.target} accuracy {100 * accuracy:.1f} % "
                  f"(chance {100 / len(CLASSES[args.target]):.1f} %; {time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
