"""`hist-vlm eval retrieval` and the readers of ALBEF's retrieval json layouts."""
import json

import numpy as np
import pytest
from PIL import Image

from hist_vlm.data.retrieval import CaptionFileError, read_caption_corpus, read_retrieval_test, read_retrieval_train
from test_eval_cli import _run, setup  # noqa: F401 - a tiny ALBEF checkpoint, its config and a synthetic world


# ----------------------------------------------------------------------------- readers

def test_test_file_flattens_captions_image_by_image(tmp_path):
    ann = tmp_path / "flickr30k_test.json"
    ann.write_text(json.dumps([
        {"image": "flickr30k-images/1.jpg", "caption": ["A dog runs.", "a brown dog"]},
        {"image": "flickr30k-images/2.jpg", "caption": ["two cats"]},
        {"image": "flickr30k-images/3.jpg", "caption": ["a man", "a man on a bike", "cycling"]},
    ]))
    c = read_retrieval_test(ann, tmp_path / "imgs")
    assert c.images == [tmp_path / "imgs" / "flickr30k-images" / f"{i}.jpg" for i in (1, 2, 3)]
    assert c.texts == ["A dog runs.", "a brown dog", "two cats", "a man", "a man on a bike", "cycling"]
    assert c.txt2img == [0, 0, 1, 2, 2, 2]
    assert c.img2txt == [[0, 1], [2], [3, 4, 5]]
    assert read_retrieval_test(ann).images[0] == tmp_path / "flickr30k-images" / "1.jpg"  # root: the file's folder


def test_train_file_numbers_image_ids_in_first_appearance_order(tmp_path):
    ann = tmp_path / "coco_train.json"
    ann.write_text(json.dumps([
        {"image": "a.jpg", "caption": "one", "image_id": "coco_9"},
        {"image": "b.jpg", "caption": "two", "image_id": "coco_4"},
        {"image": "a.jpg", "caption": "three", "image_id": "coco_9"},
        {"image": "c.jpg", "caption": "four", "image_id": 7},
    ]))
    pairs = read_retrieval_train(ann, "/data/coco")
    assert [(p.image.name, p.caption, p.image_index) for p in pairs] == [
        ("a.jpg", "one", 0), ("b.jpg", "two", 1), ("a.jpg", "three", 0), ("c.jpg", "four", 2)]
    assert str(pairs[0].image) == "/data/coco/a.jpg"


@pytest.mark.parametrize("reader, content, message", [
    (read_retrieval_test, "[{\"image\": \"a.jpg\", \"caption\": [\"x\"]}, {\"image\": \"b.jpg\", \"caption\": \"y\"}]",
     "record 1: 'caption' must be a list of strings in a test file, got str (is this a train file?)"),
    (read_retrieval_test, "[{\"image\": \"a.jpg\"}]", "record 0: missing field 'caption'"),
    (read_retrieval_test, "[{\"image\": \"a.jpg\", \"caption\": [\"x\", 3]}]", "record 0 caption 1: a caption must be a string, got int"),
    (read_retrieval_test, "[{\"image\": \"a.jpg\", \"caption\": []}]", "record 0: no captions"),
    (read_retrieval_test, "[]", "no images"),
    (read_retrieval_test, "{\"image\": \"a.jpg\"}", "the top level must be a list, got dict"),
    (read_retrieval_test, "[{\"image\": \"a.jpg\", ", "invalid JSON at line 1"),
    (read_retrieval_train, "[{\"image\": \"a.jpg\", \"caption\": \"x\"}]", "record 0: missing field 'image_id'"),
    (read_retrieval_train, "[{\"image\": \"a.jpg\", \"caption\": \"  \", \"image_id\": 1}]", "record 0: empty caption"),
    (read_caption_corpus, "{\"image\": \"a.png\", \"captions\": [\"x\"]}\n{\"image\": \"b.png\"}\n", "line 2: missing field 'captions'"),
])
def test_malformed_files_are_one_line_errors_naming_the_record(tmp_path, reader, content, message):
    ann = tmp_path / "ann.json"
    ann.write_text(content)
    with pytest.raises(CaptionFileError) as err:
        reader(ann)
    text = str(err.value)
    assert text.startswith(f"{ann}: ") and message in text and "\n" not in text


