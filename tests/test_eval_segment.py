"""Complex referring segmentation: SAM point prompts on a tiny random SamModel, the cIoU / mean
IoU bookkeeping on hand-made masks, and `hist-vlm eval segment` end to end on the synthetic world."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hist_vlm.data.grounding import GroundingRecord
from hist_vlm.eval.segment import SamSegmenter, evaluate_segmentation, prompt_points
from test_eval_cli import _run  # the CLI runner of the eval CLI tests
from train_helpers import TINY_ALBEF_YAML

SAM_SIDE = 64  # the tiny SAM's input: longest image side resized to 64, padded to 64 x 64


def save_tiny_sam(folder):
    """A random SAM (ViT width 32, 2 layers, 64 px, 8 px patches) and its processor, saved."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import (SamMaskDecoderConfig, SamPromptEncoderConfig,
                                                           SamVisionConfig)

    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                      image_size=SAM_SIDE, patch_size=8, output_channels=16, window_size=4,
                                      global_attn_indexes=[1], num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=SAM_SIDE, patch_size=8,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=1,
                                                 num_attention_heads=2, iou_head_hidden_dim=16),
    )
    torch.manual_seed(0)
    SamModel(config).save_pretrained(folder)
    SamProcessor(SamImageProcessor(size={"longest_edge": SAM_SIDE},
                                   pad_size={"height": SAM_SIDE, "width": SAM_SIDE})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    return save_tiny_sam(tmp_path_factory.mktemp("sam") / "tiny-sam")


class FixedMaps:
    """A MapSource that returns hand-made raw maps, one per query in record order."""

    def __init__(self, maps):
        self.maps, self.seen = maps, 0

    def preprocess(self, image):
        return torch.zeros(3, 8, 8)

    def __call__(self, pixel_values, texts, image_index):
        out = self.maps[self.seen:self.seen + len(texts)]
        self.seen += len(texts)
        return out


def _record(tmp_path, name, w, h, rid):
    path = tmp_path / name
    if not path.exists():
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return GroundingRecord(id=rid, image=path, text="a cat and a dog", boxes=((0, 0, 1, 1),), box_format="xyxy",
                           split="test", width=w, height=h, kind="composite")


def _capture(model):
    """Record the keyword inputs and the outputs of every SamModel forward."""
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append((kwargs, out)), with_kwargs=True)
    return calls


def test_prompts_land_on_the_heatmap_peaks_in_original_coordinates(sam_dir, tmp_path):
    from transformers import SamProcessor

    w, h, g = 50, 30, 4  # a wide image, a 4 x 4 map
    heat = torch.zeros(g, g)
    peaks = [(1, 3), (2, 0), (0, 2), (3, 1)]  # (row, col), highest first
    for rank, (r, c) in enumerate(peaks):
        heat[r, c] = 10.0 - rank
    heat[0, 0] = 0.5  # a fifth, lower cell: not a prompt
    rec = _record(tmp_path, "wide.png", w, h, "q0")
    seg = SamSegmenter(sam_dir, multimask="single")
    calls = _capture(seg.model)
    report, _ = evaluate_segmentation([rec], FixedMaps(heat[None]), seg, lambda r: np.ones((h, w), bool),
                                      progress=False)
    # cell centres in ORIGINAL pixels: x = floor((col + .5) * W / g), y = floor((row + .5) * H / g)
    expected = [(math.floor((c + 0.5) * w / g), math.floor((r + 0.5) * h / g)) for r, c in peaks]
    assert expected == [(43, 11), (6, 18), (31, 3), (18, 26)]
    # SAM's frame: longest side 50 -> 64, the other int(30 * 64 / 50 + 0.5) = 38 (aspect kept)
    new_w, new_h = SAM_SIDE, int(h * SAM_SIDE / w + 0.5)
    sam_xy = [[x * new_w / w, y * new_h / h] for x, y in expected]
    (kwargs, _), = calls
    assert kwargs["input_points"].shape == (1, 1, 4, 2)  # one query, one mask prompt of 4 points
    np.testing.assert_allclose(kwargs["input_points"][0, 0].numpy(), sam_xy, atol=1e-4)
    assert kwargs["input_labels"].tolist() == [[[1, 1, 1, 1]]]  # all positive
    assert kwargs["multimask_output"] is False
    # the same coordinates SamProcessor itself gives for these points on this image
    proc = SamProcessor.from_pretrained(sam_dir)
    with Image.open(rec.image) as im:
        ref = proc(images=im.convert("RGB"), input_points=[[expected]], return_tensors="pt")["input_points"]
    np.testing.assert_allclose(ref[0, 0].numpy(), kwargs["input_points"][0, 0].numpy(), atol=1e-4)
    assert report.overall.count == 1


def test_prompt_points_of_a_tall_image():
    # a tall image (H 80, W 20) resized to 64 x 16: x scales by 16/20, y by 64/80
    np.testing.assert_allclose(prompt_points([(10, 40), (19, 79)], (80, 20), (64, 16)).numpy(),
                               [[8.0, 32.0], [15.2, 63.2]], rtol=1e-6)


