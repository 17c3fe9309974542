"""The Visual Genome reader streams `region_descriptions.json` record by record (ijson): the
first images come out before a broken tail is read, and the file is never loaded whole."""
import json

import pytest

from hist_vlm.data.captions import CaptionFileError, read_captions

RECORDS = [
    {"id": 1, "regions": [{"region_id": 1382, "width": 82, "height": 139, "image_id": 1, "phrase": "the clock is green",
                           "y": 57, "x": 421}, {"region_id": 1383, "image_id": 1, "phrase": "shade is along the street",
                                                "x": 0.5, "y": 1}]},
    {"id": 2, "regions": [{"region_id": 9, "image_id": 2, "phrase": "man wearing a hat", "x": 3, "y": 4}]},
]


def test_first_records_come_before_a_broken_tail_is_read(tmp_path):
    p = tmp_path / "region_descriptions.json"
    p.write_text(json.dumps(RECORDS)[:-40] + ' {"id": 3, "regi')   # the tail is cut mid-record
    it = read_captions(p, "vg")
    assert next(it) == ("1", ["the clock is green", "shade is along the street"])
    with pytest.raises(CaptionFileError, match=r"region_descriptions\.json: \[1\]: invalid JSON \(") as e:
        next(it)
    assert "\n" not in str(e.value)


def test_never_loads_the_whole_file(tmp_path, monkeypatch):
    p = tmp_path / "region_descriptions.json"
    p.write_text(json.dumps(RECORDS, indent=2))
    monkeypatch.setattr(json, "load", lambda *a, **k: pytest.fail("json.load"))
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("json.loads"))
    assert list(read_captions(p, "vg")) == [("1", ["the clock is green", "shade is along the street"]),
                                            ("2", ["man wearing a hat"])]


@pytest.mark.parametrize("content, message", [
    ('{"id": 1, "regions": []}', r"top level: the top level must be a list, got dict"),
    ('\n\n  "x"', r"top level: the top level must be a list, got str"),
    ("", r"top level: the top level must be a list, got nothing"),
    ('[{"id": 1, "regions": []}] [', r"\[1\]: invalid JSON \("),     # trailing garbage after the last record
])
def test_bad_top_level_is_one_line(tmp_path, content, message):
    p = tmp_path / "region_descriptions.json"
    p.write_text(content)
    with pytest.raises(CaptionFileError, match=message):
        list(read_captions(p, "vg"))
