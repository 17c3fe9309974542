"""`hist-vlm data flickr30k-entities`: the official Sentences/*.txt + Annotations/*.xml + split
lists -> info-ground's files, read back by `read_flickr30k`; skips counted; one-line errors."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.data.grounding import read_flickr30k
from hist_vlm.data.prepare import PrepareError
from hist_vlm.data.prepare.flickr30k_entities import parse_sentences, prepare_flickr30k_entities

# the dataset's own layouts: one sentence per line with bracket markup; VOC-like xml with 1-based corners
SENTENCES = {
    "1000": "[/EN#18/people A man] in [/EN#19/clothing/other a red hat] rides [/EN#20/animals a horse] .\n"
            "[/EN#18/people Somebody] on [/EN#21/scene a beach] near [/EN#0/notvisual something] .\n",
    "2000": "[/EN#5/people Two kids] play with [/EN#6/other a dog toy] .\n",
}
XML = {
    "1000": """<annotation>
  <filename>1000.jpg</filename>
  <size><width>64</width><height>48</height><depth>3</depth></size>
  <object><name>18</name><bndbox><xmin>11</xmin><ymin>6</ymin><xmax>31</xmax><ymax>41</ymax></bndbox></object>
  <object><name>19</name><bndbox><xmin>15</xmin><ymin>3</ymin><xmax>24</xmax><ymax>9</ymax></bndbox></object>
  <object><name>18</name><name>20</name><bndbox><xmin>2</xmin><ymin>20</ymin><xmax>60</xmax><ymax>47</ymax></bndbox></object>
  <object><name>21</name><nobndbox>0</nobndbox><scene>1</scene></object>
</annotation>""",
    "2000": """<annotation>
  <filename>2000.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <object><name>5</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
  <object><name>6</name><nobndbox>1</nobndbox><scene>0</scene></object>
