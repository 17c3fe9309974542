import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from hist_vlm.data.grounding import (
    GroundingFileError,
    load_benchmark,
    read_flickr30k,
    read_refer,
    read_synthetic,
)
from hist_vlm.demo.synthetic import generate_world


def _write_refer(root: Path, dataset: str, refs: list[dict], images: list[dict], anns: list[dict], protocol=2):
    folder = root / dataset
    folder.mkdir(parents=True)
    # the structure REFER (refer_python3.py) reads: a pickled list of ref dicts, and a COCO-style
    # instances.json with images / annotations / categories
    with (folder / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f, protocol=protocol)
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))


def _ref(ref_id, ann_id, image_id, split):
    return {
        "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
        "file_name": f"COCO_{image_id}_{ref_id}.jpg", "sent_ids": [ref_id * 10],
        "sentences": [{"sent": "x", "raw": "x", "sent_id": ref_id * 10, "tokens": ["x"]}],
    }


@pytest.fixture
def refcoco(tmp_path):
    _write_refer(
        tmp_path, "refcoco+",
        refs=[_ref(1, 11, 100, "testA"), _ref(2, 12, 100, "testB"), _ref(3, 13, 200, "val")],
        images=[{"id": 100, "width": 640, "height": 480, "file_name": "a.jpg"},
                {"id": 200, "width": 500, "height": 375, "file_name": "b.jpg"}],
        anns=[{"id": 11, "image_id": 100, "bbox": [10.5, 20, 30, 40], "category_id": 1},
              {"id": 12, "image_id": 100, "bbox": [100, 50, 60, 70], "category_id": 1},
              {"id": 13, "image_id": 200, "bbox": [0, 0, 5, 5], "category_id": 1}],
    )
    (tmp_path / "refcoco+_test.json").write_text(json.dumps([
        {"image": "train2014/a.jpg", "text": "man on left", "ref_id": 1},
        {"image": "train2014/a.jpg", "text": "right guy", "ref_id": 2},
    ]))
    (tmp_path / "refcoco+_val.json").write_text(json.dumps([{"image": "train2014/b.jpg", "text": "cat", "ref_id": 3}]))
    (tmp_path / "refcoco+_train.json").write_text(json.dumps([{"image": "x.jpg", "text": "no", "ref_id": 999}]))
    return tmp_path


def test_refcoco_plus_reads_boxes_sizes_and_splits(refcoco):
    recs = read_refer([refcoco / "refcoco+_test.json"], refcoco, refcoco / "images")
    assert [r.id for r in recs] == ["1", "2"]
    a, b = recs
    assert a.image == refcoco / "images" / "train2014/a.jpg"
    assert a.text == "man on left" and a.boxes == ((10.5, 20.0, 30.0, 40.0),) and a.box_format == "xywh"
    assert (a.width, a.height, a.split, b.split) == (640, 480, "testA", "testB")
    # by name: the default test files are the val and test jsons, never train
    allrecs = load_benchmark("refcoco+", refcoco)
    assert sorted(r.split for r in allrecs) == ["testA", "testB", "val"]
    assert [r.id for r in load_benchmark("refcoco+", refcoco, splits=["val"])] == ["3"]


def _py2_pickle(refs: list[dict]) -> bytes:
    """What Python 2's pickle (protocol 2) writes for a list of dicts of str/int: str values are
    SHORT_BINSTRING byte strings, which Python 3 must decode."""
    out = bytearray(b"\x80\x02]")
    for ref in refs:
        out += b"}"
        for k, v in ref.items():
            for x in (k, v):
                if isinstance(x, int):
                    out += b"J" + x.to_bytes(4, "little", signed=True)
                else:
                    raw = x.encode("latin1")
                    out += b"U" + bytes([len(raw)]) + raw
            out += b"s"
        out += b"a"
    return bytes(out + b".")


def test_refcoco_python2_pickle_with_latin1_bytes(tmp_path):
    folder = tmp_path / "refcoco+"
    folder.mkdir()
    refs = [{"ref_id": 5, "ann_id": 1, "image_id": 1, "split": "val", "file_name": "caf\xe9.jpg"}]
    (folder / "refs(unc).p").write_bytes(_py2_pickle(refs))
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "width": 10, "height": 20}], "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4]}],
    }))
    (tmp_path / "t.json").write_text(json.dumps([{"image": "i.jpg", "text": "t", "ref_id": 5}]))
    (r,) = read_refer([tmp_path / "t.json"], tmp_path, tmp_path)
    assert r.boxes == ((1.0, 2.0, 3.0, 4.0),) and (r.width, r.height, r.split) == (10, 20, "val")


def test_refclef_split_comes_from_the_json(tmp_path):
    _write_refer(
        tmp_path, "refclef", refs=[_ref(7, 70, 8, "test"), _ref(9, 90, 8, "test")],
        images=[{"id": 8, "width": 480, "height": 360}],
        anns=[{"id": 70, "image_id": 8, "bbox": [1, 1, 9, 9]}, {"id": 90, "image_id": 8, "bbox": [2, 2, 9, 9]}],
    )
    (tmp_path / "refclef_test_10k_unique_fix_split.json").write_text(json.dumps([
        {"image": "saiapr_tc-12/08/images/8.jpg", "text": "sky", "ref_id": 7, "split": "test_unique"},
        {"image": "saiapr_tc-12/08/images/8.jpg", "text": "tree", "ref_id": 9, "split": "val"},
    ]))
    recs = load_benchmark("refclef", tmp_path)
    assert [(r.text, r.split) for r in recs] == [("sky", "test"), ("tree", "val")]


