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
    """Train a backbone with the HIST losses.

    Exit codes: 0 done; 2 a one-line error (config, data, run folder in use, a checkpoint the
    disk cannot take); 1 a loss or gradient that became inf/NaN; 130 interrupted (Ctrl-C)."""
    import errno

    from hist_vlm.data.dataset import DatasetError
    from hist_vlm.locks import FolderInUseError
    from hist_vlm.train.config import ConfigError, load_config
    from hist_vlm.train.errors import TrainingError, TrainingInterrupted
    from hist_vlm.train.loop import train as run_training

    try:
        cfg = load_config(config, overrides or [])
        result = run_training(cfg, resume=resume)
    except (ConfigError, DatasetError, FolderInUseError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except TrainingError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except TrainingInterrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:   # before training began (reading the config, importing torch)
        typer.echo("interrupted before training began", err=True)
        raise typer.Exit(130) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        typer.echo(f"error: {e.strerror}" + (f": {e.filename}" if e.filename else ""), err=True)   # log, config.yaml
        raise typer.Exit(2) from None
    if result.checkpoint is not None:
        typer.echo(f"trained {result.global_step} steps; checkpoint: {result.checkpoint}")