</annotation>""",
}


def make_dataset(root, ids_val=("1000", "3000"), ids_test=("2000",)):
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for image_id, text in SENTENCES.items():
        (root / "Sentences" / f"{image_id}.txt").write_text(text)
        (root / "Annotations" / f"{image_id}.xml").write_text(XML[image_id])
    (root / "val.txt").write_text("\n".join(ids_val) + "\n")   # 3000 has no files: skipped
    (root / "test.txt").write_text("\n".join(ids_test) + "\n")
    return root


def test_sentence_markup_as_the_dataset_utilities_parse_it(tmp_path):
    p = tmp_path / "1000.txt"
    p.write_text(SENTENCES["1000"])
    first, second = parse_sentences(p)
    assert first["sentence"] == "A man in a red hat rides a horse ."
    assert first["phrases"] == [
        {"first_word_index": 0, "phrase": "A man", "phrase_id": "18", "phrase_type": ["people"]},
        {"first_word_index": 3, "phrase": "a red hat", "phrase_id": "19", "phrase_type": ["clothing", "other"]},
        {"first_word_index": 7, "phrase": "a horse", "phrase_id": "20", "phrase_type": ["animals"]},
    ]
    assert second["sentence"].split()[second["phrases"][2]["first_word_index"]] == "something"
    assert [q["phrase_id"] for q in second["phrases"]] == ["18", "21", "0"]


def test_converts_to_info_ground_layout_and_reads_back(tmp_path):
    root, out = make_dataset(tmp_path / "f30k"), tmp_path / "out"
    report = prepare_flickr30k_entities(root, out, progress=False)
    assert (out / "val.txt").read_text() == "1000\n" and (out / "test.txt").read_text() == "2000\n"
    assert report.skipped == {"val: images without Annotations/<id>.xml": 1}
    boxes = json.loads((out / "bounding_boxes_val.json").read_text())
    # corners minus 1 (0-based); an <object> with two <name>s gives its box to both entities
    assert boxes["1000"] == {"boxes": {"18": [[10, 5, 30, 40], [1, 19, 59, 46]], "19": [[14, 2, 23, 8]],
                                       "20": [[1, 19, 59, 46]]},
                             "scene": ["21"], "nobox": [], "width": 64, "height": 48, "depth": 3}
    assert json.loads((out / "bounding_boxes_test.json").read_text())["2000"]["nobox"] == ["6"]
    assert json.loads((out / "sentences_val.json").read_text())["1000"] == parse_sentences(root / "Sentences" / "1000.txt")
    # scored: val 18, 19, 20, 18 (21 scene, 0 no entity); test 5 (6 not visible)
    assert report.notes["val: phrases with a box (scored)"] == 4
    assert report.notes["val: phrases of the whole scene (no box, not scored)"] == 1
    assert report.notes["val: phrases without an annotated entity (not scored)"] == 1
    assert report.notes["test: phrases not visible (no box, not scored)"] == 1

    images = tmp_path / "images"
    images.mkdir()
    for image_id, size in (("1000", (64, 48)), ("2000", (40, 30))):
        Image.new("RGB", size).save(images / f"{image_id}.jpg")
    val = read_flickr30k(out, images, "val")
    assert [(r.text, r.split, (r.width, r.height)) for r in val] == [
        ("A man", "val", (64, 48)), ("a red hat", "val", (64, 48)), ("a horse", "val", (64, 48)), ("Somebody", "val", (64, 48))]
    assert val[0].boxes == ((10.0, 5.0, 30.0, 40.0), (1.0, 19.0, 59.0, 46.0)) and val[0].box_format == "xyxy"
    assert [r.text for r in read_flickr30k(out, images, "test")] == ["Two kids"]


def test_split_option_and_split_dir(tmp_path):
    root = make_dataset(tmp_path / "f30k")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "test.txt").write_text("1000 2000")   # whitespace-separated ids are fine
    report = prepare_flickr30k_entities(root, tmp_path / "out", ["test"], lists, progress=False)
    assert (tmp_path / "out" / "test.txt").read_text() == "1000\n2000\n" and not (tmp_path / "out" / "val.txt").exists()
    assert list(report.written.values()) == [2, 2, 2] and not report.skipped


@pytest.mark.parametrize("name, text, message", [
    ("Sentences/1000.txt", "A man .\n[/EN#18/people A man on a horse .\n", r"Sentences/1000\.txt: line 2: phrase 18 is not closed"),
    ("Sentences/1000.txt", "[/EN#18/people A [/EN#19/other hat] ] .\n", r"line 1: phrase 18 is not closed before '\[/EN#19/other'"),
    ("Sentences/1000.txt", "[people A man] .\n", r"line 1: bad phrase tag '\[people'"),
    ("Annotations/1000.xml", XML["1000"].replace("<xmax>31</xmax>", "<xmax>3l</xmax>"),
     r"Annotations/1000\.xml: object 0: <xmax> must be an integer, got '3l'"),
    ("Annotations/1000.xml", XML["1000"].replace("<ymin>20</ymin>", ""), r"1000\.xml: object 2: missing <ymin>"),
    ("Annotations/1000.xml", XML["1000"][:200], r"1000\.xml: not valid XML"),
    ("Annotations/2000.xml", XML["2000"].replace("<size>", "<sizes>").replace("</size>", "</sizes>"), r"2000\.xml: no <size> element"),  # test split, after val
])
def test_malformed_files_name_the_file_and_record(tmp_path, name, text, message):
    root = make_dataset(tmp_path / "f30k")
    (root / name).write_text(text)
    with pytest.raises(PrepareError, match=message) as e:
        prepare_flickr30k_entities(root, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()          # nothing half-written


def run(*args):
    return CliRunner().invoke(app, ["data", "flickr30k-entities", *map(str, args)])


def test_cli_prints_what_it_wrote_and_skipped(tmp_path):
    root, out = make_dataset(tmp_path / "f30k"), tmp_path / "out"
    res = run(root, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert f"wrote {out / 'val.txt'}: 1 records" in res.stdout
    assert "skipped 1: val: images without Annotations/<id>.xml" in res.stdout
    (root / "Sentences" / "2000.txt").write_text("[/EN#5/people Two kids play .\n")
    res = run(root, "--out", tmp_path / "out2", "--no-progress")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.strip() == f"error: {root / 'Sentences' / '2000.txt'}: line 1: phrase 5 is not closed (no ']')"
    res = run(tmp_path / "nowhere", "--out", out)
    assert res.exit_code == 2 and "no train.txt, val.txt or test.txt" in res.stderr
