"""`hist-vlm data karpathy`: Karpathy's dataset_coco.json / dataset_flickr30k.json -> ALBEF's
retrieval files, read back by `hist_vlm.data.retrieval`; restval joins train; one-line errors."""
import json

import pytest
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.data.captions import CaptionFileError
from hist_vlm.data.prepare import PrepareError
from hist_vlm.data.prepare.karpathy import prepare_karpathy
from hist_vlm.data.retrieval import read_retrieval_test, read_retrieval_train


def sentences(*raws):
    return [{"tokens": r.lower().split(), "raw": r, "imgid": 0, "sentid": i} for i, r in enumerate(raws)]


def coco_image(cocoid, split, folder, *raws):
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "split": split, "imgid": cocoid % 100,
            "cocoid": cocoid, "sentids": list(range(len(raws))), "sentences": sentences(*raws)}


COCO = {"dataset": "coco", "images": [
    coco_image(522418, "restval", "val2014", "A woman cutting a cake. ", "a cake  on a table"),
    coco_image(9, "train", "train2014", "A dog."),
    coco_image(391895, "test", "val2014", "A man on a bike.", "", "Someone rides."),   # the empty one is skipped
    coco_image(42, "val", "val2014", "Two cats."),
    coco_image(43, "val", "val2014", " "),                                           # no caption left: skipped
]}


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_coco_to_albef_files_and_back(tmp_path):
    out = tmp_path / "out"
    report = prepare_karpathy(write(tmp_path, "dataset_coco.json", COCO), out, progress=False)
    assert json.loads((out / "coco_train.json").read_text()) == [
        {"caption": "A woman cutting a cake.", "image": "val2014/COCO_val2014_000000522418.jpg", "image_id": "coco_522418"},
        {"caption": "a cake on a table", "image": "val2014/COCO_val2014_000000522418.jpg", "image_id": "coco_522418"},
        {"caption": "A dog.", "image": "train2014/COCO_train2014_000000000009.jpg", "image_id": "coco_9"},
    ]
    assert json.loads((out / "coco_test.json").read_text()) == [
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["A man on a bike.", "Someone rides."]}]
    assert report.skipped == {"test: empty captions": 1, "val: empty captions": 1, "val: images without a caption": 1}
    assert report.written == {out / "coco_train.json": 3, out / "coco_val.json": 1, out / "coco_test.json": 1}

    pairs = read_retrieval_train(out / "coco_train.json", tmp_path / "coco")
    assert [(p.image.relative_to(tmp_path / "coco").as_posix(), p.image_index) for p in pairs] == [
        ("val2014/COCO_val2014_000000522418.jpg", 0), ("val2014/COCO_val2014_000000522418.jpg", 0),
        ("train2014/COCO_train2014_000000000009.jpg", 1)]
    corpus = read_retrieval_test(out / "coco_test.json", tmp_path / "coco")
    assert corpus.texts == ["A man on a bike.", "Someone rides."] and corpus.img2txt == [[0, 1]]
    assert read_retrieval_test(out / "coco_val.json").texts == ["Two cats."]


def test_flickr30k_images_go_under_flickr30k_images(tmp_path):
    def image(name, split, *raws):
        return {"filename": name, "split": split, "imgid": 0, "sentids": [0], "sentences": sentences(*raws)}

    data = {"dataset": "flickr30k", "images": [image("1000092795.jpg", "train", "Two young guys."),
                                               image("1007129816.jpg", "val", "A man."),
                                               image("1009434119.jpg", "test", "A dog.", "A black dog.")]}
    prepare_karpathy(write(tmp_path, "dataset_flickr30k.json", data), tmp_path, progress=False)
    assert json.loads((tmp_path / "flickr30k_train.json").read_text()) == [
        {"caption": "Two young guys.", "image": "flickr30k-images/1000092795.jpg", "image_id": "flickr30k_1000092795"}]
    corpus = read_retrieval_test(tmp_path / "flickr30k_test.json")
    assert corpus.images == [tmp_path / "flickr30k-images" / "1009434119.jpg"] and corpus.txt2img == [0, 0]


@pytest.mark.parametrize("content, message", [
    (json.dumps(COCO)[:700], r"images\[2\]: invalid JSON \("),     # truncated inside image 2
    (json.dumps({"images": [COCO["images"][0], {**COCO["images"][1], "sentences": [{"tokens": []}]}]}),
     r"images\[1\]\.sentences\[0\]: missing field 'raw'"),
    (json.dumps({"images": [{"filename": "x.jpg", "sentences": []}]}), r"images\[0\]: missing field 'split'"),
    (json.dumps({"images": [{**COCO["images"][1], "sentences": [{"raw": 7}]}]}), r"images\[0\]\.sentences\[0\]: 'raw' must be a string"),
    (json.dumps([{"image": "a.jpg", "caption": "x"}]), r"no train images \(is this a Karpathy dataset_\*\.json\?\)"),
])
def test_malformed_files_name_the_file_and_record(tmp_path, content, message):
    p = write(tmp_path, "dataset_coco.json", content)
    with pytest.raises((PrepareError, CaptionFileError), match=message) as e:
        prepare_karpathy(p, tmp_path / "out", progress=False)
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_the_file_is_streamed_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(json, "load", lambda *a, **k: pytest.fail("json.load"))
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("json.loads"))
    report = prepare_karpathy(write(tmp_path, "dataset_coco.json", json.dumps(COCO)), tmp_path / "out", progress=False)
    assert report.written[tmp_path / "out" / "coco_train.json"] == 3


def test_cli(tmp_path):
    p = write(tmp_path, "dataset_coco.json", COCO)
    res = CliRunner().invoke(app, ["data", "karpathy", str(p), "--out", str(tmp_path / "out"), "--name", "mscoco"])
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path / 'out' / 'mscoco_train.json'}: 3 records" in res.stdout
    assert "skipped 1: val: images without a caption" in res.stdout
    write(tmp_path, "dataset_coco.json", json.dumps(COCO)[:-30])
    res = CliRunner().invoke(app, ["data", "karpathy", str(p), "--out", str(tmp_path / "out2")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    # the bar (leave=False) is wiped: the error is the last line on the terminal
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {p}: images[4]: invalid JSON")
