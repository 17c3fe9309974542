"""Heatmap figures, as the paper's Figure 3: the GradCAM map over the image, with the top-4
points (the multi-object prompt points, eval.pointing.top_k_points) as enlarged red stars.

The map is blended pixel by pixel with an opacity that grows with its value (as LAVIS's
`getAttMap`, https://github.com/salesforce/LAVIS/blob/main/lavis/common/gradcam.py): where the
model does not look, the image shows untouched, so the colours a query names stay visible.
Figures can also show the untouched image beside the overlay.

matplotlib runs on the Agg backend (no display needed).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torch import Tensor

from hist_vlm._io import atomic_path
from hist_vlm.eval.pointing import TOP_K, pointing_point, to_xyxy, top_k_points, upsample_map


#: a panel title's most lines (of `width` characters): a long text is cut there with an ellipsis,
#: so the figure keeps its size whatever the query (bbox_inches="tight" grows to fit a title)
TITLE_LINES = 3


def fit_title(text: str, width: int = 48, max_lines: int = TITLE_LINES) -> str:
    """`text` wrapped at `width` characters (a longer word is broken) into at most `max_lines`
    lines, the last ending in " …" when something was cut."""
    return textwrap.fill(" ".join(text.split()), width, max_lines=max_lines, placeholder=" …")


def display_map(heat: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Raw map [gh, gw] -> [H, W] in [0, 1] for display: bicubic upsampling clipped to the raw
    map's range (bicubic rings below a lone peak: unclipped, the zero background would become
    a faint positive tint everywhere), then min-max."""
    raw = heat.detach().float().cpu()
    up = upsample_map(raw, size).clamp(float(raw.min()), float(raw.max())).numpy()
    lo, hi = float(up.min()), float(up.max())
    return (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)


#: opacity = alpha * map ** BLEND_GAMMA: LAVIS's exponent, which lifts the middle of the map
BLEND_GAMMA = 0.7


def blend_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = 0.8, cmap: str = "jet") -> np.ndarray:
    """image [H, W, 3] uint8 + display map [H, W] in [0, 1] -> blended [H, W, 3] uint8.

    Each pixel mixes the image with the colour map's colour with opacity `alpha * m**0.7`:
    a zero map leaves the pixel exactly as it was, the peak is `alpha` opaque.
    """
    import matplotlib

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    m = np.clip(np.asarray(heat, dtype=np.float64), 0.0, 1.0)
    colours = matplotlib.colormaps[cmap](m)[..., :3] * 255.0             # [H, W, 3]
    opacity = (alpha * m**BLEND_GAMMA)[..., None]                         # [H, W, 1]
    out = (1.0 - opacity) * np.asarray(image, dtype=np.float64)[..., :3] + opacity * colours
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
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
    alpha: float = 0.8,
) -> list[tuple[int, int]]:
    """Draw the map over the image on a matplotlib axis; return the starred points (x, y).

    The map is blended at the image's own size (`blend_heatmap`, peak opacity `alpha`);
    `boxes` (ground truth, optional) are outlined in green; the pointing-game point is the
    ring-marked star.
    """
    from matplotlib.patches import Rectangle

    image = image.convert("RGB")
    w, h = image.size
    points = top_k_points(heat, (h, w), k)
    px, py = pointing_point(heat, (h, w))
    ax.imshow(blend_heatmap(np.asarray(image), display_map(heat, (h, w)), alpha))
    for b in boxes:
        x1, y1, x2, y2 = to_xyxy(b, box_format)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.5))
    ax.scatter([p[0] for p in points], [p[1] for p in points], marker="*", s=220, c="red",
               edgecolors="white", linewidths=0.8, zorder=3)
    ax.scatter([px], [py], marker="o", s=260, facecolors="none", edgecolors="white", linewidths=1.2, zorder=4)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return points


def draw_image(ax, image: Image.Image, *, title: str | None = None) -> None:
    """The untouched image (no map, no marks), for a column beside the overlays."""
    ax.imshow(image.convert("RGB"))
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def save_heatmap(
    image: Image.Image,
    heat: Tensor,
    out: str | Path,
    *,
    title: str | None = None,
    k: int = TOP_K,
    boxes: Sequence[Sequence[float]] = (),
    box_format: str = "xyxy",
    alpha: float = 0.8,
    dpi: int = 150,
    show_image: bool = False,
) -> list[tuple[int, int]]:
    """Write one heatmap figure to `out` (PNG/PDF/... by suffix); return the starred points.
    `show_image`: the untouched image in a panel left of the overlay. A long `title` is wrapped
    and cut (`fit_title`), so the figure's size does not grow with it."""
    plt = pyplot()
    w, h = image.size
    panels = 2 if show_image else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.0 * panels * w / max(w, h), 4.0 * h / max(w, h)), squeeze=False)
    if show_image:
        draw_image(axes[0][0], image, title="image")
    points = draw_heatmap(axes[0][-1], image, heat, title=fit_title(title) if title else None, k=k, boxes=boxes,
                          box_format=box_format, alpha=alpha)
    save_figure(fig, out, dpi)
    return points


def save_heatmap_grid(
    rows: Sequence[tuple[Image.Image, str, Sequence[Tensor], Sequence[Sequence[float]]]],
    column_titles: Sequence[str],
    out: str | Path,
    *,
    dpi: int = 120,
    image_column: str | None = "image",
    k: int = TOP_K,
    box_format: str = "xyxy",
    alpha: float = 0.8,
) -> list[list[list[tuple[int, int]]]]:
    """Side-by-side comparison: one row per (image, text, [map per model], boxes), one column
    per model (any number), so several models' maps of the same query sit next to each other;
    each overlay has the top-`k` points starred and the boxes drawn. `image_column` (its
    title; None: no such column) puts the untouched image first, so the colours and shapes
    the query names can be seen. Returns the starred points, [row][model] -> [(x, y), ...]."""
    n_models = len(column_titles)
    for r, (_, _, heats, _) in enumerate(rows):
        if len(heats) != n_models:
            raise ValueError(f"row {r} has {len(heats)} maps for {n_models} model columns")
    plt = pyplot()
    lead = 0 if image_column is None else 1
    n_rows, n_cols = len(rows), n_models + lead
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.8 * n_rows), squeeze=False)
    points = []
    for r, (image, text, heats, boxes) in enumerate(rows):
        caption = fit_title(text, 30)
        if lead:
            draw_image(axes[r][0], image, title=f"{image_column}\n{caption}" if r == 0 else caption)
        row_points = []
        for c, heat in enumerate(heats):
            title = f"{column_titles[c]}\n{caption}" if r == 0 else (None if lead else caption)
            row_points.append(draw_heatmap(axes[r][lead + c], image, heat, title=title, k=k, boxes=boxes,
                                           box_format=box_format, alpha=alpha))
        points.append(row_points)
    save_figure(fig, out, dpi)
    return points


def save_figure(fig, out: str | Path, dpi: int) -> None:
    """Rendered beside `out` and renamed into place: never a half-written figure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(out) as tmp:  # the temp keeps `out`'s suffix, which picks the format
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