def test_best_mode_keeps_the_highest_scored_of_three_masks_at_original_size(sam_dir):
    seg = SamSegmenter(sam_dir, multimask="best")
    calls = _capture(seg.model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (70, 20, 3), dtype=np.uint8))]
    points = [[(1, 2), (40, 20), (5, 6), (7, 8)], [(3, 60), (10, 10), (19, 69), (0, 0)], [(4, 4)] * 4]
    masks, scores = seg.segment(images, points, [0, 1, 1])  # three queries, one decoder pass
    (kwargs, out), = calls
    assert kwargs["multimask_output"] is True and out.iou_scores.shape == (3, 1, 3)
    assert kwargs["image_embeddings"].shape[0] == 3  # the second image's embedding serves two queries
    assert [m.shape for m in masks] == [(30, 50), (70, 20), (70, 20)] and masks[0].dtype == bool
    best = out.iou_scores[:, 0].argmax(-1)
    assert scores == pytest.approx(out.iou_scores[:, 0].max(-1).values.tolist())
    # the kept mask is the best one's logits upsampled to the original image, thresholded at 0
    for q, (hw, size) in enumerate([((30, 50), (38, 64)), ((70, 20), (64, 18)), ((70, 20), (64, 18))]):
        low = out.pred_masks[q, 0, best[q]][None, None]
        up = torch.nn.functional.interpolate(low, (SAM_SIDE, SAM_SIDE), mode="bilinear", align_corners=False)
        up = torch.nn.functional.interpolate(up[..., :size[0], :size[1]], hw, mode="bilinear", align_corners=False)
        assert np.array_equal(masks[q], (up[0, 0] > 0).numpy())


class HandMasks:
    """A segmenter returning hand-made masks, one per query in order."""

    def __init__(self, masks):
        self.masks, self.i = masks, 0

    def segment(self, images, points, image_index):
        out = self.masks[self.i:self.i + len(points)]
        self.i += len(points)
        return out, [0.5] * len(points)


def test_ciou_and_mean_iou_on_hand_made_masks(tmp_path):
    h, w = 6, 8
    pred1, gold1 = np.zeros((h, w), bool), np.zeros((h, w), bool)
    pred1[0:4, 0:4] = True        # 16 px
    gold1[0:4, 2:6] = True        # 16 px, 8 shared -> inter 8, union 24
    pred2, gold2 = np.zeros((h, w), bool), np.zeros((h, w), bool)
    pred2[5, 7] = True            # 1 px
    gold2[0, 0:3] = True          # 3 px, disjoint -> inter 0, union 4
    pred3, gold3 = np.ones((h, w), bool), np.zeros((h, w), bool)
    gold3[:, :4] = True           # inter 24, union 48
    recs = [_record(tmp_path, "a.png", w, h, f"q{i}") for i in range(3)]
    recs[2] = GroundingRecord(**{**recs[2].__dict__, "split": "val"})
    golds = {"q0": gold1, "q1": gold2, "q2": gold3}
    out = tmp_path / "res.jsonl"
    report, rows = evaluate_segmentation(recs, FixedMaps(torch.rand(3, 2, 2)), HandMasks([pred1, pred2, pred3]),
                                         lambda r: golds[r.id], batch_size=2, out=out, figure_rows=2, progress=False)
    s = report.summary()
    assert s["all"]["ciou"] == pytest.approx((8 + 0 + 24) / (24 + 4 + 48))
    assert s["all"]["miou"] == pytest.approx((8 / 24 + 0 / 4 + 24 / 48) / 3)
    assert s["test"] == pytest.approx({"ciou": 8 / 28, "miou": (1 / 3 + 0) / 2, "n": 2})
    assert s["val"] == pytest.approx({"ciou": 0.5, "miou": 0.5, "n": 1})
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["inter"], x["union"], x["mask_pixels"], x["gold_pixels"]) for x in lines] == [
        (8, 24, 16, 16), (0, 4, 1, 3), (24, 48, 48, 24)]
    assert len(rows) == 2 and rows[1].iou == 0.0


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from hist_vlm.demo.synthetic import generate_world
    from hist_vlm.models import build_backbone
    from hist_vlm.train.config import load_config

    root = tmp_path_factory.mktemp("segcli")
    config = root / "tiny.yaml"
    config.write_text(TINY_ALBEF_YAML.replace("RUNDIR", str(root / "run")))
    torch.manual_seed(0)
    ckpt = root / "run" / "checkpoints" / "step-00000001"
    build_backbone("albef", load_config(config).model.params).save_pretrained(ckpt / "model")
    generate_world(root / "run" / "world", n_train=0, n_val=2, n_test=2, image_size=64, seed=3, progress=False)
    return root, config, ckpt


