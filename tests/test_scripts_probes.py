"""The diagnostic scripts behind the README's "why the base plateaus" tables."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hist_vlm.data.grounding import read_synthetic
from hist_vlm.data.synthetic import generate_world
from hist_vlm.models import load_backbone

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, form", [
    ("the hexagon", "bare"), ("the red hexagon", "colour"), ("the small hexagon", "size"),
    ("the large white star", "size colour"),
])
def test_query_form_names_what_a_single_query_says(text, form):
    assert load_script("probe_grounding_words").query_form(text) == form


def test_swap_and_mask_asks_every_single_query_once_per_named_word(tmp_path):
    probe = load_script("probe_grounding_words")
    world = generate_world(tmp_path / "w", n_train=0, n_val=0, n_test=6, image_size=64, seed=3, progress=False)
    records = read_synthetic(world.grounding, ["test"])
    singles = [r for r in records if r.kind == "single"]
    coloured = sum(probe.query_form(r.text) in ("colour", "size colour") for r in singles)
    scores = probe.swap_and_mask(load_backbone("demo_base").eval(), records)
    assert scores["mlm shape"][1] == len(singles) and scores["mlm colour"][1] == coloured
    assert 0 < scores["itm shape swap"][1] <= len(singles)        # only where an absent shape exists
    assert all(0.0 <= acc <= 1.0 for acc, _ in scores.values())


def test_capacity_probe_labels_the_token_under_each_object_centre(tmp_path):
    probe = load_script("probe_vision_capacity")
    world = generate_world(tmp_path / "w", n_train=2, n_val=0, n_test=0, image_size=64, seed=0, progress=False)
    pixels, labels = probe.labelled_tokens(world.root, "train", "shape", 16, 4, lambda im: torch.zeros(3, 64, 64))
    singles = [json.loads(x) for x in world.grounding.read_text().splitlines() if '"single"' in x]
    assert pixels.shape == (2, 3, 64, 64) and sum(map(len, labels)) == len(singles)
    first = singles[0]
    x1, y1, x2, y2 = first["boxes"][0]
    patch, shape = labels[0][0]
    assert divmod(patch, 16) == (int((y1 + y2) / 8), int((x1 + x2) / 8))
    assert probe.CLASSES["shape"][shape] == first["text"].split()[-1]
