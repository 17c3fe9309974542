import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.demo.synthetic import generate_world
from train_helpers import TINY_ALBEF_YAML


def _run(argv):
    # wide terminal: error boxes must not wrap the long temporary paths
    return CliRunner().invoke(app, argv, env={"COLUMNS": "400"})


def _map_lines(res):
    """The lines of stderr that say which GradCAM map a command uses (one per command)."""
    return [x for x in res.stderr.splitlines() if x.startswith("GradCAM map:")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hist_vlm.models import build_backbone
    from hist_vlm.train.config import load_config

    root = tmp_path_factory.mktemp("cli")
    (root / "run").mkdir()
    config = root / "tiny.yaml"
    config.write_text(TINY_ALBEF_YAML.replace("RUNDIR", str(root / "run")))
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
    # the map and where it came from, on stderr: ALBEF's 3rd cross-attention layer, the last of 2 here
    assert "GradCAM map: layers 1 head mean combine mean (albef's declared evaluation map)" in res.stderr
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
    assert "GradCAM map: layers 0 head 1 combine mean (--layer, --head; the rest: albef's declared evaluation map)" in res.stderr
    assert "test: pointing" in res.output and "val: pointing" not in res.output


@pytest.mark.parametrize("options, line", [
    ([], "layers 1 head mean combine mean (albef's declared evaluation map)"),
    (["--layer", "0"], "layers 0 head mean combine mean (--layer; the rest: albef's declared evaluation map)"),
    (["--head", "0"], "layers 1 head 0 combine mean (--head; the rest: albef's declared evaluation map)"),
    (["--layer", "0", "--layer", "1", "--combine", "product"],
     "layers 0,1 head mean combine product (--layer, --combine; the rest: albef's declared evaluation map)"),
    (["--layer", "1", "--layer", "0", "--head", "1", "--combine", "mean"], "layers 1,0 head 1 combine mean (--layer, --head, --combine)"),
])
def test_the_backbone_map_is_the_default_not_the_training_layer_and_options_override_it(setup, options, line):
    root, _, ckpt = setup
    config = root / "trained_at_0.yaml"  # trained through layer 0; the evaluation map is ALBEF's (layer 1 here)
    config.write_text(TINY_ALBEF_YAML.replace("RUNDIR", str(root / "run")).replace("capture_layers: [1]", "capture_layers: [0]"))
    res = _run(["eval", "pointing", str(config), "--checkpoint", str(ckpt), "--data", "synthetic", "--split", "test",
                "--device", "cpu", "--num-workers", "0", *options])
    assert res.exit_code == 0, res.output
    assert _map_lines(res) == [f"GradCAM map: {line}"]
    layers = [int(x) for x in line.split()[1].split(",")]
    assert f"layers {layers}, head " in res.output and "test: pointing" in res.output


@pytest.mark.parametrize("args, message", [
    (["--data", "coco"], "choose one of"),
    (["--data", "refcoco+"], "--data-root is required"),
    (["--data", "flickr30k", "--data-root", "NOPE"], "data root is not a folder"),
    (["--data", "synthetic", "--checkpoint", "missing_ckpt"], "not found"),
    (["--data", "synthetic", "--layer", "2"], "layer 2 out of range: the model has 2 cross-attention layers"),
    (["--data", "synthetic", "--head", "2"], "head 2 out of range: the cross-attention has 2 heads"),
    (["--data", "synthetic", "--layer", "0", "--layer", "0"], "repeat a layer"),
    (["--data", "synthetic", "--combine", "max"], "unknown map combination 'max'"),
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
    assert "GradCAM map: layers 1 head mean combine mean (albef's declared evaluation map)" in res.stderr
    # without a config: the checkpoint names its backbone, whose evaluation map is the default
    res = _run(["ground", str(image), "a star", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "GradCAM map: layers 1 head mean combine mean (albef's declared evaluation map)" in res.stderr
    res = _run(["ground", str(image), "a star", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu",
                "--layer", "0", "--head", "1"])
    assert res.exit_code == 0, res.output
    assert "GradCAM map: layers 0 head 1 combine mean (--layer, --head; the rest: albef's declared evaluation map)" in res.stderr
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


BLIP_YAML = """
model:
  name: blip
  params: {size: tiny}
loss:
  capture_layers: [8]
run:
  dir: RUNDIR
"""


def test_blip_evaluates_with_the_papers_mean_of_l8h10_and_l9h10(setup, tmp_path):
    """A BLIP with BLIP's 12 text layers of 12 heads (narrow, random): `eval pointing` and `ground`
    default to the paper's map, layers 7 and 8 (0-based) at head 9, averaged; not the training layer 8."""
    from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

    from hist_vlm.models import build_backbone

    root, _, _ = setup
    text = BlipTextConfig(hidden_size=24, intermediate_size=8, num_hidden_layers=12, num_attention_heads=12,
                          max_position_embeddings=64)
    vision = BlipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    hf = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_text_hidden_size=8)
    torch.manual_seed(0)
    build_backbone("blip", {"transformers": hf.to_dict()}).save_pretrained(tmp_path / "blip")
    config = tmp_path / "blip.yaml"
    config.write_text(BLIP_YAML.replace("RUNDIR", str(tmp_path / "run")))
    paper = "GradCAM map: layers 7,8 head 9 combine mean (blip's declared evaluation map)"
    common = [str(config), "--checkpoint", str(tmp_path / "blip"), "--data", "synthetic", "--data-root",
              str(root / "run" / "world"), "--split", "test", "--device", "cpu", "--num-workers", "0"]
    res = _run(["eval", "pointing", *common])
    assert res.exit_code == 0, res.output
    assert _map_lines(res) == [paper] and "layers [7, 8], head 9, device cpu" in res.output
    res = _run(["eval", "pointing", *common, "--layer", "8", "--head", "2"])
    assert res.exit_code == 0, res.output
    assert "GradCAM map: layers 8 head 2 combine mean (--layer, --head; the rest: blip's declared evaluation map)" in res.stderr
    image = next((root / "run" / "world" / "images" / "test").glob("*.png"))
    res = _run(["ground", str(image), "a red circle", "--checkpoint", str(tmp_path / "blip"),
                "--out", str(tmp_path / "heat.png"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert paper in res.stderr and "top-4 points" in res.output
