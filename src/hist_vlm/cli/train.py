"""`hist-vlm train CONFIG [key=value ...] [--resume]`: one process, or one per GPU under
`torchrun` / `accelerate launch` (the launcher's RANK/WORLD_SIZE/LOCAL_RANK are read)."""
from __future__ import annotations

import typer

from hist_vlm.cli.app import app


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    config: str = typer.Argument(..., help="A preset name (demo_tiny, albef_coco, ...) or a training config YAML."),
    overrides: list[str] = typer.Argument(None, help="section.key=value overrides, e.g. optim.lr=1e-5 run.dir=runs/x"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in run.dir."),
) -> None:
    """Train a backbone with the HIST losses."""
    from hist_vlm.data.dataset import DatasetError
    from hist_vlm.train.config import ConfigError, load_config
    from hist_vlm.train.loop import train as run_training

    try:
        cfg = load_config(config, overrides or [])
        result = run_training(cfg, resume=resume)
    except (ConfigError, DatasetError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if result.checkpoint is not None:
        typer.echo(f"trained {result.global_step} steps; checkpoint: {result.checkpoint}")
