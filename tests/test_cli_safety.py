"""A run that cannot be silently wrong, lose a result, or leave a half-written one: the eval
commands' outputs replace the previous ones only when complete (a SIGKILL, a SIGTERM or an
unreadable image mid-run keeps them), images are read as the pictures they are (16-bit too),
and damaged checkpoints, bad output paths, empty queries and interrupts are one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from hist_vlm.cli import run
from train_helpers import TINY_ALBEF_YAML

PREVIOUS = '{"previous": "result"}\n' * 2000   # an earlier run's 46 KB of results
PREVIOUS_SUMMARY = '{"previous": "summary"}\n'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, config, checkpoint folder, world): a tiny random ALBEF and a synthetic world of
    about 500 queries, 2 s of evaluation (relative image paths: the world can be copied)."""
    from hist_vlm.demo.synthetic import generate_world
    from hist_vlm.models import build_backbone
    from hist_vlm.train.config import load_config

    root = tmp_path_factory.mktemp("safety")
    config = root / "tiny.yaml"
    config.write_text(TINY_ALBEF_YAML.replace("RUNDIR", str(root / "run")))
    torch.manual_seed(0)
    build_backbone("albef", load_config(config).model.params).save_pretrained(root / "model")
    generate_world(root / "world", n_train=0, n_val=2, n_test=100, image_size=64, seed=2, progress=False)
    return root, config, root / "model", root / "world"


def _pointing(tiny, *extra, data_root=None, checkpoint=None):
    root, config, model, world = tiny
    return ["eval", "pointing", str(config), "--checkpoint", str(checkpoint or model), "--data", "synthetic",
            "--data-root", str(data_root or world), "--device", "cpu", "--num-workers", "0", *map(str, extra)]


