"""The RefCOCO+ complex-pair builder (paper section 4.2) on a small REFER layout written here:
`refs(unc).p` (a pickled list of refs) + `instances.json` with polygon and RLE segmentations."""
import json
import pickle

import numpy as np
import pytest

from hist_vlm.data.complex_pairs import build_complex_pairs, decode_segmentation
from hist_vlm.data.grounding import GroundingFileError

H, W = 30, 40


def _ref(ref_id, ann_id, image_id, split, *sents):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "sentences": [{"sent": s, "raw": s.capitalize() + ".", "tokens": s.split()} for s in sents]}


def _hand_mask(rows, cols):
    m = np.zeros((H, W), bool)
    m[rows, cols] = True
    return m


# image 1: a polygon rectangle (2,3)-(10,8) = rows 3..7, cols 2..9; an uncompressed RLE (COCO's
# iscrowd form, column-major counts) of rows 10..14, cols 20..21: 20*30+10 zeros, 5 ones, 25
# zeros, 5 ones, the rest zeros
POLYGON = [[2, 3, 10, 3, 10, 8, 2, 8]]
POLYGON_MASK = _hand_mask(slice(3, 8), slice(2, 10))
RLE = {"size": [H, W], "counts": [610, 5, 25, 5, H * W - 645]}
RLE_MASK = _hand_mask(slice(10, 15), slice(20, 22))


