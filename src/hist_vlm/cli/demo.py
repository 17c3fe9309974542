"""`hist-vlm demo`: the main job on the built-in synthetic world (see hist_vlm.demo)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hist_vlm.cli import app

DEFAULT_CONFIG = "demo_tiny"  # a packaged preset: found by name from any directory


@app.command()
def demo(
    config: str = typer.Option(DEFAULT_CONFIG, "--config", help="Training preset (name or YAML path) of the tiny model."),
    out: Path = typer.Option(Path("demo_out"), "--out", help="Where the world, runs, table and figure go."),
    quick: bool = typer.Option(False, "--quick", help="One seed, a smaller world, fewer epochs (about 3 min)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Number of seeds (default 3; 1 with --quick)."),
    schedule: str = typer.Option("paper", "--hist-schedule", help="HIST weight schedule: paper or constant."),
    override: list[str] = typer.Option([], "--set", help="Extra key=value for both trainings (repeatable)."),
) -> None:
    """Train the same tiny model with and without HIST on synthetic scenes, evaluate both,
    print a table (mean ± std over seeds) and save a heatmap comparison figure."""
    from hist_vlm.demo import DemoSettings, run_demo
    from hist_vlm.train.config import ConfigError, resolve_config

    try:
        config = resolve_config(config)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    if schedule not in ("paper", "constant"):
        raise typer.BadParameter(f"--hist-schedule must be paper or constant, got {schedule!r}")
    settings = DemoSettings.quick(config, out) if quick else DemoSettings(config=config, out_dir=out)
    if seeds is not None:
        settings.seeds = tuple(range(seeds))
    settings.hist_schedule = schedule
    settings.overrides += override
    try:
        result = run_demo(settings)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo("\n" + result.table)
    typer.echo(f"\nheatmaps: {result.figure}   table: {out / 'results.md'}")
