"""A synthetic VQA set from the synthetic world, in ALBEF's json layout.

Why: `hist-vlm train demo_vqa` and `hist-vlm eval vqa` must run end to end on a CPU with no
download. The scenes are the synthetic world's own (`render_scene(scene_rng(seed, split, i))`,
so scene i of a split is the same picture the HIST demo trains on); each scene gets questions
about colour, shape, count, presence and relative position, each with 10 annotator answers of
which a seeded few disagree, as real VQA v2 annotators do.

On disk (under `out_dir`): images/<split>/<split>_<i>.png, vqa_<split>.json (records with
"answer_type"), answer_list.json (every answer the generator can give).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from hist_vlm._io import atomic_dir, atomic_write_text
from hist_vlm.demo.synthetic import COLOURS, SHAPES, SPLITS, SceneObject, WorldConfig, render_scene, scene_rng

ANNOTATORS = 10
NUMBERS = ("2", "3", "4")          # the world's object counts, written as VQA v2 writes numbers
SIDES = ("left", "right")
#: how many of the 10 annotators disagree, drawn uniformly from this tuple
_DISAGREEING = (0, 0, 0, 1, 1, 2, 3)
_QUESTION_CODE = 10                # question_id = (split code * 10^7) + scene * 10 + question number


def answer_list() -> list[str]:
    return ["yes", "no", *NUMBERS, *COLOURS, *SHAPES, *SIDES]


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    answer_type: str               # "yes/no" | "number" | "other"
    alternatives: tuple[str, ...]  # what a disagreeing annotator may say instead


def _questions(rng: np.random.Generator, objects: list[SceneObject]) -> list[Question]:
    """A question of each kind about the scene's objects (all shapes in a scene differ; the shape
    question only where some object is named by its colour, or size and colour, alone)."""
    colours, present = list(COLOURS), {(o.colour, o.shape) for o in objects}
    a, b = (objects[i] for i in rng.choice(len(objects), 2, replace=False))
    out = [
        Question(f"what color is the {a.shape}?", a.colour, "other", tuple(colours)),
        Question("how many shapes are there?", str(len(objects)), "number", NUMBERS),
    ]
    for o in objects:          # the shape of the first object that its colour (and size) name alone
        for words in ((o.colour,), (o.size, o.colour)):
            if sum((x.colour,) == words or (x.size, x.colour) == words for x in objects) == 1:
                out.append(Question(f"what shape is the {' '.join(words)} object?", o.shape, "other", SHAPES))
                break
        else:
            continue
        break
    if rng.random() < 0.5:     # presence: half asked about an object that is there
        colour, shape = b.colour, b.shape
    else:
        absent = [(c, s) for c in colours for s in SHAPES if (c, s) not in present]
        colour, shape = absent[int(rng.integers(len(absent)))]
    out.append(Question(f"is there a {colour} {shape}?", "yes" if (colour, shape) in present else "no",
                        "yes/no", ("yes", "no")))
    side = "left" if a.centre[0] < b.centre[0] else "right"
    out.append(Question(f"is the {a.shape} on the left or the right of the {b.shape}?", side, "other", SIDES))
    return out


def _annotate(rng: np.random.Generator, q: Question) -> list[str]:
    """10 answers: the true one, with a seeded few replaced by another plausible answer."""
    answers = [q.answer] * ANNOTATORS
    wrong = [x for x in q.alternatives if x != q.answer]
    for k in rng.choice(ANNOTATORS, _DISAGREEING[int(rng.integers(len(_DISAGREEING)))], replace=False):
        answers[k] = wrong[int(rng.integers(len(wrong)))]
    return answers


def generate_vqa_world(
    out_dir: str | Path, n_train: int = 512, n_val: int = 64, n_test: int = 0, image_size: int = 64,
    seed: int = 0, progress: bool = True,
) -> dict[str, Path]:
    """Write the set; returns {"train": ..., "val": ..., ["test": ...,] "answer_list": ...}.
    Everything depends on (seed, split, scene index) only."""
    root = Path(out_dir)
    config = WorldConfig(image_size=image_size)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(c < 0 for c in counts.values()):
        raise ValueError("scene counts must be >= 0")
    paths: dict[str, Path] = {}
    bar = tqdm(total=sum(counts.values()), desc="synthetic VQA", unit="img", disable=not progress)
    for code, split in enumerate(SPLITS):
        if not counts[split]:
            continue
        records = []
        with atomic_dir(root / "images" / split) as images:   # the split's images built whole, then put in place
            for i in range(counts[split]):
                scene = render_scene(scene_rng(seed, split, i), config)
                image = f"images/{split}/{split}_{i:05d}.png"
                Image.fromarray(scene.image).save(images / Path(image).name)
                rng = np.random.default_rng([seed, code, i, 1])   # apart from the scene's own stream
                for k, q in enumerate(_questions(rng, scene.objects)):
                    records.append({"image": image, "question": q.text, "answer": _annotate(rng, q),
                                    "question_id": code * 10**7 + i * _QUESTION_CODE + k,
                                    "answer_type": q.answer_type, "dataset": "vqa"})
                bar.update()
        paths[split] = root / f"vqa_{split}.json"
        atomic_write_text(paths[split], json.dumps(records))
    bar.close()
    paths["answer_list"] = root / "answer_list.json"
    atomic_write_text(paths["answer_list"], json.dumps(answer_list()))
    return paths