def write_refer(root, refs=None, anns=None):
    from pycocotools import mask as mask_utils

    compressed = mask_utils.encode(np.asfortranarray(_hand_mask(slice(0, 2), slice(0, 40)).astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()  # as instances.json stores it
    if refs is None:
        refs = [
            _ref(10, 100, 1, "testA", "man on left", "left guy"), _ref(11, 101, 1, "testA", "red car"),
            _ref(12, 101, 1, "testA", "car in front"),                  # a second ref of object 101
            _ref(20, 200, 2, "testB", "lone dog"),                      # one ref: skipped
            _ref(30, 300, 3, "testA", "cat"), _ref(31, 300, 3, "testA", "white cat"),  # one object: skipped
            _ref(40, 400, 4, "val", "tree"), _ref(41, 401, 4, "val", "bench"),         # not a test split
        ] + [_ref(50 + i, 500 + i, 5, "testB", f"object {i}") for i in range(5)]
    if anns is None:
        segs = {100: POLYGON, 101: RLE, 200: POLYGON, 300: POLYGON, 400: POLYGON, 401: RLE,
                **{500 + i: [[i, 5, i + 1, 5, i + 1, 6, i, 6]] for i in range(4)}, 504: compressed}
        anns = [{"id": a, "image_id": a // 100, "bbox": [a % 100, 1, 5, 5], "segmentation": s}
                for a, s in segs.items()]
    folder = root / "refcoco+"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f)
    images = [{"id": i, "width": W, "height": H, "file_name": f"COCO_train2014_{i:012d}.jpg"} for i in range(1, 7)]
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def test_pairs_of_two_different_objects_seeded_and_reproducible(tmp_path):
    root = write_refer(tmp_path / "refer")
    built = build_complex_pairs(root, tmp_path / "train2014", seed=0)
    # images 1, 2, 3, 5 are in testA/testB; 2 (one ref) and 3 (two refs, one object) are skipped
    assert (built.images, built.skipped_single, len(built.pairs)) == (4, 2, 2)
    assert "2 complex pairs from 4 images (2 skipped" in built.summary()
    by_image = {p.record.id.split("_")[0]: p for p in built.pairs}
    assert set(by_image) == {"1", "5"}
    one = by_image["1"]
    assert set(one.ann_ids) == {100, 101} and one.ann_ids[0] != one.ann_ids[1]
    # the text is one sentence of each drawn ref, joined with " and ", in the order of the objects
    texts = {10: ("man on left", "left guy"), 11: ("red car",), 12: ("car in front",)}
    a, b = one.record.text.split(" and ")
    assert a in texts[one.ref_ids[0]] and b in texts[one.ref_ids[1]]
    assert one.record.kind == "composite" and one.record.split == "testA" and one.record.box_format == "xywh"
    assert one.record.image == tmp_path / "train2014" / "COCO_train2014_000000000001.jpg"  # the image, not the ref's file name
    assert one.record.boxes == tuple((float(x % 100), 1.0, 5.0, 5.0) for x in one.ann_ids)
    # reproducible, and over seeds every object pair and both orders of image 5 come up
    again = build_complex_pairs(root, tmp_path / "train2014", seed=0)
    assert [p.record for p in again.pairs] == [p.record for p in built.pairs]
    seen = {build_complex_pairs(root, tmp_path / "x", seed=s).pairs[1].ann_ids for s in range(60)}
    assert all(a != b for a, b in seen) and len(seen) > 12  # 20 ordered pairs of 5 objects


def test_draws_depend_only_on_seed_and_image(tmp_path):
    full = build_complex_pairs(write_refer(tmp_path / "a"), tmp_path, seed=7)
    # the same refs without images 1..4, and in another order: image 5's pair does not change
    only5 = [_ref(50 + i, 500 + i, 5, "testB", f"object {i}") for i in reversed(range(5))]
    alone = build_complex_pairs(write_refer(tmp_path / "b", refs=only5), tmp_path, seed=7)
    assert alone.pairs[0].record.text == full.pairs[1].record.text
    assert alone.pairs[0].ann_ids == full.pairs[1].ann_ids
    # the refs file in reverse order (object 101 has two refs): the same pairs, for every seed
    default = write_refer(tmp_path / "d")
    with (default / "refcoco+" / "refs(unc).p").open("rb") as f:
        refs = pickle.load(f)
    backwards = write_refer(tmp_path / "e", refs=refs[::-1])
    for s in range(10):
        assert ([p.record for p in build_complex_pairs(default, tmp_path, seed=s).pairs]
                == [p.record for p in build_complex_pairs(backwards, tmp_path, seed=s).pairs])
    # two images with the same layout of refs (5 objects) draw independently: over ten seeds,
    # the objects drawn (by position) differ at least once
    twin = only5 + [_ref(60 + i, 600 + i, 6, "testB", f"thing {i}") for i in range(5)]
    anns = [{"id": a, "image_id": a // 100, "bbox": [0, 0, 1, 1], "segmentation": POLYGON}
            for a in [*range(500, 505), *range(600, 605)]]
    root = write_refer(tmp_path / "c", refs=twin, anns=anns)
    draws = [[tuple(a % 100 for a in p.ann_ids) for p in build_complex_pairs(root, tmp_path, seed=s).pairs]
             for s in range(10)]
    assert any(five != six for five, six in draws)


def test_gold_mask_is_the_union_of_both_instance_masks(tmp_path):
    built = build_complex_pairs(write_refer(tmp_path / "refer"), tmp_path, seed=0)
    one = next(p for p in built.pairs if p.record.id.startswith("1_"))
    gold = one.gold_mask()
    assert gold.shape == (H, W) and gold.dtype == bool
    assert np.array_equal(gold, POLYGON_MASK | RLE_MASK) and gold.sum() == 40 + 10
    assert np.array_equal(decode_segmentation(POLYGON, H, W), POLYGON_MASK)
    assert np.array_equal(decode_segmentation(RLE, H, W), RLE_MASK)


def test_compressed_rle_and_other_splits(tmp_path):
    root = write_refer(tmp_path / "refer")
    val = build_complex_pairs(root, tmp_path, splits=("val",), seed=0)
    assert len(val.pairs) == 1 and set(val.pairs[0].ann_ids) == {400, 401}
    seeds = (s for s in range(100) if 504 in build_complex_pairs(root, tmp_path, seed=s).pairs[1].ann_ids)
    pair = build_complex_pairs(root, tmp_path, seed=next(seeds)).pairs[1]
    assert pair.gold_mask()[0:2].all()  # rows 0..1 of the compressed RLE
    other = pair.ann_ids[0] if pair.ann_ids[1] == 504 else pair.ann_ids[1]
    i = other - 500
    expected = _hand_mask(slice(0, 2), slice(0, 40)) | _hand_mask(slice(5, 6), slice(i, i + 1))  # row 5, col i
    assert np.array_equal(pair.gold_mask(), expected)


@pytest.mark.parametrize("breakage, message", [
    ("no_sentences", "refs(unc).p: ref 10: no sentences"),
    ("no_segmentation", "instances.json: annotation 100: missing field 'segmentation'"),
    ("bad_segmentation", "instances.json: annotation 101: unreadable segmentation"),
])
def test_malformed_refer_files_name_file_and_record(tmp_path, breakage, message):
    refs = [_ref(10, 100, 1, "testA", "a"), _ref(11, 101, 1, "testA", "b")]
    anns = [{"id": 100, "image_id": 1, "bbox": [0, 0, 1, 1], "segmentation": POLYGON},
            {"id": 101, "image_id": 1, "bbox": [0, 0, 1, 1], "segmentation": RLE}]
    if breakage == "no_sentences":
        refs[0]["sentences"] = []
    elif breakage == "no_segmentation":
        del anns[0]["segmentation"]
    else:
        anns[1]["segmentation"] = {"size": [H, W], "counts": 12}
    root = write_refer(tmp_path / "refer", refs=refs, anns=anns)
    with pytest.raises(GroundingFileError) as e:
        build_complex_pairs(root, tmp_path, seed=0).pairs[0].gold_mask()
    assert message in str(e.value) and "\n" not in str(e.value)
