import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hist_vlm.data.grounding import GroundingRecord, read_synthetic
from hist_vlm.demo.synthetic import generate_world
from hist_vlm.eval.grounding import EvalReport, GradcamMaps, evaluate


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, n_train=0, n_val=4, n_test=6, image_size=64, seed=5, progress=False)
    return root


class ScriptedMaps:
    """A hand-made map source that knows the records in evaluation order: it checks that the
    runner hands it the right texts and images, and draws maps from the ground truth."""

    def __init__(self, records, grid=8, mode="oracle"):
        self.records, self.grid, self.mode, self.cursor = list(records), grid, mode, 0

    def preprocess(self, image):
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # raw pixels [3, H, W]

    def __call__(self, pixel_values, texts, image_index):
        recs = self.records[self.cursor:self.cursor + len(texts)]
        self.cursor += len(texts)
        assert texts == [r.text for r in recs]
        assert pixel_values.shape[0] == len(set(r.image for r in recs))  # each image once
        for r, i in zip(recs, image_index.tolist()):
            with Image.open(r.image) as im:
                assert torch.equal(pixel_values[i], self.preprocess(im.convert("RGB")))
        return torch.stack([self._map(r) for r in recs])

    def _map(self, r: GroundingRecord):
        g = self.grid
        heat = torch.zeros(g, g)
        if self.mode == "zero":
            return heat
        ys, xs = torch.meshgrid(torch.arange(g) + 0.5, torch.arange(g) + 0.5, indexing="ij")
        for x1, y1, x2, y2 in r.boxes:  # one equal peak at each referred object's centre
            cx, cy = (x1 + x2) / 2 * g / r.width, (y1 + y2) / 2 * g / r.height
            heat = heat + torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / 0.5)
        return heat


def hand_pointing(source, records, batch_size: int) -> tuple[float, dict]:
    """The pointing game of the single queries, recomputed from `source`'s maps on the same
    batches: bicubic upsampling to the image size, the first maximum in row-major order, a hit
    when strictly inside an [x1, y1, x2, y2] box. Returns (accuracy, {id: (x, y)})."""
    hits = total = 0
    points = {}
    for start in range(0, len(records), batch_size):
        recs = records[start:start + batch_size]
        slot = {}
        for r in recs:
            slot.setdefault(r.image, len(slot))
        pixels = []
        for path in slot:
            with Image.open(path) as im:
                pixels.append(source.preprocess(im.convert("RGB")))
        maps = source(torch.stack(pixels), [r.text for r in recs], torch.tensor([slot[r.image] for r in recs]))
        for r, heat in zip(recs, maps.float()):
            if r.kind != "single":
                continue
            up = torch.nn.functional.interpolate(heat[None, None], size=(r.height, r.width), mode="bicubic",
                                                 align_corners=False)[0, 0]
            y, x = (up == up.max()).nonzero()[0].tolist()
            assert r.box_format == "xyxy"
            hits += any(x1 < x < x2 and y1 < y < y2 for x1, y1, x2, y2 in r.boxes)
            total += 1
            points[r.id] = (x, y)
    assert len(set(points.values())) > 1  # the points depend on the maps, not one constant
    return hits / total, points


def read_results(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_oracle_maps_score_perfectly_and_results_are_written(world, tmp_path):
    records = read_synthetic(world / "grounding.jsonl")
    out = tmp_path / "res" / "results.jsonl"
    report = evaluate(records, ScriptedMaps(records), batch_size=7, out=out, progress=False)
    summary = report.summary()
    assert set(summary) == {"val", "test"}
    for split in ("val", "test"):
        s = summary[split]
        n_single = sum(r.split == split and r.kind == "single" for r in records)
        n_comp = sum(r.split == split and r.kind == "composite" for r in records)
        assert (s["n"], s["n_composite"]) == (n_single, n_comp)
        assert s["pointing"] == 1.0 and s["composite_pointing"] == 1.0 and s["both_hit"] == 1.0
        assert s["ciou"] > 0.9
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r.id for r in records]
    comp = [x for x in lines if x["kind"] == "composite"]
    assert all(len(x["top_points"]) == 4 and x["all_hit"] and x["union"] > 0 for x in comp)
    assert all(x["top_points"] == [] and x["all_hit"] is None for x in lines if x["kind"] == "single")


def test_zero_maps_point_at_origin_and_miss(world):
    records = read_synthetic(world / "grounding.jsonl", splits=["test"])
    report = evaluate(records, ScriptedMaps(records, mode="zero"), batch_size=5, progress=False)
    s = report.summary()["test"]
    assert s["pointing"] == 0.0 and s["composite_pointing"] == 0.0


def test_xywh_records_split_mean_and_lines(tmp_path):
    Image.new("RGB", (40, 20)).save(tmp_path / "a.jpg")
    mk = lambda i, split, box: GroundingRecord(str(i), tmp_path / "a.jpg", f"t{i}", (box,), "xywh", split, 40, 20)
    records = [mk(0, "testA", (20, 0, 20, 20)), mk(1, "testA", (0, 0, 20, 20)), mk(2, "testB", (20, 0, 20, 20))]

    class RightHalf:
        def preprocess(self, image):
            return torch.zeros(3, 4, 4)

        def __call__(self, pixel_values, texts, image_index):
            assert pixel_values.shape[0] == 1 and image_index.tolist() == [0] * len(texts)
            heat = torch.zeros(len(texts), 2, 4)
            heat[:, 1, 3] = 1.0  # peak in the right half
            return heat

    report = evaluate(records, RightHalf(), batch_size=8, progress=False)
    summary = report.summary()
    assert summary["testA"]["pointing"] == 0.5 and summary["testB"]["pointing"] == 1.0
    assert summary["mean(testA,testB)"]["pointing"] == 0.75
    text = "\n".join(report.lines())
    assert "testA: pointing  50.0% (n=2)" in text and "75.0%" in text


