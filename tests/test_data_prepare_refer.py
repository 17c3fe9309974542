"""`hist-vlm data refer`: REFER's refs(unc).p + instances.json -> `<dataset>_<split>.json`, read
back by `load_benchmark`; skips counted; one-line errors on malformed refs."""
import json
import pickle

import pytest
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.data.grounding import GroundingFileError, load_benchmark
from hist_vlm.data.prepare import PrepareError
from hist_vlm.data.prepare.refer import image_path, in_split, prepare_refer


def sent(text, sent_id):
    return {"tokens": text.split(), "raw": text.upper(), "sent_id": sent_id, "sent": text}


def ref(ref_id, image_id, ann_id, split, *texts):
    return {"ref_id": ref_id, "image_id": image_id, "ann_id": ann_id, "split": split, "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "sent_ids": list(range(len(texts))),
            "sentences": [sent(t, 100 * ref_id + i) for i, t in enumerate(texts)]}


def make_refer(root, dataset="refcoco+", refs=None):
    folder = root / dataset
    folder.mkdir(parents=True)
    refs = refs if refs is not None else [
        ref(10, 5, 50, "testA", "man on left", "guy in red"),
        ref(11, 5, 51, "testB", "brown dog"),
        ref(12, 7, 70, "val", "left  chair", ""),          # whitespace collapsed; the empty one skipped
        ref(13, 7, 71, "train", "table"),
        ref(14, 7, 99, "testB", "a lamp"),                  # annotation 99 not in instances.json
    ]
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 640, "height": 480},
                   {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "width": 320, "height": 200}],
        "annotations": [{"id": 50, "image_id": 5, "bbox": [1, 2, 30, 40], "category_id": 1},
                        {"id": 51, "image_id": 5, "bbox": [100, 120, 50, 60], "category_id": 1},
                        {"id": 70, "image_id": 7, "bbox": [5, 5, 10, 10], "category_id": 1},
                        {"id": 71, "image_id": 7, "bbox": [0, 0, 9, 9], "category_id": 1}],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    return root


def test_image_paths_and_split_selection():
    assert image_path("refcoco+", 581857) == "train2014/COCO_train2014_000000581857.jpg"
    assert image_path("refclef", 25086) == "saiapr_tc-12/25/images/25086.jpg"
    assert image_path("refclef", 7) == "saiapr_tc-12/00/images/7.jpg"
    assert [s for s in ("train", "val", "testA", "testB", "testAB") if in_split(s, "test")] == ["testA", "testB", "testAB"]
    assert [s for s in ("train", "val", "testA", "testB", "testAB") if in_split(s, "testA")] == ["testA", "testAB"]
    assert not in_split("val", "train") and in_split("val", "val")


def test_refcoco_plus_test_lists_read_back_by_the_evaluator(tmp_path):
    root = make_refer(tmp_path / "refer")
    report = prepare_refer(root, "refcoco+", root, progress=False)
    assert json.loads((root / "refcoco+_test.json").read_text()) == [
        {"image": "train2014/COCO_train2014_000000000005.jpg", "text": "man on left", "ref_id": 10, "split": "testA"},
        {"image": "train2014/COCO_train2014_000000000005.jpg", "text": "guy in red", "ref_id": 10, "split": "testA"},
        {"image": "train2014/COCO_train2014_000000000005.jpg", "text": "brown dog", "ref_id": 11, "split": "testB"},
    ]
    assert json.loads((root / "refcoco+_val.json").read_text()) == [
        {"image": "train2014/COCO_train2014_000000000007.jpg", "text": "left chair", "ref_id": 12, "split": "val"}]
    assert report.skipped == {"test: refs whose annotation is not in instances.json": 1, "val: empty sentences": 1}
    assert report.written == {root / "refcoco+_val.json": 1, root / "refcoco+_test.json": 3}
    assert not report.notes                          # instances.json's file_names agree with the paths

    records = load_benchmark("refcoco+", root, image_root=tmp_path / "coco")
    assert [(r.id, r.text, r.split, r.boxes[0], (r.width, r.height)) for r in records] == [
        ("10", "man on left", "testA", (1.0, 2.0, 30.0, 40.0), (640, 480)),
        ("10", "guy in red", "testA", (1.0, 2.0, 30.0, 40.0), (640, 480)),
        ("11", "brown dog", "testB", (100.0, 120.0, 50.0, 60.0), (640, 480)),
        ("12", "left chair", "val", (5.0, 5.0, 10.0, 10.0), (320, 200)),
    ]
    assert records[0].image == tmp_path / "coco" / "train2014" / "COCO_train2014_000000000005.jpg"


