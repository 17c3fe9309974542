"""VQA through the shared trainer: `hist-vlm train demo_vqa` from the shipped base, exact resume,
and `hist-vlm eval vqa` on the synthetic set it generated."""
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.data.vqa import read_answer_list, read_vqa_file
from hist_vlm.eval.vqa import score_answers
from hist_vlm.train.checkpoint import latest_checkpoint
from hist_vlm.train.config import ConfigError, load_config
from hist_vlm.train.loop import train
from train_helpers import read_log


def _overrides(run_dir, *extra):
    # 12 scenes x ~5 questions, batch 8: 7 steps per epoch
    return ["vqa.synthetic.n_train=12", "vqa.synthetic.n_val=4", "data.batch_size=8", "schedule.warmup_steps=2",
            "run.log_every=1", f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vqa") / "full"
    res = CliRunner().invoke(app, ["train", "demo_vqa", *_overrides(run, "run.max_steps=9")])
    assert res.exit_code == 0, res.output
    return run


def test_train_resumes_exactly(full_run, tmp_path):
    split = tmp_path / "split"
    first = train(load_config("demo_vqa", _overrides(split, "run.max_steps=4")), progress=False)
    assert first.global_step == 4
    resumed = train(load_config("demo_vqa", _overrides(split, "run.max_steps=9")), resume=True, progress=False)
    assert resumed.start_step == 4 and resumed.global_step == 9   # crosses the epoch boundary at 7
    a, b = read_log(full_run), read_log(split)
    assert [r["step"] for r in b] == list(range(1, 10))
    assert [(r["loss"], r["lr"]) for r in a] == [(r["loss"], r["lr"]) for r in b]
    assert len({r["loss"] for r in a}) == 9
    wa = load_file(str(latest_checkpoint(full_run) / "model" / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(split) / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.startswith("text_decoder_m.") for k in wa)          # distillation's momentum copies


def test_eval_vqa_end_to_end(full_run, tmp_path):
    world = full_run / "vqa_world"
    out = tmp_path / "results.json"
    res = CliRunner().invoke(app, ["eval", "vqa", "demo_vqa", "--checkpoint", str(latest_checkpoint(full_run)),
                                   "--data", str(world / "vqa_val.json"), "--out", str(out), "--num-workers", "0",
                                   "--k", "8"])
    assert res.exit_code == 0, res.output
    records = read_vqa_file(world / "vqa_val.json")
    results = json.loads(out.read_text())
    candidates = set(read_answer_list(world / "answer_list.json"))
    assert [r["question_id"] for r in results] == [r.question_id for r in records]
    assert all(r["answer"] in candidates for r in results)
    # the printed accuracy is the metric of the written results file
    score = score_answers({r["question_id"]: r["answer"] for r in results},
                          [(r.question_id, r.answers, r.answer_type) for r in records])
    assert f"VQA accuracy: {score.overall:.2f} ({len(records)} questions)" in res.output
    assert all(f"{kind}: {acc:.2f}" in res.output for kind, acc in score.per_answer_type.items())


def test_user_mistakes_are_one_line(full_run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x.png", "question": "q", "answer": 5, "question_id": 3}]))
    res = CliRunner().invoke(app, ["eval", "vqa", "demo_vqa", "--checkpoint", str(latest_checkpoint(full_run)),
                                   "--data", str(bad)])
    assert res.exit_code == 2 and "record 0 (question_id 3): 'answer'" in res.output
    res = CliRunner().invoke(app, ["eval", "vqa", "demo_vqa", "--checkpoint", "demo_base",
                                   "--data", str(full_run / "vqa_world" / "vqa_val.json")])
    assert res.exit_code == 2 and "not a VQA model" in res.output
    with pytest.raises(ConfigError, match="vqa.train_files is empty"):
        train(load_config("demo_vqa", _overrides(tmp_path / "r", "vqa.synthetic.enabled=false")), progress=False)
