"""Which words of the synthetic world does a model ground: colour, shape, size?

Pointing alone cannot say why a model misses. This script splits it by what a single-object
query names ("the hexagon", "the red hexagon", "the small hexagon", "the small red hexagon":
the shape is always named) and asks the model two more questions with no map involved:

- ITM: is "the red hexagon" scored a better match than the same query with its shape (or its
  colour) swapped for one that is nowhere in the scene? 50 % = the word is ignored.
- MLM: with the shape (colour) word masked, is the right one the most likely of the world's
  shapes (colours)? 1 / 8 shapes, 1 / len(COLOURS) colours is chance.

It scores the test split of a world it writes itself (default: `generate_world(seed=1)`, 640
scenes at 64 px, disjoint from the demo's seed-0 world), at the GradCAM layers given.

    python scripts/probe_grounding_words.py MODEL [--layers 0,1] [--scenes 640] [--world DIR]
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
from pathlib import Path

import torch
from PIL import Image

from hist_vlm.batch import TextRows
from hist_vlm.data.grounding import read_synthetic
from hist_vlm.data.synthetic import COLOURS, SHAPES, SIZES, generate_world
from hist_vlm.eval.runner import GradcamMaps, eval_transform, evaluate
from hist_vlm.models import load_backbone


def query_form(text: str) -> str:
    """"bare", "colour", "size" or "size colour": which attributes a single query names."""
    words = text.split()[1:-1]                       # between "the" and the shape
    named = [k for k, vocab in (("size", SIZES), ("colour", COLOURS)) if any(w in vocab for w in words)]
    return " ".join(named) or "bare"


def pointing_by_form(model, records, layers: list[int], out: Path) -> dict[str, tuple[float, int]]:
    evaluate(records, GradcamMaps(model, layers=layers, head=None, combine="mean"), batch_size=64,
             out=out, progress=False)
    hits: dict[str, list[int]] = collections.defaultdict(list)
    for line in out.read_text().splitlines():
        res = json.loads(line)
        if res["kind"] == "single":
            hits[query_form(res["text"])].append(int(res["hit"]))
    return {k: (sum(v) / len(v), len(v)) for k, v in sorted(hits.items())}


@torch.no_grad()
def swap_and_mask(model, records, seed: int = 0) -> dict[str, tuple[float, int]]:
    """ITM swap accuracy and MLM accuracy for the shape and the colour word of single queries."""
    preprocess, mt = eval_transform(model), model.mask_tokens
    rng = random.Random(seed)
    by_image: dict[Path, list[str]] = collections.defaultdict(list)
    for r in records:
        if r.kind == "single":
            by_image[r.image].append(r.text)
    token = {w: int(model.tokenize([w])[0][0, 1]) for w in (*SHAPES, *COLOURS)}
    vocab = {"shape": torch.tensor([token[s] for s in SHAPES]), "colour": torch.tensor([token[c] for c in COLOURS])}
    right: collections.Counter = collections.Counter()
    seen: collections.Counter = collections.Counter()
    for image, texts in by_image.items():
        embeds = model.encode_image(preprocess(Image.open(image).convert("RGB")).unsqueeze(0))  # [1, 1+P, Dv]
        in_scene = {w for t in texts for w in t.split()}
        for text in texts:
            words = text.split()
            slots = {"shape": len(words) - 1}
            colour_at = [i for i, w in enumerate(words) if w in COLOURS]
            if colour_at:
                slots["colour"] = colour_at[0]
            for kind, at in slots.items():
                absent = [w for w in (SHAPES if kind == "shape" else COLOURS) if w not in in_scene]
                if absent:                                   # ITM: true query vs one word swapped
                    swapped = " ".join([*words[:at], rng.choice(absent), *words[at + 1:]])
                    ids, mask = model.tokenize([text, swapped])
                    rows = TextRows(ids, mask, torch.zeros(2, dtype=torch.long))
                    fused = model.fuse_rows(rows, embeds, text_embeds=model.encode_text(ids, mask))
                    p_match = model.itm_logits(fused).softmax(-1)[:, 1]
                    right[f"itm {kind} swap"] += int(p_match[0] > p_match[1])
                    seen[f"itm {kind} swap"] += 1
                ids, mask = model.tokenize([text])           # MLM: the word masked, among its kind
                pos = int((ids[0] == token[words[at]]).nonzero()[-1])
                masked = ids.clone()
                masked[0, pos] = mt.mask_token_id
                logits = model.mlm_logits(masked, mask, embeds, torch.zeros(1, dtype=torch.long))[0, pos]
                right[f"mlm {kind}"] += int(vocab[kind][logits[vocab[kind]].argmax()] == ids[0, pos])
                seen[f"mlm {kind}"] += 1
    return {k: (right[k] / seen[k], seen[k]) for k in sorted(seen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a saved model folder or checkpoint (demo_base for the shipped base)")
    ap.add_argument("--layers", default="0,1", help="GradCAM cross-attention layers, mean-combined")
    ap.add_argument("--scenes", type=int, default=640, help="test scenes of the probe world")
    ap.add_argument("--seed", type=int, default=1, help="the probe world's seed (the demo's is 0)")
    ap.add_argument("--world", type=Path, help="where to write the world (default: a temporary folder)")
    args = ap.parse_args()
    model = load_backbone(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        world = args.world or Path(tmp) / "world"
        if not (world / "grounding.jsonl").is_file():
            generate_world(world, n_train=1, n_val=1, n_test=args.scenes, image_size=model.image_size,
                           seed=args.seed, progress=False)
        records = read_synthetic(world / "grounding.jsonl", ["test"])
        layers = [int(x) for x in args.layers.split(",")]
        forms = pointing_by_form(model, records, layers, Path(tmp) / "eval.jsonl")
        probes = swap_and_mask(model, records)
    total = sum(a * n for a, n in forms.values()) / sum(n for _, n in forms.values())
    print(f"single-phrase pointing {100 * total:.1f} %, by what the query names:")
    for form, (acc, n) in forms.items():
        print(f"  {form:12s} {100 * acc:5.1f} %  ({n} queries)")
    print(f"ITM swap: true query preferred (50 % = word ignored); MLM: masked word recovered "
          f"(chance: shape {100 / len(SHAPES):.1f} %, colour {100 / len(COLOURS):.1f} %)")
    for key, (acc, n) in probes.items():
        print(f"  {key:16s} {100 * acc:5.1f} %  ({n})")


if __name__ == "__main__":
    main()