def test_refer_bad_files_are_clear_errors(refcoco, tmp_path):
    with pytest.raises(GroundingFileError, match=r"refs\(unc\).p: file not found"):
        read_refer([refcoco / "refcoco+_test.json"], refcoco, refcoco, dataset="refcoco")
    with pytest.raises(GroundingFileError, match="ref_id 999 is not in"):
        read_refer([refcoco / "refcoco+_train.json"], refcoco, refcoco)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(GroundingFileError, match="broken.json: not valid JSON"):
        read_refer([tmp_path / "broken.json"], refcoco, refcoco)
    (tmp_path / "nofield.json").write_text(json.dumps([{"image": "a", "text": "b"}]))
    with pytest.raises(GroundingFileError, match="item 0: missing field 'ref_id'"):
        read_refer([tmp_path / "nofield.json"], refcoco, refcoco)


def test_refer_pickle_with_classes_is_refused(tmp_path):
    folder = tmp_path / "refcoco+"
    folder.mkdir()
    (folder / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    with (folder / "refs(unc).p").open("wb") as f:
        pickle.dump([Path("x")], f)  # any class instance: never unpickled
    (tmp_path / "t.json").write_text("[]")
    with pytest.raises(GroundingFileError, match="not a readable refs pickle"):
        read_refer([tmp_path / "t.json"], tmp_path, tmp_path)


@pytest.fixture
def flickr(tmp_path):
    images = tmp_path / "flickr30k_images"
    images.mkdir()
    Image.new("RGB", (500, 333)).save(images / "1000.jpg")
    Image.new("RGB", (375, 500)).save(images / "2000.jpg")
    (tmp_path / "val.txt").write_text("1000\n2000\n")
    (tmp_path / "bounding_boxes_val.json").write_text(json.dumps({
        "1000": {"boxes": {"11": [[1, 2, 50, 60], [70, 80, 90, 100]], "12": [[5, 5, 6, 6]]}, "scene": [], "nobox": []},
        "2000": {"boxes": {"21": [[0, 0, 10, 10]]}},
    }))
    (tmp_path / "sentences_val.json").write_text(json.dumps({
        "1000": [
            {"sentence": "Two dogs play with a ball .", "phrases": [
                {"phrase_id": "11", "phrase": "Two dogs", "first_word_index": 0, "phrase_type": ["animals"]},
                {"phrase_id": "13", "phrase": "a ball", "first_word_index": 4, "phrase_type": ["other"]}]},
            {"sentence": "A dog near a cone .", "phrases": [
                {"phrase_id": "11", "phrase": "A dog", "first_word_index": 0},
                {"phrase_id": "12", "phrase": "a cone", "first_word_index": 3}]},
        ],
        "2000": [{"sentence": "A man .", "phrases": [{"phrase_id": "21", "phrase": "A man"}]}],
    }))
    return tmp_path


def test_flickr30k_info_ground_layout(flickr):
    recs = read_flickr30k(flickr, flickr / "flickr30k_images", "val")
    assert [r.text for r in recs] == ["Two dogs", "A dog", "a cone", "A man"]  # "a ball" has no box
    two = recs[0]
    assert two.boxes == ((1, 2, 50, 60), (70, 80, 90, 100)) and two.box_format == "xyxy"
    assert (two.width, two.height, two.split) == (500, 333, "val")
    assert (recs[3].width, recs[3].height) == (375, 500)
    assert recs[3].image == flickr / "flickr30k_images" / "2000.jpg"
    assert len({r.id for r in recs}) == 4
    assert len(load_benchmark("flickr30k", flickr)) == 4


def test_flickr30k_missing_image_and_split(flickr):
    (flickr / "flickr30k_images" / "2000.jpg").unlink()
    with pytest.raises(GroundingFileError, match="2000.jpg: file not found"):
        read_flickr30k(flickr, flickr / "flickr30k_images", "val")
    with pytest.raises(GroundingFileError, match="test.txt: file not found"):
        read_flickr30k(flickr, flickr / "flickr30k_images", "test")


def test_synthetic_round_trip(tmp_path):
    world = generate_world(tmp_path, 2, 2, 3, image_size=48, seed=1, progress=False)
    recs = read_synthetic(world.grounding)
    lines = [json.loads(x) for x in world.grounding.read_text().splitlines()]
    assert len(recs) == len(lines)
    for r, line in zip(recs, lines):
        assert r.text == line["text"] and r.split == line["split"] and r.kind == line["kind"]
        assert r.boxes == tuple(tuple(float(v) for v in b) for b in line["boxes"])
        assert r.box_format == "xyxy" and r.image.is_file() and r.mask.is_file()
        assert len(r.object_ids) == len(r.boxes)
    test_only = load_benchmark("synthetic", tmp_path, splits=["test"])
    assert test_only and {r.split for r in test_only} == {"test"}
    assert {r.kind for r in test_only} == {"single", "composite"}


def test_synthetic_bad_line_and_unknown_benchmark(tmp_path):
    (tmp_path / "grounding.jsonl").write_text('{"image": "a.png", "text": "x", "split": "val"}\n')
    with pytest.raises(GroundingFileError, match="line 1: missing field 'boxes'"):
        read_synthetic(tmp_path / "grounding.jsonl")
    (tmp_path / "grounding.jsonl").write_text("\n{oops\n")
    with pytest.raises(GroundingFileError, match="line 2: not valid JSON"):
        read_synthetic(tmp_path / "grounding.jsonl")
    with pytest.raises(GroundingFileError, match="unknown benchmark"):
        load_benchmark("coco", tmp_path)
    with pytest.raises(GroundingFileError, match="not a folder"):
        load_benchmark("synthetic", tmp_path / "nope")
