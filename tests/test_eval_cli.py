import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.demo.synthetic import generate_world

def _run(argv):
    # wide terminal: error boxes must not wrap the long temporary paths
    return CliRunner().invoke(app, argv, env={"COLUMNS": "400"})


TINY = """
model:
  name: albef
  params: {image_size: 64, patch_size: 16, vision_width: 32, vision_depth: 2, vision_heads: 2,
           text_width: 32, text_layers: 3, text_heads: 2, text_intermediate_size: 64,
           fusion_layer: 1, embed_dim: 16, momentum: false, max_position_embeddings: 40}
loss:
  capture_layers: [1]
run:
  dir: RUNDIR
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hist_vlm.models import build_backbone
    from hist_vlm.train.config import load_config

    root = tmp_path_factory.mktemp("cli")
    (root / "run").mkdir()
    config = root / "tiny.yaml"
    config.write_text(TINY.replace("RUNDIR", str(root / "run")))
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_backbone("albef", cfg.model.params)
    ckpt = root / "run" / "checkpoints" / "step-00000010" / "model"
    model.save_pretrained(ckpt)
    generate_world(root / "run" / "world", n_train=0, n_val=3, n_test=3, image_size=64, seed=2, progress=False)
    return root, config, ckpt.parent


def test_eval_pointing_on_the_synthetic_world(setup):
    root, config, ckpt = setup
    out = root / "res" / "results.jsonl"
    res = _run([
        "eval", "pointing", str(config), "--checkpoint", str(ckpt), "--data", "synthetic",
        "--out", str(out), "--device", "cpu", "--num-workers", "0", "--batch-size", "5",
    ])
    assert res.exit_code == 0, res.output
    assert "layers [1], head mean, device cpu" in res.output
    assert "val: pointing" in res.output and "test: pointing" in res.output and "cIoU" in res.output
    n_queries = len((root / "run" / "world" / "grounding.jsonl").read_text().splitlines())
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == n_queries
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert set(summary) == {"val", "test"}
    assert summary["val"]["n"] == sum(x["kind"] == "single" and x["split"] == "val" for x in lines)
    assert summary["val"]["pointing"] == pytest.approx(
        sum(x["hit"] for x in lines if x["kind"] == "single" and x["split"] == "val") / summary["val"]["n"])


def test_eval_pointing_one_split_and_explicit_layer(setup):
    root, config, ckpt = setup
    res = _run([
        "eval", "pointing", str(config), "--checkpoint", str(ckpt / "model"), "--data", "synthetic",
        "--data-root", str(root / "run" / "world"), "--split", "test", "--layer", "0", "--head", "1",
        "--device", "cpu", "--num-workers", "0",
    ])
    assert res.exit_code == 0, res.output
    assert "layers [0], head 1" in res.output
    assert "test: pointing" in res.output and "val: pointing" not in res.output


@pytest.mark.parametrize("args, message", [
    (["--data", "coco"], "choose one of"),
    (["--data", "refcoco+"], "--data-root is required"),
    (["--data", "flickr30k", "--data-root", "NOPE"], "data root is not a folder"),
    (["--data", "synthetic", "--checkpoint", "missing_ckpt"], "not found"),
])
def test_eval_pointing_user_mistakes_are_one_line(setup, args, message):
    root, config, ckpt = setup
    argv = ["eval", "pointing", str(config), "--checkpoint", str(ckpt), "--device", "cpu", *args]
    res = _run(argv)
    assert res.exit_code == 2  # a usage error, not a crash
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    # Typer's error box: the usage lines, then the message on exactly one line between the borders
    lines = res.output.strip().splitlines()
    usage = [x for x in lines if x.startswith(("Usage:", "Try "))]
    border = [x for x in lines if x.strip("╭╮╰╯─ ").removeprefix("Error").strip("─ ") == ""]
    content = [x for x in lines if x not in usage and x not in border]
    assert len(usage) == 2 and len(border) == 2, res.output
    assert len(content) == 1 and message in content[0], res.output


def test_ground_draws_a_figure(setup):
    root, config, ckpt = setup
    image = next((root / "run" / "world" / "images" / "val").glob("*.png"))
    out = root / "fig" / "heat.png"
    res = _run([
        "ground", str(image), "the red circle and the blue star", "--checkpoint", str(ckpt),
        "--config", str(config), "--out", str(out), "--device", "cpu",
    ])
    assert res.exit_code == 0, res.output
    assert "top-4 points" in res.output
    with Image.open(out) as im:
        assert im.size[0] > 100
    # without a config the layer must be given (ALBEF has no default GradCAM layer)
    res = _run(["ground", str(image), "a star", "--checkpoint", str(ckpt),
                                   "--out", str(out), "--device", "cpu", "--layer", "1"])
    assert res.exit_code == 0, res.output
    res = _run(["ground", str(root / "nope.png"), "a star", "--checkpoint", str(ckpt)])
    assert res.exit_code != 0 and "not a readable image" in res.output


def test_eval_pointing_flickr30k_layout_and_missing_refcoco_images(setup, tmp_path):
    import pickle

    root, config, ckpt = setup
    flickr = tmp_path / "flickr"
    (flickr / "flickr30k_images").mkdir(parents=True)
    Image.new("RGB", (90, 60), (200, 30, 30)).save(flickr / "flickr30k_images" / "7.jpg")
    (flickr / "test.txt").write_text("7\n")
    (flickr / "bounding_boxes_test.json").write_text(json.dumps({"7": {"boxes": {"1": [[0, 0, 90, 60]]}}}))
    (flickr / "sentences_test.json").write_text(json.dumps({"7": [{"phrases": [{"phrase_id": "1", "phrase": "a red wall"}]}]}))
    common = [str(config), "--checkpoint", str(ckpt), "--device", "cpu", "--num-workers", "0"]
    res = _run(["eval", "pointing", *common, "--data", "flickr30k", "--data-root", str(flickr)])
    assert res.exit_code == 0, res.output
    assert "1 queries from flickr30k" in res.output and "test: pointing" in res.output

    refer = tmp_path / "refer"
    (refer / "refcoco+").mkdir(parents=True)
    with (refer / "refcoco+" / "refs(unc).p").open("wb") as f:
        pickle.dump([{"ref_id": 1, "ann_id": 2, "image_id": 3, "split": "testA"}], f)
    (refer / "refcoco+" / "instances.json").write_text(json.dumps({
        "images": [{"id": 3, "width": 64, "height": 48}], "annotations": [{"id": 2, "image_id": 3, "bbox": [1, 1, 9, 9]}]}))
    (refer / "refcoco+_test.json").write_text(json.dumps([{"image": "coco/3.jpg", "text": "left cat", "ref_id": 1}]))
    res = _run(["eval", "pointing", *common, "--data", "refcoco+", "--data-root", str(refer)])
    assert res.exit_code != 0 and "3.jpg: image not found (1 images missing)" in res.output
    assert "Traceback" not in res.output
