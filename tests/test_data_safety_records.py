"""Annotations are checked as they are read: boxes finite, well ordered and inside their image
(clipped and counted, or refused); Flickr30k markup and wrong-typed fields are one-line errors
naming the file and the record; text inputs must be UTF-8; Karpathy's three files are replaced
as a set; an unreadable training image is skipped with its one-line reason."""
import json
import pickle

import pytest
import torch

import hist_vlm.data.prepare as prepare_module
from hist_vlm.data.dataset import DatasetError, HistCollate, HistDataset, read_parse_output
from hist_vlm.data.grounding import GroundingFileError, load_refer, read_flickr30k, read_refer, read_synthetic
from hist_vlm.data.prepare import PrepareError
from hist_vlm.data.prepare.flickr30k_entities import parse_annotation, parse_sentences, prepare_flickr30k_entities
from hist_vlm.data.prepare.karpathy import prepare_karpathy
from train_helpers import write_world

GOOD = {"image": "a.png", "text": "x", "split": "val", "boxes": [[1, 1, 4, 4]], "width": 8, "height": 6}


def _synthetic(tmp_path, **change):
    path = tmp_path / "grounding.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, **change}) + "\n")
    return path


@pytest.mark.parametrize("change, message", [
    ({"boxes": [[4, 1, 1, 4]]}, r"line 2: box \[x1, y1, x2, y2\] = \[4, 1, 1, 4\] is reversed"),
    ({"boxes": [[1, 4, 4, 1]]}, "is reversed"),
    ({"boxes": [[1, 1, -2, 3]], "box_format": "xywh"}, r"line 2: box \[x, y, w, h\] = \[1, 1, -2, 3\] has a negative size"),
    ({"boxes": [[float("nan"), 1, 4, 4]]}, "line 2: box .* is not finite"),
    ({"boxes": [[1, 1, float("inf"), 4]]}, "is not finite"),
    ({"boxes": [[1, 1, 10 ** 400, 4]]}, "is not finite"),
    ({"boxes": [[100, 100, 200, 200]]}, r"line 2: box .* lies outside its 8 x 6 image"),
    ({"boxes": [[-9, -9, 0, 0]]}, "lies outside"),
    ({"boxes": [[True, 1, 4, 4]]}, "a box must be 4 numbers"),
    ({"boxes": "1234"}, "boxes must be a list"),
    ({"width": "8"}, "line 2: width must be a positive integer, got '8'"),
    ({"width": 8.5}, "width must be a positive integer"),
    ({"height": 0}, "height must be a positive integer"),
    ({"width": True}, "width must be a positive integer"),
    ({"object_ids": "12"}, "line 2: object_ids must be a list of integers, got '12'"),
    ({"object_ids": [1.5]}, "an object id must be an integer"),
    ({"box_format": 5}, "line 2: box_format must be \"xyxy\" or \"xywh\", got 5"),
    ({"box_format": "cxcywh"}, "box_format must be"),
    ({"kind": ["single"]}, "kind must be"),
    ({"masks": 3}, "masks must be a path string"),
    ({"text": None}, "text must be a non-empty string"),
])
def test_synthetic_records_refused(tmp_path, change, message):
    path = _synthetic(tmp_path, **change)
    with pytest.raises(GroundingFileError, match=message) as e:
        read_synthetic(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))


def test_boxes_outside_the_image_clipped_and_counted_once(tmp_path, capsys):
    path = tmp_path / "grounding.jsonl"
    path.write_text("".join(json.dumps({**GOOD, "boxes": b, **extra}) + "\n" for b, extra in [
        ([[-1e9, -1e9, 1e9, 1e9]], {}), ([[-2, 1, 4, 4], [1, 1, 4, 4]], {}), ([[6, 4, 5, 5]], {"box_format": "xywh"}),
        ([[1, 1, 4, 4]], {})]))
    recs = read_synthetic(path)
    assert recs[0].boxes == ((0.0, 0.0, 8.0, 6.0),)
    assert recs[1].boxes == ((0.0, 1.0, 4.0, 4.0), (1.0, 1.0, 4.0, 4.0))
    assert recs[2].boxes == ((6.0, 4.0, 2.0, 2.0),)                      # xywh: clipped to x + w <= 8
    assert recs[3].boxes == ((1.0, 1.0, 4.0, 4.0),)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {path}: 3 box(es) extend outside their image, clipped to it (the first: line 1)"]
    read_synthetic(path, splits=["test"])
    assert capsys.readouterr().err == ""                                # only the records read count


