"""The layer/head sweep (paper Table 7): its grid, its one-pass maps, and that it scores every
setting exactly as a separate `evaluate` run of that setting would."""
import csv
import dataclasses
import json

import pytest
import torch
from PIL import Image

from hist_vlm.data.grounding import read_synthetic
from hist_vlm.demo.synthetic import generate_world
from hist_vlm.eval.grounding import GradcamMaps, evaluate
from hist_vlm.eval.sweep import GradcamSweep, Setting, build_grid, evaluate_sweep
from hist_vlm.losses.gradcam import gradcam_head_maps, gradcam_maps
from hist_vlm.batch import TextRows
from losses_fixtures import tiny_albef, tiny_blip
from test_eval_cli import _run, setup  # noqa: F401  (the CLI fixture: a tiny ALBEF run with a world)

TEXTS = ["a man", "a man riding a brown horse on the beach", "two cats and a dog"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic world's queries, plus a few on non-square copies of its images (the
    points are upsampled to (H, W), not (W, H)), in a split of their own."""
    root = tmp_path_factory.mktemp("world")
    generate_world(root, n_train=0, n_val=3, n_test=3, image_size=64, seed=5, progress=False)
    records = read_synthetic(root / "grounding.jsonl")
    wide = []
    for i, r in enumerate(x for x in records if x.kind == "single" and x.split == "val"):
        path = root / f"wide{i}.png"
        with Image.open(r.image) as im:
            im.convert("RGB").resize((96, 40)).save(path)
        boxes = tuple((x1 * 1.5, y1 * 40 / 64, x2 * 1.5, y2 * 40 / 64) for x1, y1, x2, y2 in r.boxes)
        wide.append(dataclasses.replace(r, id=f"wide{i}", image=path, boxes=boxes, split="wide", width=96, height=40))
    return records + wide


def _albef():
    from hist_vlm.models.albef import AlbefConfig, AlbefModel

    torch.manual_seed(0)  # 3 cross-attention layers, 2 heads
    return AlbefModel(AlbefConfig(image_size=64, patch_size=16, vision_width=32, vision_depth=2, vision_heads=2,
                                  text_width=32, text_layers=4, text_heads=2, text_intermediate_size=64,
                                  fusion_layer=1, embed_dim=16, momentum=False))


def test_default_grid_every_layer_and_head_then_adjacent_combinations():
    grid = build_grid(3, 2)
    heads = [None, 0, 1]
    singles = [Setting((x,), h) for x in range(3) for h in heads]
    combos = [Setting(g, h, c) for g in ((0, 1), (1, 2)) for c in ("mean", "product") for h in heads]
    assert grid == singles + combos
    assert len(grid) == 3 * 3 + 2 * 2 * 3
    assert [s.label for s in grid[:2]] == ["L0 mean", "L0 H0"] and grid[-1].label == "product(L1,L2) H1"


def test_grid_options():
    grid = build_grid(4, 3, layers="1-3", heads="mean,2", combine="product", pairs="all")
    assert grid == [Setting((x,), h) for x in (1, 2, 3) for h in (None, 2)] + [
        Setting(g, h, "product") for g in ((1, 2), (1, 3), (2, 3)) for h in (None, 2)]
    assert build_grid(4, 3, layers="0", heads="1", combine="none") == [Setting((0,), 1)]
    explicit = build_grid(4, 3, layers="2", heads="mean", combine="mean", pairs="3+0,1+2+3,0+3")
    assert explicit == [Setting((2,), None), Setting((0, 3), None, "mean"), Setting((1, 2, 3), None, "mean")]


@pytest.mark.parametrize("option, value, message", [
    ("layers", "3", "sweep layer 3 out of range: the model has 3 (layers 0-2)"),
    ("layers", "0,x", "sweep layers '0,x': 'x' is not a number"),
    ("layers", "2-1", "sweep layers '2-1': '2-1' is not a number or a range like 2-5"),
    ("heads", "mean,2", "sweep head 2 out of range: the model has 2 (heads 0-1)"),
    ("combine", "max", "sweep combine 'max': choose from mean, product or none"),
    ("pairs", "1", "sweep pairs '1': name two or more different layers"),
    ("pairs", "0+5", "sweep layer 5 out of range"),
])
def test_bad_grid_values(option, value, message):
    with pytest.raises(ValueError) as err:
        build_grid(3, 2, **{option: value})
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("factory", [tiny_albef, tiny_blip], ids=["albef", "blip"])
def test_head_maps_are_the_maps_of_each_layer_and_head(factory):
    model = factory().eval()
    s = model.image_size
    img = model.encode_image(torch.randn(2, 3, s, s))
    ids, mask = model.tokenize(TEXTS)
    rows = TextRows(ids, mask, torch.tensor([0, 1, 0]))
    n_layers, n_heads = model.num_cross_attention_layers, model.num_cross_attention_heads
    layers = list(range(n_layers))[::-1]  # any order: the output follows it
    calls = []
    fuse = model.fuse_rows
    model.fuse_rows = lambda *a, **k: calls.append(k["capture_layer"]) or fuse(*a, **k)
    per_head = gradcam_head_maps(model, img, rows, layers=layers, recipe="reference")
    assert calls == [tuple(layers)]  # one fusion pass captured every layer
    del model.fuse_rows
    assert per_head.shape == (3, n_layers, n_heads, *model.patch_grid)
    for i, layer in enumerate(layers):
        for h in range(n_heads):
            torch.testing.assert_close(per_head[:, i, h], gradcam_maps(model, img, rows, layers=[layer], head=h,
                                                                       recipe="reference"))
        torch.testing.assert_close(per_head[:, i].mean(1), gradcam_maps(model, img, rows, layers=[layer],
                                                                         recipe="reference"))


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("backbone", ["albef", "blip"])
def test_sweep_equals_a_separate_run_of_each_setting(world, tmp_path, backbone, monkeypatch):
    import hist_vlm.eval.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "_UPSAMPLE_BUDGET", 3 * 96 * 40)  # a query's settings in chunks of 2-3
    if backbone == "albef":
        model = _albef()
    else:
        from hist_vlm.models import build_backbone

        torch.manual_seed(0)
        model = build_backbone("blip", {"size": "tiny", "image_size": 32})
    grid = build_grid(model.num_cross_attention_layers, model.num_cross_attention_heads)
    source = GradcamSweep(model, grid)
    passes = []
    fuse = model.fuse_rows
    model.fuse_rows = lambda *a, **k: passes.append(k["capture_layer"]) or fuse(*a, **k)
    out = tmp_path / "sweep.jsonl"
    report = evaluate_sweep(world, source, batch_size=8, out=out, progress=False)
    n_batches = -(-len(world) // 8)
    assert passes == [tuple(range(model.num_cross_attention_layers))] * n_batches  # one pass per batch
    swept = _lines(out)
    assert len(swept) == len(world) * len(grid)
    # the maps themselves, not only their argmax: each setting's is the one GradcamMaps gives
    pixels = torch.stack([source.preprocess(Image.open(r.image).convert("RGB")) for r in world[:2]])
    texts, index = [r.text for r in world[:3]], torch.tensor([0, 1, 1])
    all_maps = source(pixels, texts, index)  # [N, S, gh, gw]
    for k, s in enumerate(grid):
        expected = GradcamMaps(model, layers=s.layers, head=s.head, combine=s.combine)(pixels, texts, index)
        torch.testing.assert_close(all_maps[:, k], expected, msg=s.label)
    distinct_points = set()
    for k, (s, rep) in enumerate(zip(grid, report.reports)):
        alone = tmp_path / f"{k}.jsonl"
        single = evaluate(world, GradcamMaps(model, layers=s.layers, head=s.head, combine=s.combine),
                          batch_size=8, out=alone, progress=False)
        mine = [{k: v for k, v in x.items() if k != "setting"} for x in swept if x["setting"] == s.label]
        assert mine == _lines(alone), s.label  # points, hits, top-4 points, IoU parts: per query
        assert rep.summary() == single.summary(), s.label
        distinct_points.add(tuple(tuple(x["point"]) for x in mine))
    assert len(distinct_points) > len(grid) // 2  # the settings really give different maps


def test_csv_has_one_row_per_setting(world, tmp_path):
    model = _albef()
    grid = build_grid(3, 2, layers="1,2", heads="mean,0", pairs="adjacent")
    report = evaluate_sweep(world, GradcamSweep(model, grid), batch_size=16, progress=False)
    path = tmp_path / "deep" / "sweep.csv"
    report.write_csv(path, checkpoint="ckpt", data="synthetic")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == [s.label for s in grid]
    splits = {r.split for r in world}
    composite = ("composite_pointing", "both_hit", "n_composite", "ciou", "miou")  # splits with "A and B"
    metrics = {sp: ("pointing", "n", *(composite if any(x.split == sp and x.kind == "composite" for x in world)
                                       else ())) for sp in splits}
    assert list(rows[0]) == ["checkpoint", "data", "setting", "row", "column", "layers", "head", "combine",
                             *(f"{sp}.{m}" for sp in sorted(splits) for m in metrics[sp])]
    for r, s, rep in zip(rows, grid, report.reports):
        assert (r["checkpoint"], r["layers"], r["head"]) == ("ckpt", "+".join(map(str, s.layers)),
                                                             "mean" if s.head is None else str(s.head))
        assert r["combine"] == ("" if len(s.layers) == 1 else s.combine)
        assert {k: float(v) for k, v in r.items() if "." in k} == {
            f"{sp}.{m}": pytest.approx(v) for sp, ms in rep.summary().items() for m, v in ms.items()}
    n_test = sum(w.split == "test" and w.kind == "single" for w in world)
    assert f"test pointing (n={n_test})" in report.lines()


def test_cli_sweep_prints_the_table_and_writes_csv(setup):
    root, config, ckpt = setup
    out = root / "sweep" / "results.jsonl"
    res = _run(["eval", "pointing", str(config), "--checkpoint", str(ckpt), "--data", "synthetic", "--sweep",
                "--device", "cpu", "--num-workers", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    # the tiny run: 2 cross-attention layers, 2 heads: 2 x 3 single settings + 1 pair x 2 combinations x 3
    assert "sweep of 12 settings, layers [0, 1] captured in one pass" in res.output
    header = [x for x in res.output.splitlines() if x.split() == ["mean", "H0", "H1"]]
    assert len(header) == 4  # val and test, pointing and both-hit
    for row in ("L0", "L1", "mean(L0,L1)", "product(L0,L1)"):
        assert any(x.split()[:1] == [row] and len(x.split()) == 4 for x in res.output.splitlines()), row
    with out.with_suffix(".sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and rows[0]["data"] == "synthetic"
    # the table's cells are the CSV's numbers
    l1 = next(x for x in res.output.splitlines() if x.split()[:1] == ["L1"])
    assert l1.split()[1] == f"{100 * float(rows[3]['test.pointing']):.1f}%"  # first block: test pointing, L1 mean


@pytest.mark.parametrize("args, message", [
    (["--sweep", "--sweep-layers", "2"], "sweep layer 2 out of range"),
    (["--sweep", "--sweep-heads", "0,7"], "sweep head 7 out of range"),
    (["--sweep", "--sweep-combine", "max"], "sweep combine 'max'"),
    (["--sweep", "--layer", "1"], "--layer/--head/--combine pick one setting"),
    (["--sweep-heads", "0"], "the --sweep-* options need --sweep"),
])
def test_cli_bad_sweep_values_are_one_line(setup, args, message):
    root, config, ckpt = setup
    res = _run(["eval", "pointing", str(config), "--checkpoint", str(ckpt), "--data", "synthetic",
                "--device", "cpu", *args])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    # Typer's error box: usage lines, two borders, and the message on exactly one line
    border = lambda x: x.strip("╭╮╰╯─ ").removeprefix("Error").strip("─ ") == ""  # noqa: E731
    content = [x for x in res.output.splitlines() if not border(x) and not x.startswith(("Usage:", "Try "))]
    assert len(content) == 1 and message in content[0], res.output
