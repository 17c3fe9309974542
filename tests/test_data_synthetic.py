import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hist_vlm.demo.synthetic import (
    COLOURS,
    SHAPES,
    WorldConfig,
    generate_world,
    render_scene,
    scene_rng,
)
from hist_vlm.data.captions import read_captions
from hist_vlm.text.pairs import composite_text, pairs_for_image
from hist_vlm.text.spacy_parser import SpacyParser


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return generate_world(root, n_train=24, n_val=6, n_test=8, image_size=64, seed=3, progress=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_files_and_counts(world):
    for split, n in [("train", 24), ("val", 6), ("test", 8)]:
        recs = _jsonl(world.captions[split])
        assert len(recs) == n
        for r in recs:
            assert set(r) == {"image", "captions"}
            assert 3 <= len(r["captions"]) <= 5
            with Image.open(world.root / r["image"]) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
    meta = json.loads(world.manifest.read_text())
    assert meta["seed"] == 3 and meta["config"]["image_size"] == 64


def test_grounding_records_match_masks(world):
    recs = _jsonl(world.grounding)
    assert {r["split"] for r in recs} == {"train", "val", "test"}
    kinds = {r["kind"] for r in recs}
    assert kinds == {"single", "composite"}
    for r in recs:
        ids = np.asarray(Image.open(world.root / r["masks"]))
        assert ids.shape == (r["height"], r["width"]) == (64, 64)
        assert len(r["boxes"]) == len(r["object_ids"]) == (1 if r["kind"] == "single" else 2)
        if r["kind"] == "composite":
            assert " and " in r["text"] and len(set(r["object_ids"])) == 2
        for (x1, y1, x2, y2), k in zip(r["boxes"], r["object_ids"]):
            ys, xs = np.nonzero(ids == k)
            # the box is the tight xyxy box of the mask, x2/y2 exclusive
            assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert x2 - x1 >= 8 and y2 - y1 >= 8


def test_every_object_has_a_single_query_naming_its_shape(world):
    recs = _jsonl(world.grounding)
    by_image: dict[str, list[dict]] = {}
    for r in recs:
        by_image.setdefault(r["image"], []).append(r)
    for image, rs in by_image.items():
        ids = np.unique(np.asarray(Image.open(world.root / rs[0]["masks"])))
        objects = set(ids[ids > 0].tolist())
        singles = [r for r in rs if r["kind"] == "single"]
        assert {r["object_ids"][0] for r in singles} == objects
        assert 2 <= len(objects) <= 4
        for r in singles:
            assert sum(s in r["text"].split() for s in SHAPES) == 1


def test_deterministic_and_split_independent(tmp_path):
    a = generate_world(tmp_path / "a", 3, 2, 2, image_size=48, seed=7, progress=False)
    b = generate_world(tmp_path / "b", 9, 2, 2, image_size=48, seed=7, progress=False)
    c = generate_world(tmp_path / "c", 3, 2, 2, image_size=48, seed=8, progress=False)
    assert a.captions["val"].read_text() == b.captions["val"].read_text()
    assert _jsonl(a.captions["train"]) == _jsonl(b.captions["train"])[:3]
    for rel in ["images/val/val_00000.png", "images/test/test_00001.png", "masks/val/val_00001.png"]:
        assert np.array_equal(np.asarray(Image.open(a.root / rel)), np.asarray(Image.open(b.root / rel)))
    assert a.captions["train"].read_text() != c.captions["train"].read_text()
    assert not np.array_equal(
        np.asarray(Image.open(a.root / "images/train/train_00000.png")),
        np.asarray(Image.open(c.root / "images/train/train_00000.png")),
    )


def test_scenes_are_varied_and_objects_coloured():
    cfg = WorldConfig(image_size=64)
    scenes = [render_scene(scene_rng(0, "train", i), cfg) for i in range(40)]
    shapes = {o.shape for s in scenes for o in s.objects}
    colours = {o.colour for s in scenes for o in s.objects}
    assert shapes == set(SHAPES) and colours == set(COLOURS)
    assert {o.size for s in scenes for o in s.objects} == {"small", "large"}
    assert len({s.background for s in scenes}) == 4
    assert {len(s.objects) for s in scenes} == {2, 3, 4}
    for s in scenes:
        assert len({o.shape for o in s.objects}) == len(s.objects)  # shapes distinct per image
        for o in s.objects:
            pix = s.image[s.id_mask == o.id].astype(float).mean(0)
            assert np.abs(pix - COLOURS[o.colour]).max() < 30  # painted in its named colour
        # large objects are larger than small ones
        areas = {o.size: (s.id_mask == o.id).sum() for o in s.objects}
        if len(areas) == 2:
            assert areas["large"] > areas["small"]


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=8)
    with pytest.raises(ValueError, match="objects"):
        WorldConfig(min_objects=1)
    with pytest.raises(ValueError, match=">= 0"):
        generate_world(tmp_path, -1, 0, 0, progress=False)


def test_spacy_parser_finds_shapes_as_subjects_and_partners(world):
    """The real parser: every shape word in a caption is a phrase subject, and each image has
    phrases of at least two different shape subjects, so Algorithm 1 can form composites."""
    parser = SpacyParser()
    allowed_other = {"object", "shape", "background", "left", "right"}  # "to the left of"
    n_caps = 0
    for split in ("train", "val"):
        for rec in _jsonl(world.captions[split]):
            subjects_of_image = set()
            for cap, phrases in zip(rec["captions"], parser.parse_many(rec["captions"])):
                n_caps += 1
                subjects = [p.subject_lemma for p in phrases]
                mentioned = [w for w in cap.replace(",", " ").replace(":", " ").split() if w in SHAPES]
                assert sorted(s for s in subjects if s in SHAPES) == sorted(mentioned), (cap, subjects)
                assert set(subjects) <= set(SHAPES) | allowed_other, (cap, subjects)
                for p in phrases:
                    assert cap[p.start:p.end] == p.text
                subjects_of_image |= {s for s in subjects if s in SHAPES}
            assert len(subjects_of_image) >= 2, rec
    assert n_caps >= 90


def test_caption_reader_and_algorithm_1_accept_the_world(world):
    """The captions file is the `jsonl` caption-reader format, and Algorithm 1 pairs phrases of
    different shapes into composites."""
    parser = SpacyParser()
    read = list(read_captions(world.captions["train"], "jsonl"))
    assert [k for k, _ in read] == [r["image"] for r in _jsonl(world.captions["train"])]
    for key, captions in read:
        phrases = [p for ps in parser.parse_many(captions) for p in ps]
        pairs = pairs_for_image(phrases, seed=0, image_key=key)
        shape_pairs = [(phrases[i], phrases[j]) for i, j in pairs
                       if phrases[i].subject_lemma in SHAPES and phrases[j].subject_lemma in SHAPES]
        assert shape_pairs, key
        for a, b in shape_pairs:
            assert a.subject_lemma != b.subject_lemma
            assert composite_text(a.text, b.text) == f"{a.text} and {b.text}"