def test_eval_segment_on_the_synthetic_world(world, sam_dir):
    root, config, ckpt = world
    out, fig = root / "res" / "seg.jsonl", root / "res" / "seg.png"
    res = _run(["eval", "segment", str(config), "--checkpoint", str(ckpt), "--sam", str(sam_dir),
                "--data", "synthetic", "--out", str(out), "--figure", str(fig), "--figure-n", "2",
                "--device", "cpu", "--num-workers", "0", "--batch-size", "3", "--multimask", "best"])
    assert res.exit_code == 0, res.output
    grounding = [json.loads(x) for x in (root / "run" / "world" / "grounding.jsonl").read_text().splitlines()]
    composite = [g for g in grounding if g["kind"] == "composite"]
    assert f"{len(composite)} composite queries" in res.output and "SAM" in res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == [g["id"] for g in composite]
    for x, g in zip(lines, composite):
        assert len(x["points"]) == 4
        assert all(0 <= px < g["width"] and 0 <= py < g["height"] for px, py in x["points"])
        with Image.open(root / "run" / "world" / g["masks"]) as m:
            assert x["gold_pixels"] == int(np.isin(np.asarray(m), g["object_ids"]).sum()) > 0
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["all"]["n"] == len(composite) and summary["multimask"] == "best"
    assert summary["all"]["ciou"] == pytest.approx(sum(x["inter"] for x in lines) / sum(x["union"] for x in lines))
    assert "all: cIoU" in res.output
    with Image.open(fig) as im:
        assert im.size[0] > 400 and im.size[1] > 200  # 4 columns, 2 rows


@pytest.mark.parametrize("case, message", [
    ("no_sam_folder", "SAM folder not found"),
    ("not_sam", "holds no SAM model"),
    ("no_weights", "not a loadable SAM model"),
    ("bad_root", "data root is not a folder"),
    ("bad_multimask", "--multimask 'union': choose one of"),
    ("refcoco_no_images", "needs the COCO train2014 image folder"),
    ("bad_line", "grounding.jsonl: line 2: not valid JSON"),
])
def test_eval_segment_user_mistakes_are_one_line(world, sam_dir, tmp_path, case, message):
    root, config, ckpt = world
    sam, data = str(sam_dir), ["--data", "synthetic", "--data-root", str(root / "run" / "world")]
    if case == "no_sam_folder":
        sam = str(tmp_path / "nope")
    elif case == "not_sam":
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
        sam = str(tmp_path / "bert")
    elif case == "no_weights":  # a SAM config without processor files or weights
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "config.json").write_text((sam_dir / "config.json").read_text())
        sam = str(tmp_path / "half")
    elif case == "bad_root":
        data = ["--data", "synthetic", "--data-root", str(tmp_path / "missing")]
    elif case == "bad_multimask":
        data += ["--multimask", "union"]
    elif case == "refcoco_no_images":
        data = ["--data", "refcoco+", "--data-root", str(tmp_path)]
    else:
        (tmp_path / "grounding.jsonl").write_text('\n{oops\n')
        data = ["--data", "synthetic", "--data-root", str(tmp_path)]
    res = _run(["eval", "segment", str(config), "--checkpoint", str(ckpt), "--sam", sam, *data, "--device", "cpu"])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert "Traceback" not in res.output
    assert any(message in line for line in res.output.splitlines()), res.output  # on one line


def test_eval_segment_on_a_refer_layout(world, sam_dir, tmp_path):
    from test_eval_segment_pairs import H, W, write_refer

    root, config, ckpt = world
    refer, images = write_refer(tmp_path / "refer"), tmp_path / "train2014"
    images.mkdir()
    for i in (1, 5):  # the test images with two or more objects
        Image.new("RGB", (W, H), (90, 20 * i, 30)).save(images / f"COCO_train2014_{i:012d}.jpg")
    out = tmp_path / "seg.jsonl"
    res = _run(["eval", "segment", str(config), "--checkpoint", str(ckpt), "--sam", str(sam_dir),
                "--data", "refcoco+", "--data-root", str(refer), "--image-root", str(images), "--seed", "3",
                "--out", str(out), "--device", "cpu", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    assert "2 complex pairs from 4 images (2 skipped" in res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"].split("_")[0] for x in lines] == ["1", "5"] and [x["split"] for x in lines] == ["testA", "testB"]
    assert lines[0]["gold_pixels"] == 40 + 10  # the polygon's 40 px and the RLE's 10
    assert " and " in lines[0]["text"] and all(0 <= x < W and 0 <= y < H for x, y in lines[0]["points"])
    # a missing image is one line, before any model work
    (images / "COCO_train2014_000000000005.jpg").unlink()
    res = _run(["eval", "segment", str(config), "--checkpoint", str(ckpt), "--sam", str(sam_dir),
                "--data", "refcoco+", "--data-root", str(refer), "--image-root", str(images), "--device", "cpu"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert any("COCO_train2014_000000000005.jpg: image not found" in line for line in res.output.splitlines())
