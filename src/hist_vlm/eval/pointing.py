"""The pointing game (single objects) and multi-object metrics (composite "A and B" queries).

The pointing game follows SelfEQ's evaluation exactly (docs/reference_code.md, "The pointing game"): the raw
[gh, gw] GradCAM map is upsampled bicubically (align_corners=False) to the ORIGINAL image size,
the point is the first maximum in row-major order (smallest y, then smallest x; an all-zero map
points at (0, 0)), and a hit needs the point STRICTLY inside a box (a point on an edge misses).
RefCOCO+ / ReferIt boxes are [x, y, w, h]; Flickr30k Entities and the synthetic world use
[x1, y1, x2, y2] and a phrase hits when any of its boxes contains the point.

Multi-object metrics (the paper's complex referring segmentation, section 4.2):
- top-k points: the k highest cells of the RAW [gh, gw] map (ties: row-major order), each mapped
  to the integer pixel at the centre of its cell in the original image,
  x = floor((col + 0.5) * W / gw), y = floor((row + 0.5) * H / gh). This is the paper's "top 4
  patches of the P x P heatmap, scaled to the original image"; k = 4.
- both-hit: every referred object's box strictly contains at least one of the k points.
- region IoU: the paper prompts SAM with the k points; here ground-truth object masks stand in
  for SAM's output. The predicted region is the union of the masks of all objects of the image
  (referred or not) that contain a point; points on the background select nothing. The target is
  the union of the referred objects' masks. cIoU (cumulative IoU, the referring-segmentation
  convention) is sum(intersections) / sum(unions) over all queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BoxFormat = Literal["xywh", "xyxy"]
Box = Sequence[float]
TOP_K = 4


def upsample_map(heat: Tensor, size: tuple[int, int]) -> Tensor:
    """Raw map [gh, gw] (or [N, gh, gw]) -> [H, W] (or [N, H, W]), bicubic, align_corners=False."""
    squeeze = heat.dim() == 2
    x = heat.float().reshape(-1, 1, *heat.shape[-2:])  # [N, 1, gh, gw]
    up = F.interpolate(x, size=size, mode="bicubic", align_corners=False)[:, 0]  # [N, H, W]
    return up[0] if squeeze else up


def argmax_points(maps: Tensor) -> Tensor:
    """[N, H, W] -> [N, 2] integer (x, y) of the first maximum in row-major order."""
    flat = maps.reshape(maps.shape[0], -1).nan_to_num(nan=float("-inf"))  # [N, H*W]
    # the first index equal to the max, as SelfEQ's `(m == m.max()).nonzero()[0]`; argmax alone
    # does not promise the first of several maxima on every device
    idx = _first_true(flat == flat.max(dim=1, keepdim=True).values)  # [N]
    w = maps.shape[-1]
    return torch.stack([idx % w, idx // w], dim=1)


def _first_true(mask: Tensor) -> Tensor:
    """Index of the first True per row of a [N, M] bool tensor (M if none)."""
    m = mask.shape[1]
    pos = torch.arange(m, device=mask.device).expand_as(mask)
    return torch.where(mask, pos, torch.full_like(pos, m)).min(dim=1).values


def pointing_point(heat: Tensor, size: tuple[int, int]) -> tuple[int, int]:
    """The pointing-game point (x, y) of one raw map [gh, gw] on an image of size (H, W)."""
    x, y = argmax_points(upsample_map(heat, size)[None])[0].tolist()
    return int(x), int(y)


def pointing_points(maps: Tensor, sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Points for N raw maps [N, gh, gw] on images of sizes [(H, W)] * N; maps of images of the
    same size are upsampled together."""
    out: list[tuple[int, int] | None] = [None] * len(sizes)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        by_size.setdefault((int(s[0]), int(s[1])), []).append(i)
    for size, idx in by_size.items():
        pts = argmax_points(upsample_map(maps[idx], size)).tolist()
        for i, (x, y) in zip(idx, pts):
            out[i] = (int(x), int(y))
    return out  # type: ignore[return-value]


def to_xyxy(box: Box, fmt: BoxFormat) -> tuple[float, float, float, float]:
    if fmt == "xywh":
        x, y, w, h = box
        return (x, y, x + w, y + h)
    if fmt == "xyxy":
        x1, y1, x2, y2 = box
        return (x1, y1, x2, y2)
    raise ValueError(f"unknown box format {fmt!r} (expected 'xywh' or 'xyxy')")


def in_box(point: tuple[float, float], box: Box, fmt: BoxFormat) -> bool:
    """Strict inclusion: a point on an edge is outside."""
    x, y = point
    x1, y1, x2, y2 = to_xyxy(box, fmt)
    return x1 < x < x2 and y1 < y < y2


def pointing_hit(point: tuple[float, float], boxes: Iterable[Box], fmt: BoxFormat) -> bool:
    """A hit when any box strictly contains the point (RefCOCO+/ReferIt have exactly one box)."""
    return any(in_box(point, b, fmt) for b in boxes)


def top_k_points(heat: Tensor, size: tuple[int, int], k: int = TOP_K) -> list[tuple[int, int]]:
    """The k highest cells of a raw map [gh, gw] (ties in row-major order) as integer pixel
    centres (x, y) in an image of size (H, W)."""
    gh, gw = heat.shape[-2:]
    h, w = size
    flat = heat.detach().float().reshape(-1).cpu()
    order = torch.argsort(-flat, stable=True)[:k].tolist()
    return [(int((j % gw + 0.5) * w / gw), int((j // gw + 0.5) * h / gh)) for j in order]


def all_objects_hit(points: Sequence[tuple[int, int]], boxes: Sequence[Box], fmt: BoxFormat) -> bool:
    """Every box strictly contains at least one point."""
    return all(any(in_box(p, b, fmt) for p in points) for b in boxes)


def picked_region(points: Sequence[tuple[int, int]], id_mask: np.ndarray) -> np.ndarray:
    """Union of the masks of the objects (ids > 0 in an [H, W] id mask) under the points."""
    ids = {int(id_mask[y, x]) for x, y in points if 0 <= y < id_mask.shape[0] and 0 <= x < id_mask.shape[1]}
    ids.discard(0)
    return np.isin(id_mask, sorted(ids))


def region_iou_parts(
    points: Sequence[tuple[int, int]], id_mask: np.ndarray, target_ids: Sequence[int]
) -> tuple[int, int]:
    """(intersection, union) pixel counts between the picked region and the referred objects."""
    pred = picked_region(points, id_mask)
    target = np.isin(id_mask, list(target_ids))
    return int((pred & target).sum()), int((pred | target).sum())


@dataclass
class Accuracy:
    """A running share of hits."""

    hits: int = 0
    total: int = 0

    def add(self, hit: bool) -> None:
        self.hits += int(hit)
        self.total += 1

    @property
    def value(self) -> float:
        return self.hits / self.total if self.total else float("nan")


@dataclass
class IoUMeter:
    """Mean IoU over queries and cumulative IoU (sum of intersections / sum of unions)."""

    inter: int = 0
    union: int = 0
    iou_sum: float = 0.0
    count: int = 0

    def add(self, inter: int, union: int) -> None:
        self.inter += inter
        self.union += union
        self.iou_sum += inter / union if union else 0.0
        self.count += 1

    @property
    def ciou(self) -> float:
        return self.inter / self.union if self.union else float("nan")

    @property
    def miou(self) -> float:
        return self.iou_sum / self.count if self.count else float("nan")
