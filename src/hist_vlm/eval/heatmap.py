"""Heatmap figures, as the paper's Figure 3: the GradCAM map over the image, with the top-4
points (the multi-object prompt points, eval.pointing.top_k_points) as enlarged red stars.

matplotlib runs on the Agg backend (no display needed).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torch import Tensor

from hist_vlm.eval.pointing import TOP_K, pointing_point, top_k_points, upsample_map


def display_map(heat: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Raw map [gh, gw] -> [H, W] in [0, 1] for display: bicubic upsampling, then min-max."""
    up = upsample_map(heat.detach().float().cpu(), size).numpy()
    lo, hi = float(up.min()), float(up.max())
    return (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_heatmap(
    ax,
    image: Image.Image,
    heat: Tensor,
    *,
    title: str | None = None,
    k: int = TOP_K,
    boxes: Sequence[Sequence[float]] = (),
    box_format: str = "xyxy",
    alpha: float = 0.5,
) -> list[tuple[int, int]]:
    """Draw the map over the image on a matplotlib axis; return the starred points (x, y).

    The map is drawn at the image's own size; `boxes` (ground truth, optional) are outlined in
    green; the pointing-game point is the ring-marked star.
    """
    from matplotlib.patches import Rectangle

    image = image.convert("RGB")
    w, h = image.size
    points = top_k_points(heat, (h, w), k)
    px, py = pointing_point(heat, (h, w))
    ax.imshow(image)
    ax.imshow(display_map(heat, (h, w)), cmap="jet", alpha=alpha, vmin=0, vmax=1)
    for b in boxes:
        x1, y1, x2, y2 = b if box_format == "xyxy" else (b[0], b[1], b[0] + b[2], b[1] + b[3])
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.5))
    ax.scatter([p[0] for p in points], [p[1] for p in points], marker="*", s=220, c="red",
               edgecolors="white", linewidths=0.8, zorder=3)
    ax.scatter([px], [py], marker="o", s=260, facecolors="none", edgecolors="white", linewidths=1.2, zorder=4)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return points


def save_heatmap(
    image: Image.Image,
    heat: Tensor,
    out: str | Path,
    *,
    title: str | None = None,
    k: int = TOP_K,
    boxes: Sequence[Sequence[float]] = (),
    box_format: str = "xyxy",
    alpha: float = 0.5,
    dpi: int = 150,
) -> list[tuple[int, int]]:
    """Write one heatmap figure to `out` (PNG/PDF/... by suffix); return the starred points."""
    plt = _pyplot()
    w, h = image.size
    fig, ax = plt.subplots(figsize=(4.0 * w / max(w, h), 4.0 * h / max(w, h)))
    points = draw_heatmap(ax, image, heat, title=title, k=k, boxes=boxes, box_format=box_format, alpha=alpha)
    _save(fig, out, dpi)
    return points


def save_heatmap_grid(
    rows: Sequence[tuple[Image.Image, str, Sequence[Tensor], Sequence[Sequence[float]]]],
    column_titles: Sequence[str],
    out: str | Path,
    *,
    dpi: int = 120,
) -> None:
    """Side-by-side comparison: one row per (image, text, [map per column], boxes), one column
    per model, so several models' maps of the same query sit next to each other."""
    plt = _pyplot()
    n_rows, n_cols = len(rows), len(column_titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.8 * n_rows), squeeze=False)
    for r, (image, text, heats, boxes) in enumerate(rows):
        for c, heat in enumerate(heats):
            title = textwrap.fill(text, 30)
            draw_heatmap(axes[r][c], image, heat, title=f"{column_titles[c]}\n{title}" if r == 0 else title,
                         boxes=boxes)
    _save(fig, out, dpi)


def _save(fig, out: str | Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
