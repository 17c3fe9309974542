"""Image paths stay under their root: every reader refuses a record whose image (or mask) is
absolute, climbs out with `..` or reaches out through a symbolic link, before opening anything;
`allow_absolute_paths=True` is the explicit opt-in. Converters skip and count such records."""
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import hist_vlm.data.dataset as dataset_module
import hist_vlm.data.grounding as grounding_module
from hist_vlm.data.captions import CaptionFileError
from hist_vlm.data.complex_pairs import build_complex_pairs
from hist_vlm.data.dataset import DatasetError, HistDataset, read_parse_output
from hist_vlm.data.grounding import GroundingFileError, load_benchmark, read_flickr30k, read_refer, read_synthetic
from hist_vlm.data.paths import PathEscapeError, contained, escapes
from hist_vlm.data.prepare.flickr30k_entities import prepare_flickr30k_entities
from hist_vlm.data.prepare.karpathy import prepare_karpathy
from hist_vlm.data.prepare.visual_genome import prepare_visual_genome
from hist_vlm.data.retrieval import read_caption_corpus, read_retrieval_test, read_retrieval_train
from hist_vlm.data.vqa import VqaDataset, VqaFileError, image_paths, read_vqa_file
from train_helpers import write_world


def _png(path, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(path, format="PNG")
    return path


@pytest.fixture
def layout(tmp_path):
    """root/ with a.png, root/inside -> root/a.png, root/out -> ../secret/s.png (outside)."""
    root = tmp_path / "root"
    _png(root / "a.png")
    _png(tmp_path / "secret" / "s.png")
    os.symlink(root / "a.png", root / "inside.png")
    os.symlink(tmp_path / "secret" / "s.png", root / "out.png")
    os.symlink(tmp_path / "secret", root / "linked_dir")
    return tmp_path, root


@pytest.fixture
def no_open(monkeypatch):
    """Records every image the readers and datasets try to open."""
    opened = []
    real_open, real_rgb = Image.open, dataset_module.open_rgb

    def spy_open(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    def spy_rgb(path, *a, **k):
        opened.append(str(path))
        return real_rgb(path, *a, **k)

    monkeypatch.setattr(grounding_module.Image, "open", spy_open)
    monkeypatch.setattr(dataset_module, "open_rgb", spy_rgb)
    return opened


def test_the_rule(layout):
    tmp, root = layout
    assert contained(root, "a.png") == root / "a.png"
    assert contained(root, "inside.png") == root / "inside.png"          # a link that stays inside
    assert contained(root, "sub/../a.png") == root / "sub/../a.png"
    for bad, why in [("/etc/passwd", "is absolute"), ("../secret/s.png", "climbs above the root"),
                     ("a/../../x", "climbs above the root"), ("out.png", "symbolic link out of the root"),
                     ("linked_dir/s.png", "symbolic link out of the root"), ("a\0b", "NUL")]:
        with pytest.raises(PathEscapeError, match=why) as e:
            contained(root, bad, where="f.json: record 3")
        assert "\n" not in str(e.value) and str(e.value).startswith(f"f.json: record 3: image {bad!r}")
        assert "--allow-absolute-paths" in str(e.value)
        assert contained(root, bad.replace("\0", ""), allow_absolute=True) == root / bad.replace("\0", "")
    # the root itself may be a link
    os.symlink(root, tmp / "root_link")
    assert contained(tmp / "root_link", "a.png") == tmp / "root_link" / "a.png"
    assert escapes("x/../../y") and not escapes("x/../y") and escapes("/x")


def test_grounding_readers_refuse_before_opening(layout, no_open):
    tmp, root = layout
    # synthetic: image and mask under the jsonl's folder
    good = {"image": "a.png", "text": "x", "split": "val", "boxes": [[0, 0, 2, 2]], "width": 8, "height": 6}
    for rec, what in [({**good, "image": "/etc/passwd"}, "image '/etc/passwd' is absolute"),
                      ({**good, "masks": "../secret/s.png"}, "mask '../secret/s.png' climbs"),
                      ({**good, "image": "out.png"}, "image 'out.png' resolves to")]:
        (root / "grounding.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(GroundingFileError, match=f"grounding.jsonl: line 2: {what}"):
            read_synthetic(root / "grounding.jsonl")
        with pytest.raises(GroundingFileError, match="line 2"):
            load_benchmark("synthetic", root)
    recs = read_synthetic(root / "grounding.jsonl", allow_absolute_paths=True)
    assert recs[1].image == root / "out.png"
    assert len(load_benchmark("synthetic", root, allow_absolute_paths=True)) == 2

    # Flickr30k: the image of an id is opened for its size: a link out is refused unopened
    ann = tmp / "f30k"
    ann.mkdir()
    os.symlink(tmp / "secret" / "s.png", root / "1000.jpg")
    (ann / "val.txt").write_text("1000\n")
    (ann / "bounding_boxes_val.json").write_text(json.dumps({"1000": {"boxes": {"1": [[0, 0, 2, 2]]}}}))
    (ann / "sentences_val.json").write_text(json.dumps(
        {"1000": [{"sentence": "a b", "phrases": [{"phrase": "a", "phrase_id": "1"}]}]}))
    with pytest.raises(GroundingFileError, match=r"val.txt: image id '1000': image '1000.jpg' resolves to .*secret"):
        read_flickr30k(ann, root, "val")
    (ann / "val.txt").write_text("../secret/s\n")
    with pytest.raises(GroundingFileError, match=r"image id '../secret/s': image '../secret/s.jpg' climbs"):
        read_flickr30k(ann, root, "val")
    assert no_open == []
    (ann / "val.txt").write_text("1000\n")
    assert read_flickr30k(ann, root, "val", allow_absolute_paths=True)[0].width == 8


def test_refer_and_complex_pairs_refuse(tmp_path, no_open):
    folder = tmp_path / "refcoco+"
    folder.mkdir()
    refs = [{"ref_id": r, "ann_id": 10 + r, "image_id": 1, "split": "testA", "sentences": [{"sent": f"s{r}"}]}
            for r in (1, 2)]
    with (folder / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "width": 8, "height": 6, "file_name": "/etc/passwd"}],
        "annotations": [{"id": 11, "bbox": [0, 0, 2, 2], "segmentation": []},
                        {"id": 12, "bbox": [1, 1, 2, 2], "segmentation": []}]}))
    test = tmp_path / "refcoco+_test.json"
    test.write_text(json.dumps([{"image": "train2014/a.jpg", "text": "x", "ref_id": 1},
                                {"image": "../../etc/passwd", "text": "y", "ref_id": 2}]))
    with pytest.raises(GroundingFileError, match=r"refcoco\+_test.json: item 1: image '../../etc/passwd' climbs") as e:
        read_refer([test], tmp_path, tmp_path / "coco")
    assert "\n" not in str(e.value)
    assert read_refer([test], tmp_path, tmp_path / "coco", allow_absolute_paths=True)[1].image.name == "passwd"
    with pytest.raises(GroundingFileError, match=r"instances.json: image 1: image '/etc/passwd' is absolute"):
        build_complex_pairs(tmp_path, tmp_path / "coco")
    assert build_complex_pairs(tmp_path, tmp_path / "coco", allow_absolute_paths=True).pairs[0].record.image.name == "passwd"
    assert no_open == []