def _refer(tmp_path, refs, images=None, test=None):
    folder = tmp_path / "refcoco+"
    folder.mkdir(exist_ok=True)
    with (folder / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    (folder / "instances.json").write_text(json.dumps({
        "images": images or [{"id": 1, "width": 8, "height": 6}],
        "annotations": [{"id": 11, "bbox": [1, 1, 2, 2]}]}))
    tf = tmp_path / "refcoco+_test.json"
    tf.write_text(json.dumps(test or [{"image": "a.jpg", "text": "x", "ref_id": 1}]))
    return tf


@pytest.mark.parametrize("refs, images, test, message", [
    ([{"ref_id": "abc", "ann_id": 11, "image_id": 1}], None, None, r"refs\(unc\).p: refs\[0\]: ref_id must be an integer, got 'abc'"),
    ([{"ref_id": 1.5, "ann_id": 11, "image_id": 1}], None, None, "refs\\[0\\]: ref_id must be an integer, got 1.5"),
    ([{"ref_id": 1, "ann_id": 11, "image_id": "one"}], None, None, r"refs\(unc\).p: ref 1: image_id must be an integer, got 'one'"),
    ([{"ref_id": 1, "ann_id": None, "image_id": 1}], None, None, "ref 1: ann_id must be an integer"),
    ([{"ref_id": 1, "ann_id": 11, "image_id": 1}], [{"id": "x", "width": 8, "height": 6}], None,
     r"instances.json: images\[0\]: id must be an integer, got 'x'"),
    ([{"ref_id": 1, "ann_id": 11, "image_id": 1}], [{"id": 1, "width": "8", "height": 6}], None,
     "instances.json: image 1: width must be a positive integer, got '8'"),
    ([{"ref_id": 1, "ann_id": 11, "image_id": 1}], None, [{"image": "a.jpg", "text": "x", "ref_id": "one"}],
     r"refcoco\+_test.json: item 0: ref_id must be an integer, got 'one'"),
    ([{"ref_id": 1, "ann_id": 11, "image_id": 1}], None, [{"image": ["a.jpg"], "text": "x", "ref_id": 1}],
     "item 0: image must be a non-empty string"),
])
def test_refer_ids_and_types(tmp_path, refs, images, test, message):
    tf = _refer(tmp_path, refs, images, test)
    with pytest.raises(GroundingFileError, match=message) as e:
        read_refer([tf], tmp_path, tmp_path)
    assert "\n" not in str(e.value)


def test_refer_digit_strings_are_ids_and_boxes_are_checked(tmp_path, capsys):
    tf = _refer(tmp_path, [{"ref_id": "1", "ann_id": "11", "image_id": 1, "split": "testA"}],
                test=[{"image": "a.jpg", "text": "x", "ref_id": "1"}])
    assert load_refer(tmp_path, "refcoco+").refs.keys() == {1}
    assert read_refer([tf], tmp_path, tmp_path)[0].boxes == ((1.0, 1.0, 2.0, 2.0),)
    inst = tmp_path / "refcoco+" / "instances.json"
    inst.write_text(json.dumps({"images": [{"id": 1, "width": 8, "height": 6}],
                                "annotations": [{"id": 11, "bbox": [6, 5, 5, 5]}]}))
    assert read_refer([tf], tmp_path, tmp_path)[0].boxes == ((6.0, 5.0, 2.0, 1.0),)
    assert "1 box(es) extend outside their image" in capsys.readouterr().err
    inst.write_text(json.dumps({"images": [{"id": 1, "width": 8, "height": 6}],
                                "annotations": [{"id": 11, "bbox": [1, 1, -5, 2]}]}))
    with pytest.raises(GroundingFileError, match=r"item 0 \(ref 1\): box .* has a negative size"):
        read_refer([tf], tmp_path, tmp_path)


def test_flickr30k_reader_utf8_and_boxes(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 6)).save(tmp_path / "1000.jpg")
    (tmp_path / "test.txt").write_bytes(b"1000\n\xff\xfe\n")
    with pytest.raises(GroundingFileError, match=r"test.txt: invalid UTF-8 at byte 5"):
        read_flickr30k(tmp_path, tmp_path, "test")
    (tmp_path / "test.txt").write_text("1000\n")
    (tmp_path / "sentences_test.json").write_text(json.dumps(
        {"1000": [{"sentence": "a b", "phrases": [{"phrase": "a", "phrase_id": "1"}]}]}))
    (tmp_path / "bounding_boxes_test.json").write_text(json.dumps({"1000": {"boxes": {"1": [[5, 1, 2, 4]]}}}))
    with pytest.raises(GroundingFileError, match=r"bounding_boxes_test.json: 1000 phrase 1: box .* is reversed"):
        read_flickr30k(tmp_path, tmp_path, "test")


