"""What several model commands share: the model options of the eval commands, the device choice,
and loading a checkpoint as a model or a GradCAM map source (one-line errors for user mistakes)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

# the model options of the eval commands (ground takes CHECKPOINT and DEVICE); typer reads these per command
CONFIG = typer.Argument(..., help="The training config YAML of the checkpoint.")
CHECKPOINT = typer.Option(..., "--checkpoint", help="save_pretrained folder, RUN/checkpoints/step-N, or ALBEF .pth.")
NUM_WORKERS = typer.Option(2, "--num-workers", min=0, help="DataLoader workers that load images.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: no CUDA device is available")
    return device


def load_model(config: Optional[Path], checkpoint: Path, image_size=None):
    """(backbone, training config or None) from the CLI's model options; the config names the
    backbone. User mistakes become one-line errors."""
    from hist_vlm.models import load_backbone
    from hist_vlm.train.config import ConfigError, load_config

    try:
        cfg = load_config(config) if config is not None else None
        return load_backbone(checkpoint, cfg.model.name if cfg else None, image_size=image_size), cfg
    except (ConfigError, ValueError, OSError) as e:
        raise typer.BadParameter(str(e)) from None


def gradcam_source(config: Optional[Path], checkpoint: Path, layers, head, combine, device, image_size=None):
    """(map source, training config or None) from the CLI's model options. The config supplies
    the backbone name and the GradCAM layer/head/combination of training, which the options
    override. User mistakes become one-line errors."""
    from hist_vlm.eval.grounding import GradcamMaps

    model, cfg = load_model(config, checkpoint, image_size)
    if cfg is not None:
        layers = layers or list(cfg.loss.capture_layers or [])
        head = cfg.loss.capture_head if head is None else head
        combine = combine or cfg.loss.capture_combine
    try:
        return GradcamMaps(model, layers=layers, head=head, combine=combine or "mean",
                           device=resolve_device(device)), cfg
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def sweep_source(config: Optional[Path], checkpoint: Path, device, image_size, grid: dict):
    """(GradcamSweep over the grid named by the --sweep-* options, training config); a grid
    value the model cannot take (layer or head out of range, unknown combine) is one line."""
    from hist_vlm.eval.sweep import GradcamSweep, build_grid

    model, cfg = load_model(config, checkpoint, image_size)
    try:
        settings = build_grid(model.num_cross_attention_layers, model.num_cross_attention_heads, **grid)
        return GradcamSweep(model, settings, device=resolve_device(device)), cfg
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