def test_retrieval_readers_refuse(layout):
    tmp, root = layout
    test = tmp / "coco_test.json"
    test.write_text(json.dumps([{"image": "a.png", "caption": ["x"]}, {"image": "/etc/passwd", "caption": ["y"]}]))
    with pytest.raises(CaptionFileError, match=r"coco_test.json: record 1: image '/etc/passwd' is absolute"):
        read_retrieval_test(test, root)
    assert read_retrieval_test(test, root, allow_absolute_paths=True).images[1] == root / "/etc/passwd"
    train = tmp / "coco_train.json"
    train.write_text(json.dumps([{"image": "../secret/s.png", "caption": "x", "image_id": 1}]))
    with pytest.raises(CaptionFileError, match=r"coco_train.json: record 0: image '../secret/s.png' climbs"):
        read_retrieval_train(train, root)
    corpus = tmp / "captions.jsonl"
    corpus.write_text(json.dumps({"image": "out.png", "captions": ["a cat"]}) + "\n")
    with pytest.raises(CaptionFileError, match=r"captions.jsonl: image 'out.png' resolves to .*secret"):
        read_caption_corpus(corpus, root)


def test_vqa_refuses_at_read_and_before_training_opens(layout, no_open):
    tmp, root = layout
    path = tmp / "vqa_train.json"
    rec = {"image": "a.png", "question": "what?", "answer": ["x"], "question_id": 1}
    path.write_text(json.dumps([rec, {**rec, "image": "/etc/passwd", "question_id": 2}]))
    with pytest.raises(VqaFileError, match=r"vqa_train.json: record 1 \(question_id 2\): image '/etc/passwd' is absolute"):
        read_vqa_file(path)
    path.write_text(json.dumps([rec, {**rec, "image": "out.png", "question_id": 2}]))
    records = read_vqa_file(path)                           # a link out is only seen against the root
    with pytest.raises(VqaFileError, match=r"question 2 \(vqa\): image 'out.png' resolves to"):
        image_paths(records, {"vqa": root})
    with pytest.raises(VqaFileError, match="question 2"):
        VqaDataset(records, {"vqa": root, "vg": root}, 8)
    assert no_open == []
    ds = VqaDataset(records, {"vqa": root, "vg": root}, 8, allow_absolute_paths=True)
    assert ds[(0, 1)].pixel_values.shape == (3, 8, 8) and set(no_open) == {str(root / "out.png")}


