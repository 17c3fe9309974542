"""Retrieval fine-tuning (ALBEF's Retrieval.py: ITC + ITM, no MLM, no HIST) through the real
presets and the same trainer, then `hist-vlm eval retrieval`, end to end on the synthetic world."""
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.plugins import packaged_models
from hist_vlm.train.config import load_config
from train_helpers import read_log


@pytest.mark.parametrize("name, epochs, k_test", [("albef_retrieval_coco", 25, 256), ("albef_retrieval_flickr", 50, 128)])
def test_presets_hold_albefs_retrieval_recipe(name, epochs, k_test):
    cfg = load_config(name)
    assert (cfg.loss.schedule, cfg.loss.mlm_weight) == ("off", 0.0)
    assert (cfg.loss.queue_size, cfg.loss.momentum, cfg.loss.alpha) == (65536, 0.995, 0.4)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.min_lr) == (1e-5, 0.02, 1e-6)
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.data.max_length) == (384, 32, 30)
    assert cfg.schedule.epochs == epochs  # ALBEF's epochs over captions = 5x as many over images


def test_finetune_from_the_demo_base_then_evaluate(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "albef_retrieval_flickr", "model.checkpoint=demo_base",
            "data.synthetic.enabled=true", "data.synthetic.n_train=24", "data.synthetic.n_val=0",
            "data.synthetic.n_test=6", "data.synthetic.image_size=64", "data.image_size=64",
            "data.batch_size=8", "data.num_workers=0", "loss.queue_size=0", "optim.lr=1e-3",
            "run.max_steps=3", "run.log_every=1", "run.precision=fp32", f"run.dir={run}"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["mlm"] == 0.0 and r["phrase_itc"] == 0.0 and r["add"] == 0.0 for r in log)
    assert all(r["itc"] > 0.1 and r["itm"] > 0.1 for r in log)

    ckpt = run / "checkpoints" / "step-00000003"
    base = load_file(packaged_models()["demo_base"] / "model.safetensors")
    tuned = load_file(next(ckpt.rglob("model.safetensors")))
    head = [k for k in base if "cls.predictions.transform" in k]
    assert head and all(torch.equal(base[k], tuned[k]) for k in head)  # no MLM: its head gets no gradient
    assert not torch.equal(base["itm_head.weight"], tuned["itm_head.weight"])

    out = tmp_path / "retrieval.json"
    res = CliRunner().invoke(app, [
        "eval", "retrieval", "albef_retrieval_flickr", "--checkpoint", str(ckpt), "--data", "synthetic",
        "--ann", str(run / "world" / "captions_test.jsonl"), "--image-root", str(run / "world"),
        "--out", str(out), "--device", "cpu", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())["metrics"]
    assert {"txt_r1", "img_r10", "r_mean"} <= set(metrics)
    assert 0.0 <= metrics["r_mean"] <= 100.0