def test_empty_records_is_an_error():
    with pytest.raises(ValueError, match="no grounding records"):
        evaluate([], None, progress=False)


def test_gradcam_maps_from_a_tiny_albef(world, tmp_path):
    from hist_vlm.models.albef import AlbefConfig, AlbefModel

    torch.manual_seed(0)
    cfg = AlbefConfig(image_size=64, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2,
                      text_width=32, text_layers=3, text_heads=2, text_intermediate_size=64,
                      fusion_layer=1, embed_dim=16, momentum=False)
    source = GradcamMaps(AlbefModel(cfg), layers=[1])
    records = read_synthetic(world / "grounding.jsonl", splits=["val"])
    with Image.open(records[0].image) as im:
        x = source.preprocess(im.convert("RGB"))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and x.mean().abs() < 3
    out = tmp_path / "results.jsonl"
    report = evaluate(records, source, batch_size=6, num_workers=2, out=out, progress=False)  # workers: no model inside
    s = report.summary()["val"]
    assert s["n"] + s["n_composite"] == len(records)
    assert not math.isnan(s["ciou"])
    # the accuracy is the one these maps give (recomputed here, same batches)
    acc, points = hand_pointing(source, records, 6)
    assert s["pointing"] == pytest.approx(acc)
    assert {x["id"]: tuple(x["point"]) for x in read_results(out) if x["kind"] == "single"} == points
    # the maps themselves: one [4, 4] non-negative map per text, not all zero
    pixels = torch.stack([x, x])
    maps = source(pixels, ["the red circle", "a star and a square"], torch.tensor([0, 1]))
    assert maps.shape == (2, 4, 4) and (maps >= 0).all() and maps.sum() > 0


def test_gradcam_maps_from_a_tiny_blip(world, tmp_path):
    from hist_vlm.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("blip", {"size": "tiny", "image_size": 32})
    source = GradcamMaps(model)  # BLIP's default layer: the paper's 9th, clamped to its depth
    assert source.layers == model.default_capture_layers and source.max_length == 64
    records = read_synthetic(world / "grounding.jsonl", splits=["test"])
    with Image.open(records[0].image) as im:
        assert source.preprocess(im.convert("RGB")).shape == (3, 32, 32)
    out = tmp_path / "results.jsonl"
    report = evaluate(records, source, batch_size=8, out=out, progress=False)
    s = report.summary()["test"]
    assert s["n"] + s["n_composite"] == len(records)
    acc, points = hand_pointing(source, records, 8)
    assert s["pointing"] == pytest.approx(acc)
    assert {x["id"]: tuple(x["point"]) for x in read_results(out) if x["kind"] == "single"} == points


def test_load_backbone_formats_and_errors(tmp_path):
    from hist_vlm.models import build_backbone, load_backbone
    from hist_vlm.models.albef import AlbefConfig, AlbefModel
    from hist_vlm.models.albef_checkpoint import to_albef_state_dict

    torch.manual_seed(0)
    albef = AlbefModel(AlbefConfig(image_size=64, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2,
                                   text_width=32, text_layers=3, text_heads=2, text_intermediate_size=64,
                                   fusion_layer=1, embed_dim=16, momentum=False))
    # an official-format .pth, evaluated at a larger resolution (position embeddings interpolated)
    torch.save({"model": to_albef_state_dict(albef)}, tmp_path / "albef.pth")
    big = load_backbone(tmp_path / "albef.pth", image_size=96)
    assert big.patch_grid == (6, 6)
    maps = GradcamMaps(big, layers=[1])(torch.randn(1, 3, 96, 96), ["a red star"], torch.tensor([0]))
    assert maps.shape == (1, 6, 6)
    # a training checkpoint folder: its model/ is loaded, same weights
    albef.save_pretrained(tmp_path / "step-00000001" / "model")
    again = load_backbone(tmp_path / "step-00000001")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in albef.state_dict().items())
    # a transformers BLIP folder is recognised by its model_type
    blip = build_backbone("blip", {"size": "tiny"})
    blip.retrieval.save_pretrained(tmp_path / "blip")
    assert type(load_backbone(tmp_path / "blip")).__name__ == "BlipBackbone"
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no backbone can read this; expected a save_pretrained folder"):
        load_backbone(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds a model for 32 px inputs, not 64 px"):
        load_backbone(tmp_path / "blip", image_size=64)


def test_missing_images_fail_before_any_model_work(tmp_path):
    rec = GroundingRecord("1", tmp_path / "gone.jpg", "a dog", ((0, 0, 1, 1),), "xywh", "val", 10, 10)

    class Never:
        def preprocess(self, image):
            raise AssertionError("must not be called")

        def __call__(self, *a):
            raise AssertionError("must not be called")

    with pytest.raises(FileNotFoundError, match="gone.jpg: image not found \\(1 images missing\\)"):
        evaluate([rec, rec], Never(), progress=False)
