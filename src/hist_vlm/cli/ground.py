"""`hist-vlm ground`: one image, one text -> a GradCAM heatmap picture with the top-4 points."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hist_vlm.cli.app import app
from hist_vlm.cli.common import CHECKPOINT, DEVICE, check_out, figure_suffixes, gradcam_source


@app.command()
def ground(
    image: Path = typer.Argument(..., help="An image file."),
    text: str = typer.Argument(..., help='What to find, e.g. "a dog and a frisbee".'),
    checkpoint: Path = CHECKPOINT,
    out: Path = typer.Option(Path("heat.png"), "--out", help="The figure; its ending picks the format (.png, .pdf, .svg, ...)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Training preset name or config YAML (names the backbone; its GradCAM layer/head for a backbone that declares no evaluation map)."),
    device: str = DEVICE,
    layers: list[int] = typer.Option([], "--layer", help="Cross-attention layer(s), 0-based; default: the backbone's evaluation map (docs/evaluation.md)."),
    head: Optional[int] = typer.Option(None, "--head", help="One attention head (0-based); default: the evaluation map's (ALBEF: head mean)."),
    combine: Optional[str] = typer.Option(None, "--combine", help="mean | product of several layers' maps; default: the evaluation map's."),
    side_by_side: bool = typer.Option(True, "--side-by-side/--overlay-only",
                                      help="Show the untouched image left of the overlay."),
    alpha: float = typer.Option(0.8, "--alpha", min=0.0, max=1.0, help="Overlay opacity at the map's peak."),
) -> None:
    """Heatmap of where the model grounds TEXT in IMAGE.

    The GradCAM map (the backbone's evaluation map, as `eval pointing`; --layer/--head/--combine
    override it) blended over the image by its value (low values leave the image as it is), the
    top-4 points starred (the paper's Figure 3), the pointing-game point ringed, and the
    untouched image beside it.
    """
    import torch

    from hist_vlm.data.images import ImageError, open_rgb
    from hist_vlm.eval.heatmap import save_heatmap

    if not text.strip():
        raise typer.BadParameter("TEXT is empty: give what to find in the image")
    check_out(out, "--out", figure_suffixes())
    try:
        picture = open_rgb(image)   # every mode as the picture it shows (a 16-bit PNG is not clipped white)
    except ImageError as e:
        raise typer.BadParameter(str(e)) from None
    source, _, map_line = gradcam_source(config, checkpoint, layers, head, combine, device)
    typer.echo(map_line, err=True)
    pixels = source.preprocess(picture)[None]  # [1, 3, S, S]
    heat = source(pixels, [text], torch.zeros(1, dtype=torch.long))[0].cpu()  # [gh, gw]
    try:
        points = save_heatmap(picture, heat, out, title=text, alpha=alpha, show_image=side_by_side)
    except OSError as e:  # the folder went away or filled up; the temp is removed, an old OUT kept
        raise typer.BadParameter(f"--out {out}: cannot write ({e.strerror or e})") from None
    typer.echo(f"{out}  top-{len(points)} points (x, y): {points}")
