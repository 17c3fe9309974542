"""`hist-vlm data vg`: region_descriptions.json + image_data.json -> a caption JSONL keyed by
the image's real path (VG_100K or VG_100K_2), streamed; skips counted; one-line errors."""
import json

import pytest
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.data.captions import CaptionFileError, read_captions
from hist_vlm.data.prepare import PrepareError
from hist_vlm.data.prepare.visual_genome import prepare_visual_genome

REGIONS = [  # Visual Genome v1.2 layout
    {"id": 1, "regions": [{"region_id": 1382, "width": 82, "height": 139, "image_id": 1, "phrase": "the clock is green",
                           "y": 57, "x": 421}, {"region_id": 1383, "image_id": 1, "phrase": "  ", "x": 0, "y": 0}]},
    {"id": 2, "regions": [{"region_id": 9, "image_id": 2, "phrase": "man wearing a hat", "x": 3, "y": 4}]},
    {"id": 3, "regions": [{"region_id": 10, "image_id": 3, "phrase": "a tree", "x": 1, "y": 1}]},
    {"id": 4, "regions": []},
]
IMAGE_DATA = [
    {"width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "height": 600, "image_id": 1,
     "coco_id": None, "flickr_id": None},
    {"width": 800, "url": "https://cs.stanford.edu/people/rak248/VG_100K/2.jpg", "height": 600, "image_id": 2,
     "coco_id": 1234, "flickr_id": None},
    {"width": 8, "url": "https://cs.stanford.edu/people/rak248/VG_100K/4.jpg", "height": 6, "image_id": 4},
]


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_captions_keyed_by_image_path(tmp_path, monkeypatch):
    regions, image_data = write(tmp_path, "region_descriptions.json", REGIONS), write(tmp_path, "image_data.json", IMAGE_DATA)
    monkeypatch.setattr(json, "load", lambda *a, **k: pytest.fail("json.load"))   # both inputs are streamed
    report = prepare_visual_genome(regions, image_data, tmp_path / "vg_captions.jsonl", progress=False)
    monkeypatch.undo()
    assert list(read_captions(tmp_path / "vg_captions.jsonl", "jsonl")) == [
        ("VG_100K_2/1.jpg", ["the clock is green"]), ("VG_100K/2.jpg", ["man wearing a hat"])]
    assert report.skipped == {"images not in image_data.json": 1, "empty region phrases": 1,
                              "images without a usable region phrase": 1}
    assert report.written == {tmp_path / "vg_captions.jsonl": 2}


@pytest.mark.parametrize("name, content, message", [
    ("region_descriptions.json", json.dumps(REGIONS)[:len(json.dumps(REGIONS[0])) + 20], r"region_descriptions\.json: \[1\]: invalid JSON"),
    ("region_descriptions.json", json.dumps([{"id": 1, "regions": [{"x": 1}]}]), r"\[0\]\.regions\[0\]: missing field 'phrase'"),
    ("image_data.json", json.dumps([{"image_id": 1}]), r"image_data\.json: \[0\]: missing field 'url'"),
    ("image_data.json", json.dumps([{"image_id": 1, "url": "1.jpg"}]), r"image_data\.json: \[0\]: url '1\.jpg' does not end"),
])
def test_malformed_inputs_name_file_and_record_and_write_nothing(tmp_path, name, content, message):
    write(tmp_path, "region_descriptions.json", REGIONS)
    write(tmp_path, "image_data.json", IMAGE_DATA)
    write(tmp_path, name, content)
    with pytest.raises((PrepareError, CaptionFileError), match=message) as e:
        prepare_visual_genome(tmp_path / "region_descriptions.json", tmp_path / "image_data.json",
                              tmp_path / "out.jsonl", progress=False)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_data.json", "region_descriptions.json"]  # no temp left


def test_cli(tmp_path):
    regions, image_data = write(tmp_path, "region_descriptions.json", REGIONS), write(tmp_path, "image_data.json", IMAGE_DATA)
    res = CliRunner().invoke(app, ["data", "vg", str(regions), "--image-data", str(image_data), "--out", str(tmp_path / "c.jsonl")])
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path / 'c.jsonl'}: 2 records" in res.stdout and "skipped 1: images not in image_data.json" in res.stdout
    write(tmp_path, "image_data.json", "{}")
    res = CliRunner().invoke(app, ["data", "vg", str(regions), "--image-data", str(image_data), "--out", str(tmp_path / "d.jsonl")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.strip().splitlines()[-1] == f"error: {image_data}: top level: the top level must be a list, got dict"