# ----------------------------------------------------------------------------- the command
def test_eval_retrieval_on_the_synthetic_world(setup):
    root, config, ckpt = setup
    out = root / "res" / "retrieval.json"
    res = _run(["eval", "retrieval", str(config), "--checkpoint", str(ckpt), "--data", "synthetic",
                "--k-test", "2", "--out", str(out), "--device", "cpu", "--num-workers", "0", "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    world = root / "run" / "world"
    corpus = read_caption_corpus(world / "captions_test.jsonl")
    n = len(corpus.images)
    assert f"{n} images, {len(corpus.texts)} texts from synthetic" in res.output and "k_test 2, score itm" in res.output
    assert "TR@1" in res.output and "ITM top-2" in res.output
    result = json.loads(out.read_text())
    assert (result["n_images"], result["n_texts"], result["k_test"], result["data"]) == (n, len(corpus.texts), 2, "synthetic")
    i2t, t2i = (np.array(result["ranks"][key]) for key in ("image_to_text", "text_to_image"))
    assert i2t.shape == (n,) and t2i.shape == (len(corpus.texts),)
    # the written metrics are the recall of the written ranks
    assert result["metrics"]["txt_r1"] == pytest.approx(100 * np.mean(i2t < 1))
    assert result["metrics"]["img_r5"] == pytest.approx(100 * np.mean(t2i < 5))
    assert result["metrics"]["r_mean"] == pytest.approx((result["metrics"]["txt_r_mean"] + result["metrics"]["img_r_mean"]) / 2)
    assert not list(out.parent.glob(".*.tmp-*"))  # the atomic write left no temp file


def test_eval_retrieval_coco_layout_and_image_errors(setup, tmp_path):
    root, config, ckpt = setup
    (tmp_path / "val2014").mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (40, 30), colour).save(tmp_path / "val2014" / f"{i}.jpg")
    ann = tmp_path / "coco_test.json"
    ann.write_text(json.dumps([{"image": f"val2014/{i}.jpg", "caption": [f"a {c} wall", f"{c}"]}
                               for i, c in enumerate(("red", "blue"))]))
    common = ["eval", "retrieval", str(config), "--checkpoint", str(ckpt), "--device", "cpu", "--num-workers", "0"]
    res = _run([*common, "--data", "coco", "--ann", str(ann), "--image-root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "2 images, 4 texts from coco" in res.output and "k_test 256" in res.output

    (tmp_path / "val2014" / "1.jpg").write_bytes(b"not an image")
    res = _run([*common, "--data", "coco", "--ann", str(ann), "--image-root", str(tmp_path), "--num-workers", "1"])
    assert res.exit_code != 0 and "1.jpg: not a readable image" in res.output and "Traceback" not in res.output
    res = _run([*common, "--data", "coco", "--ann", str(ann), "--image-root", str(tmp_path / "elsewhere")])
    assert res.exit_code != 0 and "0.jpg: image not found (2 images missing)" in res.output


@pytest.mark.parametrize("args, message", [
    (["--data", "vqa"], "choose one of coco, flickr30k, synthetic"),
    (["--data", "coco"], "--ann is required for coco"),
    (["--data", "flickr30k", "--ann", "x.json"], "--image-root is required for flickr30k"),
    (["--data", "coco", "--ann", "NOPE.json", "--image-root", "."], "NOPE.json: no such file"),
    (["--data", "synthetic", "--score", "itc"], "--score 'itc': choose one of itm, itm+itc"),
    (["--data", "synthetic", "--k-test", "0"], "--k-test"),
    (["--data", "synthetic", "--checkpoint", "missing_ckpt"], "not found"),
])
def test_eval_retrieval_user_mistakes_are_one_line(setup, args, message):
    root, config, ckpt = setup
    res = _run(["eval", "retrieval", str(config), "--checkpoint", str(ckpt), "--device", "cpu", *args])
    assert res.exit_code != 0
    assert message in res.output and "Traceback" not in res.output