def test_refclef_train_and_test_splits(tmp_path):
    root = make_refer(tmp_path / "refer", "refclef", [ref(1, 25086, 50, "test", "sky"), ref(2, 25086, 51, "train", "tree")])
    instances = json.loads((root / "refclef" / "instances.json").read_text())
    instances["images"][0].update(id=25086, file_name="25086.jpg")
    instances["images"][1]["file_name"] = "other.jpg"
    (root / "refclef" / "instances.json").write_text(json.dumps(instances))
    report = prepare_refer(root, "refclef", tmp_path / "out", ["train", "test"], progress=False)
    assert not report.notes
    assert json.loads((tmp_path / "out" / "refclef_test.json").read_text()) == [
        {"image": "saiapr_tc-12/25/images/25086.jpg", "text": "sky", "ref_id": 1, "split": "test"}]
    assert [i["text"] for i in json.loads((tmp_path / "out" / "refclef_train.json").read_text())] == ["tree"]
    refs = [ref(1, 25086, 50, "test", "sky"), ref(2, 7, 70, "test", "tree")]   # image 7's file_name is other.jpg
    with open(root / "refclef" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    report = prepare_refer(root, "refclef", tmp_path / "out", ["test"], progress=False)
    assert report.notes == {"refs whose instances.json file_name differs from the image path written": 1}


@pytest.mark.parametrize("refs, splits, message", [
    ([ref(10, 5, 50, "testA", "x"), {"ref_id": 11, "image_id": 5, "ann_id": 51, "split": "testB"}], ["test"],
     r"refs\(unc\)\.p: ref 11: missing field 'sentences'"),
    ([ref(10, 5, 50, "testA", "x"), {**ref(11, 5, 51, "testB", "y"), "sentences": [{"raw": "Y"}]}], ["test"],
     r"refs\(unc\)\.p: ref 11 sentence 0: missing field 'sent'"),
    ([ref(10, 5, 50, "testA", "x")], ["val"], r"refs\(unc\)\.p: no sentence in split 'val' \(splits of refcoco\+: testA\)"),
    ([ref(10, 5, 50, "testA", "x")], ["test", "testA"], r"split 'test' already holds testA"),
])
def test_malformed_refs_name_the_file_and_ref(tmp_path, refs, splits, message):
    root = make_refer(tmp_path / "refer", refs=refs)
    # PrepareError, or the REFER reader's GroundingFileError: both ValueErrors the CLI prints
    with pytest.raises((PrepareError, GroundingFileError), match=message) as e:
        prepare_refer(root, "refcoco+", tmp_path / "out", splits, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def run(*args):
    return CliRunner().invoke(app, ["data", "refer", *map(str, args)])


def test_cli(tmp_path):
    root = make_refer(tmp_path / "refer")
    res = run(root, "--out", tmp_path / "out", "--split", "testB", "--no-progress")
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path / 'out' / 'refcoco+_testB.json'}: 1 records" in res.stdout
    assert "skipped 1: testB: refs whose annotation is not in instances.json" in res.stdout
    (root / "refcoco+" / "refs(unc).p").write_bytes(b"not a pickle")
    res = run(root, "--out", tmp_path / "out")
    assert res.exit_code == 2 and "Traceback" not in res.output
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"error: {root / 'refcoco+' / 'refs(unc).p'}: not a readable refs pickle")
    res = run(root, "--out", tmp_path / "out", "--dataset", "refcocoplus")
    assert res.exit_code == 2 and "unknown REFER dataset (choose refcoco+" in res.stderr