def test_training_records_refused_with_file_and_line(tmp_path, no_open):
    path, root = write_world(tmp_path, n_images=3)
    lines = path.read_text().splitlines()
    secret = _png(tmp_path / "secret.png")
    rec = json.loads(lines[1])
    for image, why in [(str(secret), "is absolute"), ("../secret.png", "climbs above the root")]:
        path.write_text("\n".join([lines[0], json.dumps({**rec, "image": image}), lines[2]]) + "\n")
        with pytest.raises(DatasetError, match=f"phrases.jsonl:2: image '{image}' {why}"):
            read_parse_output(path)
        with pytest.raises(DatasetError, match=f"phrases.jsonl:2: image '{image}' {why}"):
            read_parse_output(path, root)
    records = read_parse_output(path, root, allow_absolute_paths=True)[0]
    with pytest.raises(DatasetError, match=r"record 1: image '../secret.png' climbs"):
        HistDataset(records, root, 16)
    os.symlink(secret, root / "link.png")                        # a link inside the root, pointing out
    path.write_text("\n".join([lines[0], json.dumps({**rec, "image": "link.png"}), lines[2]]) + "\n")
    with pytest.raises(DatasetError, match=r"phrases.jsonl:2: image 'link.png' resolves to .*secret.png"):
        read_parse_output(path, root)
    records = read_parse_output(path)[0]                         # no root: only the text is checked
    with pytest.raises(DatasetError, match=r"record 1: image 'link.png' resolves to"):
        HistDataset(records, root, 16)
    assert no_open == []
    ds = HistDataset(records, root, 16, allow_absolute_paths=True)
    assert ds[(0, 1)].pixel_values.shape == (3, 16, 16) and set(no_open) == {str(root / "link.png")}


def test_converters_skip_and_count_paths_out_of_the_root(tmp_path):
    sents = [{"raw": "a cat", "tokens": ["a", "cat"]}]
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "ok.jpg", "split": s, "sentences": sents, "cocoid": 1}
        for s in ("train", "val", "test")] + [
        {"filepath": "/etc", "filename": "passwd", "split": "test", "sentences": sents, "cocoid": 2},
        {"filepath": "val2014", "filename": "../../../etc/passwd", "split": "train", "sentences": sents, "cocoid": 3},
    ]}))
    report = prepare_karpathy(karpathy, tmp_path / "out", progress=False)
    assert report.skipped == {
        "test: images whose path is absolute or leaves the image root with '..' (not written)": 1,
        "train: images whose path is absolute or leaves the image root with '..' (not written)": 1}
    written = "".join(p.read_text() for p in (tmp_path / "out").iterdir())
    assert "passwd" not in written
    assert read_retrieval_test(tmp_path / "out" / "coco_test.json", tmp_path).images == [tmp_path / "val2014/ok.jpg"]

    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps([{"id": 1, "regions": [{"phrase": "a dog"}]},
                                   {"id": 2, "regions": [{"phrase": "a cat"}]}]))
    image_data = tmp_path / "image_data.json"
    image_data.write_text(json.dumps([{"image_id": 1, "url": "https://x/VG_100K/1.jpg"},
                                      {"image_id": 2, "url": "https://x/../2.jpg"}]))
    report = prepare_visual_genome(regions, image_data, tmp_path / "vg.jsonl", progress=False)
    assert report.skipped == {"images whose url path leaves the image root with '..' (not written)": 1}
    assert [json.loads(x)["image"] for x in (tmp_path / "vg.jsonl").read_text().splitlines()] == ["VG_100K/1.jpg"]

    f30k = tmp_path / "f30k"
    (f30k / "Annotations").mkdir(parents=True)
    (f30k / "Sentences").mkdir()
    (tmp_path / "evil.xml").write_text("<annotation/>")        # what '../../evil' would have opened
    (f30k / "val.txt").write_text("../../evil\n")
    report = prepare_flickr30k_entities(f30k, f30k, progress=False)
    assert report.skipped == {"val: ids that are not a plain file name (a path: not read, not written)": 1}
    assert (f30k / "val.txt").read_text() == ""
