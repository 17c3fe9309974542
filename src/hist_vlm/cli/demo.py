"""`hist-vlm demo`: the main job on the built-in synthetic world (see hist_vlm.demo)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from hist_vlm.cli.app import app

DEFAULT_CONFIG = "demo_finetune"  # a packaged preset: found by name from any directory


@app.command()
def demo(
    config: str = typer.Option(DEFAULT_CONFIG, "--config", help="Fine-tuning preset (name or YAML path)."),
    out: Path = typer.Option(Path("demo_out"), "--out", help="Where the world, runs, table and figure go."),
    quick: bool = typer.Option(False, "--quick", help="One seed, a smaller world, fewer steps (under a minute)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Number of seeds (default 3; 1 with --quick)."),
    schedule: str = typer.Option("paper", "--hist-schedule", help="HIST weight schedule: paper or constant."),
    ablation: bool = typer.Option(False, "--ablation", help="The paper's Table 6: baseline, + phrase, + addition, + subject."),
    base: Optional[Path] = typer.Option(None, "--base", help="Pretrained base to fine-tune (default: the shipped demo_base)."),
    pretrain: bool = typer.Option(False, "--pretrain", help="Rebuild the base first (demo_tags, then demo_pretrain from it; about 20 minutes on a 2-core CPU), then fine-tune it."),
    world_seed: int = typer.Option(0, "--world-seed", min=0, help="Seed of the fine-tuning world (scenes, captions, splits). Another seed draws a fresh dev world, to choose settings on without the demo's test split."),
    eval_layers: str = typer.Option("val", "--eval-layers", help="GradCAM layers of the evaluation: val (the base's best on the val split) or train (the preset's loss.capture_layers)."),
    override: list[str] = typer.Option([], "--set", help="Extra key=value for every fine-tuning (repeatable)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="Fine-tuning runs at a time, each in its own process (default: one per CPU core)."),
) -> None:
    """Fine-tune the pretrained tiny base with and without HIST on synthetic scenes, evaluate
    base and both fine-tunes, print a table (mean ± std over seeds, paired differences) and
    save a heatmap comparison figure."""
    from hist_vlm.demo.run import ABLATION, DEMO_BASE, DemoSettings, pretrain_base, run_demo
    from hist_vlm.locks import FolderInUseError, folder_lock
    from hist_vlm.train.config import ConfigError, resolve_config

    try:
        config = resolve_config(config)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    if schedule not in ("paper", "constant"):
        raise typer.BadParameter(f"--hist-schedule must be paper or constant, got {schedule!r}")
    if eval_layers not in ("val", "train"):
        raise typer.BadParameter(f"--eval-layers must be val or train, got {eval_layers!r}")
    if pretrain and base is not None:
        raise typer.BadParameter("--pretrain builds the base itself: drop --base")
    settings = DemoSettings.quick(config, out) if quick else DemoSettings(config=config, out_dir=out)
    if seeds is not None:
        settings.seeds = tuple(range(seeds))
    settings.hist_schedule = schedule
    settings.eval_layers = eval_layers
    settings.world_seed = world_seed
    settings.overrides += override
    settings.jobs = jobs
    if ablation:
        settings.variants = ABLATION
    existing = out
    while not existing.exists() and existing != existing.parent:   # the folders that will be created
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"--out {out}: {existing} is not a writable folder")
    try:
        # one demo per folder: a second one would race this one's world, runs and table
        with folder_lock(out, "demo"):
            if pretrain:
                settings.base = pretrain_base(out, ["run.max_steps=8", "data.synthetic.n_train=64"] if quick else [])
                typer.echo(f"pretrained base: {settings.base} (copy it over {DEMO_BASE} to ship it)")
            elif base is not None:
                settings.base = base
            result = run_demo(settings)
    except (ConfigError, FolderInUseError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo("\n" + result.table)
    typer.echo(f"\nheatmaps: {result.figure}   table: {out / 'results.md'}")
