"""`hist-vlm eval pointing`: the pointing game (and the synthetic world's multi-object metrics)
of a trained checkpoint on RefCOCO+, ReferIt, Flickr30k Entities or the synthetic world."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from hist_vlm.cli import app

eval_app = typer.Typer(help="Evaluate a trained checkpoint.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

BENCHMARKS = ("refcoco+", "refclef", "flickr30k", "synthetic")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: no CUDA device is available")
    return device


def gradcam_source(config: Optional[Path], checkpoint: Path, layers, head, combine, device, image_size=None):
    """(map source, training config or None) from the CLI's model options. The config supplies
    the backbone name and the GradCAM layer/head/combination of training, which the options
    override. User mistakes become one-line errors."""
    from hist_vlm.eval.runner import GradcamMaps, load_backbone
    from hist_vlm.train.config import ConfigError, load_config

    try:
        cfg = load_config(config) if config is not None else None
        model = load_backbone(checkpoint, cfg.model.name if cfg else None, image_size)
        if cfg is not None:
            layers = layers or list(cfg.loss.capture_layers or [])
            head = cfg.loss.capture_head if head is None else head
            combine = combine or cfg.loss.capture_combine
        return GradcamMaps(model, layers=layers, head=head, combine=combine or "mean",
                           device=resolve_device(device)), cfg
    except (ConfigError, ValueError, OSError) as e:
        raise typer.BadParameter(str(e)) from None


@eval_app.command("pointing")
def pointing(
    config: Path = typer.Argument(..., help="The training config YAML of the checkpoint."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="save_pretrained folder, RUN/checkpoints/step-N, or ALBEF .pth."),
    data: str = typer.Option(..., "--data", help=f"One of: {', '.join(BENCHMARKS)}."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Benchmark folder (synthetic: default RUN/world)."),
    ann: list[Path] = typer.Option([], "--ann", help="RefCOCO+/ReferIt test json(s); default: <name>_*val*/*test*.json in --data-root."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Where the image paths of the annotations start."),
    split: list[str] = typer.Option([], "--split", help="Only these splits (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Per-query results, JSONL."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    num_workers: int = typer.Option(2, "--num-workers", min=0),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    layers: list[int] = typer.Option([], "--layer", help="Cross-attention layer(s), 0-based; default: the config's loss.capture_layers."),
    head: Optional[int] = typer.Option(None, "--head", help="One attention head (0-based); default: head mean."),
    combine: Optional[str] = typer.Option(None, "--combine", help="mean | product of several layers' maps."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size for an official ALBEF .pth (RefCOCO+/ReferIt: 384)."),
) -> None:
    """Pointing-game accuracy per split (and multi-object metrics on the synthetic world).

    Composite ("A and B") queries also report any-box pointing, the share whose top-4 points
    hit both objects, and the cIoU of the masks those points pick.
    """
    from hist_vlm.data.grounding import GroundingFileError, load_benchmark
    from hist_vlm.eval.runner import evaluate

    if data not in BENCHMARKS:
        raise typer.BadParameter(f"--data {data!r}: choose one of {', '.join(BENCHMARKS)}")
    source, cfg = gradcam_source(config, checkpoint, layers, head, combine, device, image_size)
    if data_root is None:
        if data != "synthetic":
            raise typer.BadParameter("--data-root is required for real benchmarks")
        data_root = Path(cfg.run.dir) / "world"
    try:
        records = load_benchmark(data, data_root, ann_files=ann, image_root=image_root, splits=split or None)
    except GroundingFileError as e:
        raise typer.BadParameter(str(e)) from None
    if not records:
        raise typer.BadParameter(f"no queries in {data_root} for splits {split or 'all'}")
    typer.echo(f"{len(records)} queries from {data} ({data_root}); layers {list(source.layers)}, "
               f"head {source.head if source.head is not None else 'mean'}, device {source.device}")
    try:
        report = evaluate(records, source, batch_size=batch_size, num_workers=num_workers, out=out)
    except FileNotFoundError as e:
        raise typer.BadParameter(str(e)) from None
    for line in report.lines():
        typer.echo(line)
    if out is not None:
        summary_path = out.with_suffix(".summary.json")
        summary_path.write_text(json.dumps(report.summary(), indent=2) + "\n")
        typer.echo(f"per-query results: {out}; summary: {summary_path}")
