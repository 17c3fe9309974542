"""The main job end to end (`hist-vlm demo --quick`), and its pieces."""
import json
import math
from pathlib import Path

from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.demo import METRICS, format_table, write_vocab

REPO = Path(__file__).resolve().parents[1]


def test_quick_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--quick", "--config", str(REPO / "configs/demo_tiny.yaml"),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    # the real pipeline left its files: world, parse output with pairs, both runs, eval results
    phrases = [json.loads(l) for l in (out / "world" / "phrases_train.jsonl").open()]
    assert phrases and any(rec["pairs"] for rec in phrases)
    for variant in ("baseline", "hist"):
        run = out / "runs" / f"{variant}-seed0"
        log = [json.loads(l) for l in (run / "log.jsonl").open()]
        assert all(math.isfinite(r["loss"]) for r in log)
        weight = max(r["hist_weight"] for r in log)
        assert (weight == 0) if variant == "baseline" else (weight > 0)
        assert sum(1 for _ in (run / "eval_test.jsonl").open()) > 0
    metrics = json.loads((out / "results.json").read_text())
    for variant in ("baseline", "hist"):
        for key, _ in METRICS:
            assert len(metrics[variant][key]) == 1 and 0.0 <= metrics[variant][key][0] <= 1.0
    assert "| single-phrase pointing |" in res.output
    assert (out / "heatmaps.png").stat().st_size > 10_000


def test_missing_config_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "config file not found" in res.output and "presets: " in res.output


def test_table_reports_mean_and_sample_std_in_percent():
    metrics = {v: {k: [0.1, 0.3] for k, _ in METRICS} for v in ("baseline", "hist")}
    metrics["hist"]["pointing"] = [0.5, float("nan")]
    table = format_table(metrics, 2)
    assert "| single-phrase pointing | 20.0 ± 14.1 | 50.0 ± 0.0 |" in table


def test_vocab_holds_special_tokens_and_every_cleaned_caption_word(tmp_path):
    captions = tmp_path / "c.jsonl"
    captions.write_text(json.dumps({"image": "a.png", "captions": ["A Red circle, left of a star."]}) + "\n")
    n = write_vocab(captions, tmp_path / "vocab.txt")
    vocab = (tmp_path / "vocab.txt").read_text().split()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert set(vocab[5:]) == {"a", "red", "circle", "left", "of", "star"} and n == len(vocab)
