"""What several model commands share: the model options of the eval commands, the device choice,
and loading a checkpoint as a model or as a GradCAM map source on the backbone's evaluation map
(one-line errors for user mistakes)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

# the model options of the eval commands (ground takes CHECKPOINT and DEVICE); typer reads these per command
CONFIG = typer.Argument(..., help="The training config YAML of the checkpoint.")
CHECKPOINT = typer.Option(..., "--checkpoint", help="save_pretrained folder, RUN/checkpoints/step-N, or ALBEF .pth.")
NUM_WORKERS = typer.Option(2, "--num-workers", min=0, help="DataLoader workers that load images.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]")
ALLOW_ABSOLUTE_PATHS = typer.Option(
    False, "--allow-absolute-paths",
    help="Read image (and mask) paths of the data files that are absolute or lead outside their root "
         "(with '..' or a symbolic link); refused by default (hist_vlm.data.paths). Only for data files you trust.")


#: the file-name endings of the outputs (lower case): JSONL results, JSON results, CSV tables
JSONL, JSON, CSV = (".jsonl",), (".json",), (".csv",)


def figure_suffixes() -> tuple[str, ...]:
    """The endings matplotlib can write a figure as (".png", ".pdf", ".svg", ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(f".{ext}" for ext in sorted(FigureCanvasBase.get_supported_filetypes()))


def check_out(path: Optional[Path], option: str = "--out", suffixes: tuple[str, ...] = ()) -> None:
    """One-line usage errors about an output file, before any work: an existing folder at
    `path`, a name not ending in one of `suffixes` (when given), a folder that is a file or
    cannot be written. The output itself is written atomically at the end (hist_vlm._io)."""
    if path is None:
        return
    if path.is_dir():
        raise typer.BadParameter(f"{option} {path} is a folder: give a file name"
                                 + (f" ending in {suffixes[0]}" if suffixes else ""))
    if suffixes and not path.name.lower().endswith(suffixes):
        shown = " ".join(suffixes) if len(suffixes) <= 4 else " ".join(suffixes[:12]) + " ..."
        raise typer.BadParameter(f"{option} {path}: the name must end in {shown}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:   # created on write: check what exists
        folder = folder.parent
    if not folder.is_dir():
        raise typer.BadParameter(f"{option} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{option} {path}: {folder} is not writable")


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


def eval_map_choice(model, cfg, layers, head, combine):
    """(EvalMap, where it came from) for the GradCAM maps of an evaluation. Each of the options
    (`layers`, `head`, `combine`; empty / None: not given) overrides its field of the default:
    the evaluation map the backbone declares (`register(eval_map=...)`, the paper's map), else
    (a backbone that declares none, e.g. the demo's) the training config's
    `loss.capture_layers/capture_head/capture_combine`, else the backbone's
    `default_capture_layers` with the head mean. ValueError for a map the model cannot take."""
    from hist_vlm.models.registry import EvalMap, declared_eval_map

    declared = declared_eval_map(model)
    if declared is not None:
        base, origin = declared, f"{model.name}'s declared evaluation map"
    elif cfg is not None:
        base = EvalMap(tuple(cfg.loss.capture_layers or model.default_capture_layers), cfg.loss.capture_head,
                       cfg.loss.capture_combine)
        origin = f"the training config's loss.capture_*; {model.name} declares no evaluation map"
    else:
        base = EvalMap(tuple(model.default_capture_layers))
        origin = f"{model.name}'s default_capture_layers, head mean; it declares no evaluation map"
    given = [opt for opt, value in (("--layer", layers), ("--head", head), ("--combine", combine))
             if value is not None and value != [] and value != ()]
    spec = EvalMap(tuple(layers or base.layers), base.head if head is None else head, combine or base.combine)
    spec.check(model.num_cross_attention_layers, model.num_cross_attention_heads)
    if not given:
        return spec, origin
    return spec, ", ".join(given) + ("" if len(given) == 3 else f"; the rest: {origin}")


def gradcam_source(config: Optional[Path], checkpoint: Path, layers, head, combine, device, image_size=None):
    """(map source, training config or None, the line that says which map) from the CLI's model
    options. The config names the backbone; the map is the backbone's evaluation map, each field
    overridden by its option (`eval_map_choice`). The commands print the line on stderr once
    their inputs are checked. User mistakes become one-line errors."""
    from hist_vlm.eval.grounding import GradcamMaps

    model, cfg = load_model(config, checkpoint, image_size)
    try:
        spec, origin = eval_map_choice(model, cfg, layers, head, combine)
        source = GradcamMaps(model, layers=spec.layers, head=spec.head, combine=spec.combine,
                             device=resolve_device(device))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return source, cfg, f"GradCAM map: {spec.describe()} ({origin})"


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