def _shown(text: str) -> list[str]:
    """The non-empty lines a terminal shows for `text` (a progress bar rewrites its line with \\r)."""
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in _shown(err) if not x.startswith("GradCAM map:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _previous_results(folder):
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "results.jsonl"
    out.write_text(PREVIOUS)
    out.with_suffix(".summary.json").write_text(PREVIOUS_SUMMARY)
    return out


def _unchanged(out) -> bool:
    return out.read_text() == PREVIOUS and out.with_suffix(".summary.json").read_text() == PREVIOUS_SUMMARY


# ----------------------------------------------------------------------------- outputs

def _temps(folder):
    """The temps of an evaluation writing `folder`/results.jsonl (hidden names, `hist_vlm._io`)."""
    return [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_eval_keeps_the_previous_results(tiny, tmp_path, how):
    """A real `hist-vlm eval pointing` process, killed once it has started writing its results:
    the previous results file and summary are intact. SIGTERM also stops it in one line with
    exit code 143 and removes its temps; a SIGKILL leaves temps the next run removes."""
    out = _previous_results(tmp_path / "res")
    cmd = [sys.executable, "-c", "from hist_vlm.cli import main; main()",
           *_pointing(tiny, "--out", out, "--batch-size", 1)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 0 for p in _temps(out.parent)):   # results streamed to a temp
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the evaluation never started writing"
            time.sleep(0.01)
        assert proc.poll() is None, "the evaluation ended before it could be killed"
        proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert _unchanged(out)
    if how == "SIGTERM":
        assert proc.returncode == 143, err
        assert _shown(err)[-1] == "error: terminated (SIGTERM)" and "Traceback" not in err
        assert _temps(out.parent) == []
    else:
        assert proc.returncode == -signal.SIGKILL
        assert _temps(out.parent)   # what a kill -9 cannot clean: the next write into the folder removes it
        from hist_vlm._io import remove_stale_temps

        assert remove_stale_temps(out.parent) and _temps(out.parent) == []


@pytest.mark.parametrize("damage, workers", [("empty", 0), ("garbage", 0), ("truncated", 1)])
def test_an_unreadable_image_is_one_line_naming_it_and_keeps_the_previous_results(tiny, tmp_path, capsys,
                                                                                  damage, workers):
    world = tmp_path / "world"
    shutil.copytree(tiny[3], world)
    bad = sorted((world / "images" / "test").glob("*.png"))[5]
    data = bad.read_bytes()
    bad.write_bytes({"empty": b"", "garbage": b"not a picture at all", "truncated": data[: len(data) // 2]}[damage])
    out = _previous_results(tmp_path / "res")
    assert run(_pointing(tiny, "--out", out, "--num-workers", workers, data_root=world)) == 2
    line = _one_error_line(capsys)
    assert f"{bad}: not a readable image" in line and f"{out}, " in line and "not written)" in line
    assert _unchanged(out) and _temps(out.parent) == []


def test_a_successful_eval_replaces_results_and_summary_together(tiny, tmp_path, capsys):
    out = _previous_results(tmp_path / "res")
    assert run(_pointing(tiny, "--out", out, "--split", "val")) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines and all(x["split"] == "val" for x in lines)
    assert set(json.loads(out.with_suffix(".summary.json").read_text())) == {"val"}
    assert _temps(out.parent) == []


def test_an_empty_query_is_refused_before_any_scoring(tiny, tmp_path, capsys):
    from hist_vlm.data.grounding import read_synthetic
    from hist_vlm.eval.grounding import EvalInputError, evaluate

    world = tmp_path / "world"
    shutil.copytree(tiny[3], world)
    records = [json.loads(x) for x in (world / "grounding.jsonl").read_text().splitlines()]
    records[3]["text"] = "   "
    (world / "grounding.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "res" / "results.jsonl"
    assert run(_pointing(tiny, "--out", out, data_root=world)) == 2   # the reader refuses it
    assert "empty" in _one_error_line(capsys) and not out.parent.exists()
    # records from elsewhere (a library caller): the evaluator refuses them before any model work
    good = read_synthetic(tiny[3] / "grounding.jsonl", splits=["val"])
    empty = [type(good[0])(**{**good[0].__dict__, "text": ""}), *good[1:]]
    with pytest.raises(EvalInputError, match=f"query {good[0].id} .* has an empty text"):
        evaluate(empty, lambda *a: pytest.fail("scored"), out=out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/folder"], "--out {tmp}/folder is a folder: give a file name ending in .jsonl"),
    (["--out", "{tmp}/results.txt"], "--out {tmp}/results.txt: the name must end in .jsonl"),
    (["--out", "{tmp}/a_file/results.jsonl"], "{tmp}/a_file is not a folder"),
    (["--out", "{tmp}/readonly/new/results.jsonl"], "{tmp}/readonly is not writable"),
    (["--sweep", "--sweep-csv", "{tmp}/table.tsv"], "--sweep-csv {tmp}/table.tsv: the name must end in .csv"),
])
def test_output_mistakes_are_one_line_before_any_work(tiny, tmp_path, capsys, monkeypatch, args, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "readonly").mkdir(mode=0o555)
    if os.access(tmp_path / "readonly", os.W_OK):   # root writes anywhere: make the check see a read-only folder
        real = os.access
        monkeypatch.setattr("hist_vlm.cli.common.os.access",
                            lambda p, mode: real(p, mode) and os.fspath(p) != str(tmp_path / "readonly"))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    monkeypatch.setattr("hist_vlm.cli.common.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert run(_pointing(tiny, *[a.format(tmp=tmp_path) for a in args])) == 2
    assert message.format(tmp=tmp_path) in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_retrieval_and_vqa_outputs_must_be_json(tiny, tmp_path, capsys):
    root, config, model, _ = tiny
    assert run(["eval", "retrieval", str(config), "--checkpoint", str(model), "--data", "synthetic",
                "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "--out" in _one_error_line(capsys)
    assert run(["eval", "vqa", str(config), "--checkpoint", str(model), "--data", str(tmp_path / "q.json"),
                "--out", str(tmp_path)]) == 2
    assert "is a folder" in _one_error_line(capsys)


# ----------------------------------------------------------------------------- images

def _sixteen_bit(path, value=32896):
    """A 16-bit grey PNG of one value (32896 = 128 * 257: mid grey)."""
    Image.fromarray(np.full((40, 48), value, dtype=np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    return path


def test_sixteen_bit_images_are_grey_not_white_in_every_reader(tmp_path):
    from hist_vlm.data.grounding import GroundingRecord
    from hist_vlm.eval.grounding import distinct_images
    from hist_vlm.eval.retrieval import _ImageFiles
    from hist_vlm.eval.vqa import _Questions

    path = _sixteen_bit(tmp_path / "grey16.png")
    rec = GroundingRecord(id="q", image=path, text="a thing", boxes=((0, 0, 5, 5),), box_format="xyxy",
                          split="test", width=48, height=40)
    images, _ = distinct_images([rec])
    assert np.asarray(images[0]).max() == 128 and np.asarray(images[0]).min() == 128
    assert np.asarray(_ImageFiles([path], np.asarray)[0]).max() == 128
    q = type("Q", (), {"dataset": "vqa", "image": "grey16.png", "question_id": 1})()
    assert np.asarray(_Questions([q], {"vqa": tmp_path}, np.asarray)[0][1]).max() == 128


def test_ground_reads_sixteen_bit_images_and_refuses_bad_ones(tiny, tmp_path, capsys, monkeypatch):
    root, config, model, _ = tiny
    seen = []
    monkeypatch.setattr("hist_vlm.eval.heatmap.save_heatmap", lambda picture, *a, **k: seen.append(picture) or [])
    image = _sixteen_bit(tmp_path / "grey16.png")
    assert run(["ground", str(image), "a grey wall", "--checkpoint", str(model), "--out", str(tmp_path / "h.png"),
                "--device", "cpu"]) == 0
    assert np.asarray(seen[0]).max() == 128   # Image.convert("RGB") clips 16-bit values: all white (255)
    capsys.readouterr()
    (tmp_path / "empty.png").write_bytes(b"")
    for argv, message in [
        ([str(tmp_path / "empty.png"), "a thing"], f"{tmp_path / 'empty.png'}: not a readable image"),
        ([str(image), "  "], "TEXT is empty"),
        ([str(image), "a thing", "--out", str(tmp_path / "g.xyz")], f"--out {tmp_path / 'g.xyz'}: the name must end in"),
        ([str(image), "a thing", "--out", str(tmp_path)], "is a folder"),
    ]:
        assert run(["ground", *argv, "--checkpoint", str(model), "--device", "cpu"]) == 2
        assert message in _one_error_line(capsys)
    assert not (tmp_path / "g.xyz").exists()


def test_a_ten_thousand_word_text_keeps_the_figure_small(tiny, tmp_path, capsys):
    root, config, model, world = tiny
    image = sorted((world / "images" / "test").glob("*.png"))[0]
    sizes = []
    for text, name in (("a red circle", "short.png"), (" ".join(["circle"] * 10_000), "long.png")):
        assert run(["ground", str(image), text, "--checkpoint", str(model), "--out", str(tmp_path / name),
                    "--device", "cpu"]) == 0, capsys.readouterr().err
        with Image.open(tmp_path / name) as im:
            sizes.append(im.size)
    (w0, h0), (w1, h1) = sizes
    assert w1 <= w0 * 1.2 and h1 <= h0 + 150   # a few lines of title more, not 555,967 pixels


# ----------------------------------------------------------------------------- checkpoints

def _damage(weights, how):
    data = weights.read_bytes()
    weights.write_bytes(b"" if how == "empty" else data[: len(data) // 2])


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_a_damaged_weights_file_is_one_line_naming_it(tiny, tmp_path, capsys, how):
    root, config, model, _ = tiny
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    _damage(broken / "model.safetensors", how)
    assert run(_pointing(tiny, checkpoint=broken)) == 2
    line = _one_error_line(capsys)
    assert f"{broken / 'model.safetensors'}: not a complete safetensors file" in line
    image = sorted((tiny[3] / "images" / "test").glob("*.png"))[0]
    assert run(["ground", str(image), "a circle", "--checkpoint", str(broken), "--out", str(tmp_path / "h.png")]) == 2
    assert "not a complete safetensors file" in _one_error_line(capsys) and not (tmp_path / "h.png").exists()


@pytest.mark.parametrize("name", ["blip", "blip2"])
def test_every_backbone_names_a_damaged_weights_file(tmp_path, name):
    from losses_fixtures import tiny_backbone

    from hist_vlm.models import load_backbone

    model = tiny_backbone(name)
    model.save_pretrained(tmp_path / "ours")
    model.retrieval.save_pretrained(tmp_path / "hf")   # transformers' own folder layout
    for folder, how in ((tmp_path / "ours", "empty"), (tmp_path / "hf", "truncated")):
        _damage(folder / "model.safetensors", how)
        with pytest.raises(ValueError, match=f"{folder / 'model.safetensors'}: not a complete safetensors file"):
            load_backbone(folder)


def test_a_damaged_vqa_model_is_one_line(tmp_path):
    from test_vqa_model import _backbone

    from hist_vlm.models.albef_vqa import AlbefVqaModel
    from hist_vlm.models.registry import load_head

    AlbefVqaModel.from_backbone(_backbone(tmp_path, momentum=False))[0].save_pretrained(tmp_path / "vqa")
    _damage(tmp_path / "vqa" / "model.safetensors", "truncated")
    with pytest.raises(ValueError, match="vqa/model.safetensors: not a complete safetensors file"):
        load_head(tmp_path / "vqa", "vqa")


def test_a_wrong_typed_config_field_is_one_line_naming_the_file(tiny, tmp_path, capsys):
    from losses_fixtures import tiny_backbone

    from hist_vlm.models import load_backbone

    root, config, model, _ = tiny
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    payload = json.loads((broken / "config.json").read_text())
    payload["config"]["vision_width"] = "wide"
    (broken / "config.json").write_text(json.dumps(payload))
    assert run(_pointing(tiny, checkpoint=broken)) == 2
    line = _one_error_line(capsys)
    assert f"{broken / 'config.json'}: ALBEF config key 'vision_width' must be int, got 'wide'" in line
    # weights of another size than config.json says: one line too, not load_state_dict's list
    payload["config"]["vision_width"] = 64
    (broken / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="the weights do not fit the model its config.json describes") as err:
        load_backbone(broken)
    assert "\n" not in str(err.value)
    tiny_backbone("blip").save_pretrained(tmp_path / "blip")
    payload = json.loads((tmp_path / "blip" / "config.json").read_text())
    payload["config"]["transformers"]["vision_config"]["hidden_size"] = "wide"
    (tmp_path / "blip" / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="blip/config.json: .*hidden_size") as err:
        load_backbone(tmp_path / "blip")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- interrupts

@pytest.mark.parametrize("signum, code, line", [
    (signal.SIGINT, 130, "error: interrupted"),
    (signal.SIGTERM, 143, "error: terminated (SIGTERM)"),
])
def test_an_interrupted_command_is_one_line_and_exit_128_plus_the_signal(tiny, tmp_path, capsys, monkeypatch,
                                                                         signum, code, line):
    """The signal arrives mid-evaluation (sent by the process to itself, as `kill` would): the
    results are not written and the one line says why."""
    import hist_vlm.eval.grounding as grounding

    real = grounding.check_records

    def interrupted(records):
        real(records)
        os.kill(os.getpid(), signum)
        time.sleep(5)   # the handler raises here
        pytest.fail("the signal did not stop the command")

    monkeypatch.setattr(grounding, "check_records", interrupted)
    out = tmp_path / "res" / "results.jsonl"
    before = signal.getsignal(signal.SIGTERM)
    assert run(_pointing(tiny, "--out", out)) == code
    assert _one_error_line(capsys) == line
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before   # run() puts the previous handler back


# ----------------------------------------------------------------------------- data paths

def test_paths_outside_the_data_root_need_allow_absolute_paths(tiny, tmp_path, capsys):
    world = tmp_path / "world"
    shutil.copytree(tiny[3], world)
    records = [json.loads(x) for x in (world / "grounding.jsonl").read_text().splitlines()]
    records = [r for r in records if r["split"] == "val"]
    records[0]["image"] = str(world / records[0]["image"])   # absolute: refused unless allowed
    (world / "grounding.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run(_pointing(tiny, data_root=world)) == 2
    assert "is absolute" in _one_error_line(capsys)
    assert run(_pointing(tiny, "--allow-absolute-paths", data_root=world)) == 0
    for command in (["pointing"], ["retrieval"], ["segment"], ["vqa"]):
        assert run(["eval", *command, "--help"]) == 0
        assert "--allow-absolute-paths" in capsys.readouterr().out