@pytest.mark.parametrize("line, message", [
    ("A man] rides .", r"line 2: stray '\]' in 'man\]' \(no phrase is open\)"),
    ("[/EN#1/people A [/EN#2/other red] hat] .", "line 2: phrase 1 is not closed before"),
    ("[/EN#1/people A [red hat] .", r"line 2: '\[' in '\[red' inside phrase 1 \(phrases do not nest\)"),
    ("[/EN#1/people A man]] rides .", r"line 2: 'man\]\]' in phrase 1: .*\(\]\]\)"),
    ("[/EN#1/people A ma]n] rides .", r"line 2: 'ma\]n\]' in phrase 1: .*inside a word"),
    ("[/EN#1/people] rides .", r"line 2: phrase tag '\[/EN#1/people\]' holds a bracket"),
    ("a [b c .", r"line 2: bad phrase tag '\[b'"),
    ("a b[c d .", r"line 2: stray '\[' in 'b\[c'"),
    ("[/EN#1/people A man rides .", r"line 2: phrase 1 is not closed"),
])
def test_sentence_markup_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "1000.txt"
    path.write_text("[/EN#9/people A woman] sits .\n" + line + "\n")
    with pytest.raises(PrepareError, match=message) as e:
        parse_sentences(path)
    assert str(e.value).startswith(f"{path}: line 2: ") and "\n" not in str(e.value)


XML = """<annotation><size><width>10</width><height>8</height><depth>3</depth></size>
<object><name>1</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>
</annotation>"""


def test_flickr30k_converter_boxes(tmp_path):
    path = tmp_path / "1.xml"
    report = prepare_module.PrepareReport()
    path.write_text(XML.format(1, 1, 10, 8))
    assert parse_annotation(path, report, "val")["boxes"] == {"1": [[0, 0, 9, 7]]} and not report.notes
    path.write_text(XML.format(0, -5, 30, 8))
    assert parse_annotation(path, report, "val")["boxes"] == {"1": [[0, 0, 9, 7]]}
    assert report.notes == {"val: boxes partly outside their image, clipped to it": 1}
    for corners, message in [((5, 1, 2, 8), "reversed"), ((1, 6, 9, 2), "reversed"), ((20, 20, 30, 30), "lies outside the 10 x 8")]:
        path.write_text(XML.format(*corners))
        with pytest.raises(PrepareError, match=f"1.xml: object 0: <bndbox> .* {message}"):
            parse_annotation(path)


def test_flickr30k_converter_split_list_utf8(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "test.txt").write_bytes(b"\xc3\x28\n")
    with pytest.raises(PrepareError, match=r"test.txt: invalid UTF-8 at byte 0"):
        prepare_flickr30k_entities(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "Sentences" / "1.txt").write_bytes(b"[/EN#1/people A \xff man] .\n")
    (tmp_path / "Annotations" / "1.xml").write_text(XML.format(1, 1, 5, 5))
    (tmp_path / "test.txt").write_text("1\n")
    with pytest.raises(PrepareError, match=r"Sentences/1.txt: invalid UTF-8 at byte 16"):
        prepare_flickr30k_entities(tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_karpathy_writes_its_three_files_as_a_set(tmp_path, monkeypatch):
    src = tmp_path / "dataset_coco.json"

    def write(caption_word):
        src.write_text(json.dumps({"images": [
            {"filepath": "val2014", "filename": f"{s}.jpg", "split": s, "cocoid": i,
             "sentences": [{"raw": f"{caption_word} {s}"}]} for i, s in enumerate(("train", "val", "test"))]}))

    write("old")
    out = tmp_path / "out"
    prepare_karpathy(src, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["coco_test.json", "coco_train.json", "coco_val.json"]

    write("new")
    real_dumps, calls = prepare_module.json.dumps, []

    def dies_on_the_third(obj, **kw):  # a failure (or kill) while the last file is written
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_dumps(obj, **kw)

    monkeypatch.setattr(prepare_module.json, "dumps", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_karpathy(src, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # no new train beside old val/test, no temps
    monkeypatch.undo()
    prepare_karpathy(src, out, progress=False)
    assert all(b"new" in p.read_bytes() for p in out.iterdir())


def test_unreadable_training_image_skipped_with_its_one_line(tmp_path):
    path, root = write_world(tmp_path, n_images=4)
    (root / "img001.png").write_bytes(b"")
    (root / "img002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = HistDataset(read_parse_output(path, root)[0], root, 16)
    samples = [ds[(0, k)] for k in range(4)]
    _, skipped = HistCollate(lambda texts, n: (torch.ones(len(texts), 2, dtype=torch.long),) * 2, 8)(samples)
    assert len(skipped) == 3 and all("\n" not in s for s in skipped)          # sample 1 skips 1 and 2; sample 2 skips 2
    assert skipped[0].startswith(f"{root / 'img001.png'}: not a readable image")
    assert skipped[1].startswith(f"{root / 'img002.png'}: not a readable image")
    assert [s.index for s in samples] == [0, 3, 3, 3]
    for name in ("img000.png", "img003.png"):
        (root / name).write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"no image under .* could be read \(the first: .*img00\d.png: not a readable image"):
        ds[(0, 0)]


def test_parse_output_invalid_utf8_names_the_line(tmp_path):
    path, root = write_world(tmp_path, n_images=2)
    path.write_bytes(path.read_bytes() + b'{"image": "\xff"}\n')
    with pytest.raises(DatasetError, match=r"phrases.jsonl:3: invalid UTF-8 at byte 11"):
        read_parse_output(path, root)
