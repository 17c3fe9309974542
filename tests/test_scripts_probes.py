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


def test_shape_tags_mark_exactly_the_shapes_each_scene_holds(tmp_path):
    probe = load_script("probe_shape_tags")
    world = generate_world(tmp_path / "w", n_train=3, n_val=0, n_test=0, image_size=64, seed=2, progress=False)
    pixels, tags = probe.presence_tags(world.root, "train", lambda im: torch.zeros(3, 64, 64))
    scenes = {}
    for line in world.grounding.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "single":
            scenes.setdefault(rec["image"], set()).add(rec["text"].split()[-1])
    assert pixels.shape == (3, 3, 64, 64) and tags.shape == (3, len(probe.SHAPES))
    for row, image in enumerate(sorted(scenes)):
        assert {probe.SHAPES[i] for i in tags[row].nonzero().flatten().tolist()} == scenes[image]


def test_caption_word_tags_mark_the_words_each_scenes_captions_use(tmp_path):
    probe = load_script("probe_shape_tags")
    world = generate_world(tmp_path / "w", n_train=40, n_val=0, n_test=0, image_size=64, seed=2, progress=False)
    words_of = {}
    for line in (world.root / "captions_train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        words_of[rec["image"]] = set(" ".join(rec["captions"]).lower().replace(",", " ").replace(":", " ").split())
    images = sorted(words_of)
    tags, vocab = probe.caption_word_tags(world.root, "train", images)
    assert tags.shape == (40, len(vocab)) and "a" not in vocab  # "a" is in every scene: it tells none apart
    assert set(probe.SHAPES) <= set(vocab) and {"red", "small"} <= set(vocab)
    for row, image in enumerate(images):
        assert {w for w, on in zip(vocab, tags[row].tolist()) if on} == words_of[image] & set(vocab)


def test_pooled_takes_the_max_or_the_mean_over_patch_tokens_only():
    probe = load_script("probe_shape_tags")
    tokens = torch.tensor([[[100.0, -100.0], [1.0, 2.0], [3.0, -4.0]]])      # [1, 1+P, D]: class token first
    tower = type("Tower", (), {"forward_features": staticmethod(lambda pixels: tokens)})()
    assert probe.pooled(tower, None, "max").tolist() == [[3.0, 2.0]]
    assert probe.pooled(tower, None, "mean").tolist() == [[2.0, -1.0]]


def test_mean_auc_is_one_for_a_perfect_ranking_half_for_ties_and_zero_reversed():
    probe = load_script("probe_shape_tags")
    tags = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    assert probe.mean_auc(tags * 2 - 1, tags) == 1.0
    assert probe.mean_auc(torch.zeros(4, 2), tags) == 0.5
    assert probe.mean_auc(1 - tags, tags) == 0.0


def test_miss_locations_split_misses_by_what_the_point_falls_in():
    probe = load_script("probe_miss_locations")
    objects = {"q": [(10, 10, 20, 20)], "c": []}   # q's image holds one other object (xyxy)
    rows = [
        {"id": "q", "kind": "single", "hit": True, "point": [0, 0]},
        {"id": "q", "kind": "single", "hit": False, "point": [15, 15]},   # inside the other object
        {"id": "q", "kind": "single", "hit": False, "point": [20, 15]},   # on its edge: not strictly inside
        {"id": "c", "kind": "composite", "hit": False, "point": [15, 15]},  # composites are not counted
    ]
    assert probe.miss_locations(rows, objects, "xyxy") == {"hit": 1, "another object": 1, "background": 1}
