"""The main job end to end (`hist-vlm demo --quick`), and its pieces."""
import json
import math

from typer.testing import CliRunner

from hist_vlm.cli import app
from hist_vlm.demo.run import ABLATION, METRICS, format_table, layers_label



def test_quick_demo_runs_the_whole_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: the preset and the base come from the package
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
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
    assert set(metrics) == {"base", "baseline", "hist", "eval_layers"}
    # the evaluation's GradCAM layers: the base's best val pointing among every candidate
    # (each of the 2 cross-attention layers, their mean), reported with the scores it chose by
    chosen = metrics.pop("eval_layers")
    scores = chosen["val_pointing"]
    assert set(scores) == {"L0", "L1", "mean(L0, L1)"}
    assert scores[layers_label(tuple(chosen["chosen"]))] == max(scores.values())
    assert "evaluated at " + layers_label(tuple(chosen["chosen"])) in res.output
    for variant in ("baseline", "hist"):
        for key, _ in METRICS:
            assert len(metrics[variant][key]) == 1 and 0.0 <= metrics[variant][key][0] <= 1.0
    assert "| single-phrase pointing |" in res.output
    assert (out / "heatmaps.png").stat().st_size > 10_000
    assert f"heatmaps: {out / 'heatmaps.png'}" in res.output


def test_missing_config_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "config file not found" in res.output and "presets: " in res.output


def test_world_seed_reaches_the_settings_and_draws_another_world(tmp_path, monkeypatch):
    import types

    import hist_vlm.demo.run as demo_module
    from hist_vlm.demo.run import DemoSettings, prepare_world

    seen = []
    monkeypatch.setattr(demo_module, "run_demo", lambda settings: seen.append(settings) or types.SimpleNamespace(
        table="table", figure=tmp_path / "f.png"))
    res = CliRunner().invoke(app, ["demo", "--quick", "--world-seed", "3", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert seen[0].world_seed == 3
    # a world of another seed is drawn afresh in the same folder, not reused
    settings = DemoSettings(config=tmp_path, out_dir=tmp_path / "w", n_train=8, n_val=2, n_test=2)
    captions = []
    for seed in (0, 1):
        settings.world_seed = seed
        _, world = prepare_world(settings)
        captions.append((world / "captions_train.jsonl").read_text())
        assert json.loads((world / "demo_world.json").read_text())["seed"] == seed
    assert captions[0] != captions[1]


def test_table_reports_base_mean_std_and_paired_differences_in_percent():
    metrics = {v: {k: [0.1, 0.3] for k, _ in METRICS} for v in ("baseline", "hist")}
    metrics["hist"]["pointing"] = [0.5, 0.4]
    base = {k: 0.25 for k, _ in METRICS}
    table = format_table(metrics, base)
    # paired: (0.5 - 0.1, 0.4 - 0.3) = (+40, +10) -> 25.0 ± 21.2
    assert "| single-phrase pointing | 25.0 | 20.0 ± 14.1 | 45.0 ± 7.1 | 25.0 ± 21.2 | +40.0, +10.0 |" in table
    assert "| composite both-hit (top-4) | 25.0 | 20.0 ± 14.1 | 20.0 ± 14.1 | 0.0 ± 0.0 | +0.0, +0.0 |" in table


def test_ablation_table_has_a_row_per_variant_after_the_base():
    metrics = {v: {k: [0.1 * (i + 1)] for k, _ in METRICS} for i, v in enumerate(ABLATION)}
    lines = format_table(metrics, {k: 0.05 for k, _ in METRICS}, ABLATION).splitlines()
    assert lines[2] == "| base (no fine-tuning) | 5.0 | 5.0 | 5.0 |"
    assert [line.split(" | ")[0] for line in lines[3:]] == [
        "| baseline", "| + phrase", "| + phrase + addition", "| HIST (+ phrase + addition + subject)"]
    assert lines[-1].endswith("| 40.0 ± 0.0 | 40.0 ± 0.0 | 40.0 ± 0.0 |")


def test_pretrain_rebuilds_a_base_and_the_demo_fine_tunes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--pretrain", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    recipe = json.loads((out / "base" / "recipe.json").read_text())
    assert recipe["command"].startswith("hist-vlm demo --pretrain") and recipe["config"]["run"]["max_steps"] == 8
    assert recipe["final_log"]["step"] == 8
    # stage 2 started from stage 1 (the tags tower), and the recipe says so
    assert recipe["config"]["model"]["checkpoint"] == str(out / "pretrain_tags" / "checkpoints" / "step-00000008")
    assert recipe["started_from"]["config"]["task"] == "tags" and recipe["started_from"]["final_log"]["step"] == 8
    assert recipe["config"]["optim"]["freeze"] == ["visual_encoder.patch_embed"]
    # both fine-tunes started from the rebuilt base, not the shipped one
    for variant in ("baseline", "hist"):
        cfg = (out / "runs" / f"{variant}-seed0" / "config.yaml").read_text()
        assert f"checkpoint: {out / 'base'}" in cfg


def test_a_folder_without_a_model_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--quick", "--base", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "no pretrained model there" in res.output


def _tiny_runs(tmp_path, names_and_seeds, *extra):
    from hist_vlm.train.config import load_config
    from train_helpers import DEMO_CONFIGS, tiny_overrides, write_world

    world = write_world(tmp_path / "world", n_images=8)
    return {name: load_config(DEMO_CONFIGS / "demo_tiny.yaml", tiny_overrides(*world, tmp_path / name, f"run.seed={seed}",
                                                                         "run.max_steps=3", *extra))
            for name, seed in names_and_seeds}


def _weights(run_dir):
    from safetensors.torch import load_file

    from hist_vlm.train.checkpoint import latest_checkpoint

    return load_file(latest_checkpoint(run_dir) / "model" / "model.safetensors")


def test_parallel_runs_train_each_config_exactly_and_reuse_finished_ones(tmp_path, capsys):
    import torch

    from hist_vlm.demo.run import train_runs
    from hist_vlm.train.loop import train

    runs = _tiny_runs(tmp_path, [("a", 0), ("b", 1), ("ref", 1)])
    ref = runs.pop("ref")
    train_runs(runs, jobs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the 2 workers had on a machine of at most 2 cores
    try:
        train(ref, progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b, alone = (_weights(runs["a"].run.dir), _weights(runs["b"].run.dir), _weights(ref.run.dir))
    if len(__import__("os").sched_getaffinity(0)) <= 2:
        assert all(torch.equal(b[k], alone[k]) for k in b)  # one thread per run: bit for bit
    assert all(torch.allclose(b[k], alone[k], atol=1e-5) for k in b)
    assert not all(torch.equal(a[k], b[k]) for k in a)      # each worker ran its own config
    assert "step 3 |" in (tmp_path / "b" / "stdout.txt").read_text()  # a worker's console lines, per run
    stamp = (tmp_path / "a" / "finished.json").stat().st_mtime_ns
    capsys.readouterr()
    train_runs(runs, jobs=2)
    assert (tmp_path / "a" / "finished.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out.count("finished before, reused") == 2


def test_a_failing_parallel_run_raises_its_own_error_and_is_not_stamped(tmp_path):
    import pytest

    from hist_vlm.demo.run import train_runs
    from hist_vlm.train.config import ConfigError

    runs = _tiny_runs(tmp_path, [("bad", 0)], f"data.phrases={tmp_path / 'missing.jsonl'}")
    with pytest.raises(ConfigError, match="data.phrases: file not found"):  # the CLI's one-line error
        train_runs(runs, jobs=2)
    assert not (tmp_path / "bad" / "finished.json").exists()
