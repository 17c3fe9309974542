"""Caption readers: the four formats, grouping by image, cleaning, and one-line errors."""
import json
import sys

import pytest

from hist_vlm.data.captions import MAX_CAPTION_CHARS, CaptionFileError, ReadStats, clean_caption, read_captions


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return p


def test_coco_groups_annotations_by_image_in_image_order(tmp_path):
    p = write(tmp_path, "captions_train2014.json", {
        "images": [{"id": 9, "file_name": "COCO_9.jpg"}, {"id": 4, "file_name": "COCO_4.jpg"}, {"id": 5, "file_name": "x.jpg"}],
        "annotations": [
            {"image_id": 4, "id": 1, "caption": "A dog on a couch."},
            {"image_id": 9, "id": 2, "caption": "a man riding  a horse\n"},
            {"image_id": 4, "id": 3, "caption": "a puppy sleeping"},
        ],
    })
    stats = ReadStats()
    got = list(read_captions(p, "coco", stats))
    assert got == [("COCO_9.jpg", ["a man riding a horse"]), ("COCO_4.jpg", ["A dog on a couch.", "a puppy sleeping"])]
    assert (stats.images, stats.captions, stats.images_without_captions) == (2, 3, 1)


def test_vg_regions_become_captions(tmp_path):
    p = write(tmp_path, "region_descriptions.json", [
        {"id": 1, "regions": [{"phrase": "the clock is green", "image_id": 1, "x": 0}, {"phrase": "shade on the street", "image_id": 1}]},
        {"image_id": 2, "regions": [{"phrase": "man wearing a hat", "image_id": 2}]},
    ])
    assert list(read_captions(p, "vg")) == [("1", ["the clock is green", "shade on the street"]), ("2", ["man wearing a hat"])]


def test_albef_string_or_list_captions_merged_per_image(tmp_path):
    p = write(tmp_path, "vg.json", [
        {"image": "a/1.jpg", "caption": "a red car"},
        {"image": "b/2.jpg", "caption": ["two cats", "cats on a bed"]},
        {"image": "a/1.jpg", "caption": ["a car parked by a tree"], "bbox": [[0, 0, 1, 1]]},
    ])
    assert list(read_captions(p, "albef")) == [
        ("a/1.jpg", ["a red car", "a car parked by a tree"]),
        ("b/2.jpg", ["two cats", "cats on a bed"]),
    ]


def test_jsonl_streams_line_by_line(tmp_path):
    p = write(tmp_path, "c.jsonl", '{"image": "a.jpg", "captions": ["a dog"]}\n\n{"image": 7, "captions": ["a cat"]}\n{broken\n')
    it = read_captions(p, "jsonl")
    # the good records come out before the broken line is even read
    assert next(it) == ("a.jpg", ["a dog"])
    assert next(it) == ("7", ["a cat"])
    with pytest.raises(CaptionFileError, match=r"c\.jsonl: line 4: invalid JSON"):
        next(it)


def test_empty_captions_are_skipped_and_counted(tmp_path):
    p = write(tmp_path, "c.jsonl", '{"image": "a", "captions": ["", "a dog", "  \\n "]}\n{"image": "b", "captions": [" "]}\n')
    stats = ReadStats()
    assert list(read_captions(p, "jsonl", stats)) == [("a", ["a dog"])]
    assert (stats.skipped_empty, stats.images_without_captions, stats.captions) == (3, 1, 1)


def test_long_captions_are_cut_at_a_word_boundary_and_counted(tmp_path):
    long = " ".join(["word"] * 200)  # 999 characters
    p = write(tmp_path, "c.jsonl", json.dumps({"image": "a", "captions": [long, "short"]}) + "\n")
    stats = ReadStats()
    [(_, caps)] = read_captions(p, "jsonl", stats)
    assert len(caps[0]) <= MAX_CAPTION_CHARS and caps[0].endswith("word") and long.startswith(caps[0] + " ")
    assert caps[1] == "short" and stats.truncated == 1
    assert clean_caption("x" * 400, 300) == ("x" * 300, True)  # one giant word: hard cut
    assert clean_caption("a  b", 300) == ("a b", False)


@pytest.mark.parametrize(
    "fmt, content, message",
    [
        ("jsonl", '{"image": "a", "captions": ["ok"]}\n{"captions": ["x"]}\n', r"line 2: missing field 'image'"),
        ("jsonl", '{"image": "a", "captions": "a dog"}\n', r"line 1: captions must be a list, got str"),
        ("jsonl", '{"image": "a", "captions": ["ok", 3]}\n', r"line 1 caption 1: caption must be a string, got int"),
        ("jsonl", '["a", "b"]\n', r"line 1: expected a JSON object, got list"),
        ("coco", '{"images": [], "annotations": [{"image_id": 1, "caption": "x"}]}', r"annotations\[0\]: image_id 1 is not in images"),
        ("coco", '{"images": [{"id": 1, "file_name": "f"}], "annotations": [{"image_id": 1}]}', r"annotations\[0\]: missing field 'caption'"),
        ("coco", '{"annotations": []}', r"top level: missing field 'images'"),
        ("vg", '[{"id": 1, "regions": [{"x": 1}]}]', r"\[0\]\.regions\[0\]: missing field 'phrase'"),
        ("vg", '[{"regions": []}]', r"\[0\]: missing field 'id' or 'image_id'"),
        ("albef", '[{"image": "a", "caption": null}]', r"\[0\] caption 0: caption must be a string, got NoneType"),
        ("albef", '{"image": "a"}', r"top level: the top level must be a list, got dict"),
        ("albef", '[{"image": "a", "caption": "x"}, ', r"invalid JSON at line 1 column"),
    ],
)
def test_bad_records_name_the_file_and_the_record(tmp_path, fmt, content, message):
    p = write(tmp_path, "bad." + fmt, content)
    with pytest.raises(CaptionFileError, match=message) as e:
        list(read_captions(p, fmt))
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"image": "a", "captions": ["ok"]}\n{"image": "b", "captions": ["caf\xe9"]}\n')
    with pytest.raises(CaptionFileError, match=r"line 2: invalid UTF-8 at byte 32"):
        list(read_captions(p, "jsonl"))
    q = tmp_path / "c.json"
    q.write_bytes(b'[{"image": "a", "caption": "\xff"}]')
    with pytest.raises(CaptionFileError, match=r"c\.json: invalid UTF-8 at byte 28"):
        list(read_captions(q, "albef"))


def test_missing_file_directory_and_unknown_format(tmp_path):
    with pytest.raises(CaptionFileError, match=r"nope\.json: no such file"):
        list(read_captions(tmp_path / "nope.json", "coco"))
    with pytest.raises(CaptionFileError, match="is a directory"):
        list(read_captions(tmp_path, "jsonl"))
    with pytest.raises(CaptionFileError, match=r"unknown format 'xml' \(choose coco, vg, albef, jsonl\)"):
        list(read_captions(tmp_path / "x", "xml"))


def test_readers_do_not_import_torch(tmp_path):
    import subprocess

    code = "import sys, hist_vlm.data.captions, hist_vlm.text.corpus, hist_vlm.text.cache, hist_vlm.text.llm_parser; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
