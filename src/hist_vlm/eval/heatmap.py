"""Heatmap figures, as the paper's Figure 3: the GradCAM map over the image, with the top-4
points (the multi-object prompt points, eval.pointing.top_k_points) as enlarged red stars.

matplotlib runs on the Agg backend (no display needed).
"""
from __future__ import annotations

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
    """Write the figure to `out` (PNG/PDF/... by suffix) and return the starred points (x, y).

    The map is drawn at the image's own size; `boxes` (ground truth, optional) are outlined in
    green; the pointing-game point is the ring-marked star.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image = image.convert("RGB")
    w, h = image.size
    points = top_k_points(heat, (h, w), k)
    px, py = pointing_point(heat, (h, w))
    fig, ax = plt.subplots(figsize=(4.0 * w / max(w, h), 4.0 * h / max(w, h)))
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return points
