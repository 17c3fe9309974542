"""The layer/head study (paper Table 7): the pointing game of many GradCAM settings in ONE
pass over the data.

A setting is one cross-attention layer, or a combination of several (the mean or the
element-wise product of their maps, as `gradcam_maps(combine=...)`), read from one head or
from the head mean. Per batch the images are encoded once, ONE fusion pass captures every layer
the grid names, and ONE gradient call gives every layer's every head's map
(`gradcam_head_maps`); the head means and the combinations are means and products of those
maps. So a grid of a few hundred settings costs one GradCAM pass per batch plus the upsampling
and argmax of each setting's maps, instead of a full evaluation per setting.

Layers and heads are 0-based, as `--layer` / `--head`: the paper counts from 1 (its L9H10 is
layer 8, head 9 here).
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from hist_vlm._io import atomic_write_text
from hist_vlm.data.grounding import GroundingRecord
from hist_vlm.eval.pointing import argmax_points, upsample_map
from hist_vlm.eval.grounding import (
    EvalReport,
    GradcamMaps,
    SplitMetrics,
    check_records,
    format_pct,
    jsonl_sink,
    map_batches,
    query_mask,
    score_query,
)
from hist_vlm.losses.gradcam import COMBINES, gradcam_head_maps

#: the default grid: every layer, the head mean and every head, and both combinations of
#: each pair of neighbouring layers
DEFAULT_LAYERS, DEFAULT_HEADS, DEFAULT_COMBINE, DEFAULT_PAIRS = "all", "all", "mean,product", "adjacent"
#: upsampled pixels held at once while pointing (bounds the memory of many settings x a large image)
_UPSAMPLE_BUDGET = 1 << 25


@dataclass(frozen=True)
class Setting:
    """One GradCAM setting of the sweep."""

    layers: tuple[int, ...]  # one layer, or the layers combined
    head: int | None         # None = head mean
    combine: str = "mean"    # how several layers' maps combine: "mean" | "product"

    @property
    def row(self) -> str:
        """The table row: "L8", "mean(L7,L8)", "product(L7,L8)"."""
        if len(self.layers) == 1:
            return f"L{self.layers[0]}"
        return f"{self.combine}({','.join(f'L{x}' for x in self.layers)})"

    @property
    def column(self) -> str:
        """The table column: "mean" (head mean) or "H3"."""
        return "mean" if self.head is None else f"H{self.head}"

    @property
    def label(self) -> str:
        return f"{self.row} {self.column}"


def _ints(text: str, what: str) -> list[int]:
    """ "3", "1,4", "2-5" (inclusive) -> ints; anything else is a one-line error."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            values = list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            values = []
        if not values:
            raise ValueError(f"sweep {what} {text!r}: {part!r} is not a number or a range like 2-5")
        out.extend(values)
    return out


def _in_range(values: Sequence[int], n: int, what: str) -> None:
    bad = [x for x in values if not 0 <= x < n]
    if bad:
        raise ValueError(f"sweep {what} {bad[0]} out of range: the model has {n} ({what}s 0-{n - 1})")


def build_grid(
    n_layers: int,
    n_heads: int,
    *,
    layers: str | None = None,
    heads: str | None = None,
    combine: str | None = None,
    pairs: str | None = None,
) -> list[Setting]:
    """The settings of a sweep, single layers first, then combinations (each in head order).

    layers   "all" (default) or a list/range of 0-based layers: "6,7,8", "6-8"
    heads    "all" (default: the head mean and each head) or a list of "mean" and heads: "mean,9"
    combine  "mean,product" (default), "mean", "product", or "none" (single layers only)
    pairs    which layers are combined: "adjacent" (default: neighbours in `layers`), "all"
             (every pair of `layers`), or explicit groups "7+8,6+8" (also "6+7+8")
    """
    layer_list = list(range(n_layers)) if (layers or DEFAULT_LAYERS) == "all" else _ints(layers, "layers")
    _in_range(layer_list, n_layers, "layer")
    layer_list = sorted(set(layer_list))
    head_items = [h.strip() for h in (heads or DEFAULT_HEADS).split(",")]
    if head_items == ["all"]:
        head_list: list[int | None] = [None, *range(n_heads)]
    else:
        head_list = []
        for h in head_items:
            head_list.extend([None] if h == "mean" else _ints(h, "heads"))
        _in_range([h for h in head_list if h is not None], n_heads, "head")
        head_list = list(dict.fromkeys(head_list))
    combines = [c.strip() for c in (combine or DEFAULT_COMBINE).split(",")]
    if combines == ["none"]:
        combines = []
    unknown = [c for c in combines if c not in COMBINES]
    if unknown:
        raise ValueError(f"sweep combine {unknown[0]!r}: choose from {', '.join(COMBINES)} or none")
    groups = _groups(pairs or DEFAULT_PAIRS, layer_list, n_layers) if combines else []
    settings = [Setting((x,), h) for x in layer_list for h in head_list]
    settings += [Setting(g, h, c) for g in groups for c in dict.fromkeys(combines) for h in head_list]
    return settings


def _groups(pairs: str, layers: list[int], n_layers: int) -> list[tuple[int, ...]]:
    if pairs == "adjacent":
        return list(zip(layers, layers[1:]))
    if pairs == "all":
        return [(a, b) for i, a in enumerate(layers) for b in layers[i + 1:]]
    groups = []
    for part in pairs.split(","):
        group = tuple(sorted(_ints(part.replace("+", ","), "pairs")))  # mean and product commute
        if len(group) < 2 or len(set(group)) != len(group):
            raise ValueError(f"sweep pairs {part!r}: name two or more different layers joined by +, e.g. 7+8")
        _in_range(group, n_layers, "layer")
        groups.append(group)
    return list(dict.fromkeys(groups))


class GradcamSweep(GradcamMaps):
    """A map source that returns every setting's map at once: [N, S, gh, gw], S = len(settings).
    Same preprocessing, tokenization and token recipe ("reference") as `GradcamMaps`."""

    def __init__(self, model, settings: Sequence[Setting], *, device: str | torch.device = "cpu",
                 max_length: int = 64):
        if not settings:
            raise ValueError("the sweep grid is empty")
        self.settings = tuple(settings)
        capture = sorted({x for s in self.settings for x in s.layers})
        super().__init__(model, layers=capture, device=device, max_length=max_length)
        self._slot = {x: i for i, x in enumerate(self.layers)}

    def __call__(self, pixel_values: Tensor, texts: list[str], image_index: Tensor) -> Tensor:
        image_embeds, rows = self.encode(pixel_values, texts, image_index)
        per_head = gradcam_head_maps(self.model, image_embeds, rows, layers=self.layers, recipe="reference")
        table = torch.cat([per_head.mean(2, keepdim=True), per_head], 2)  # [N, L, 1+heads, gh, gw]: 0 = mean
        maps = []
        for s in self.settings:
            col = 0 if s.head is None else s.head + 1
            parts = torch.stack([table[:, self._slot[x], col] for x in s.layers])  # [k, N, gh, gw]
            maps.append(parts.mean(0) if s.combine == "mean" else parts.prod(0))  # as gradcam_maps
        return torch.stack(maps, 1)  # [N, S, gh, gw]


def _setting_points(maps: Tensor, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Pointing points of one query's S raw maps [S, gh, gw] on its (H, W) image, upsampled a
    chunk at a time (`pointing_points`'s recipe, per map)."""
    chunk = max(1, _UPSAMPLE_BUDGET // (size[0] * size[1]))
    pts = [argmax_points(upsample_map(maps[i:i + chunk], size)) for i in range(0, maps.shape[0], chunk)]
    return [(int(x), int(y)) for x, y in torch.cat(pts).tolist()]


@dataclass
class SweepReport:
    """One `EvalReport` per setting, in grid order."""

    settings: tuple[Setting, ...]
    reports: tuple[EvalReport, ...]

    def rows(self) -> list[dict]:
        """One flat dict per setting: setting, row, column, layers, head, combine, then
        `<split>.<metric>` for every split and metric of `EvalReport.summary`."""
        out = []
        for s, rep in zip(self.settings, self.reports):
            row = {"setting": s.label, "row": s.row, "column": s.column,
                   "layers": "+".join(map(str, s.layers)), "head": "mean" if s.head is None else s.head,
                   "combine": s.combine if len(s.layers) > 1 else ""}
            for split, metrics in rep.summary().items():
                row.update({f"{split}.{k}": v for k, v in metrics.items()})
            out.append(row)
        return out

    def write_csv(self, path: str | Path, **meta: str) -> None:
        """The rows as CSV (atomically), `meta` (checkpoint, data, ...) as leading columns, so
        the CSVs of several checkpoints concatenate into Table 7's train x eval layout."""
        rows = [{**meta, **r} for r in self.rows()]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())

    def lines(self) -> list[str]:
        """Table 7's eval axis, one block per split and headline metric (single-object pointing;
        composite both-hit where there are composite queries): a row per layer or combination,
        a column per head choice, then the best setting."""
        lines: list[str] = []
        summaries = [rep.summary() for rep in self.reports]
        rows = list(dict.fromkeys(s.row for s in self.settings))
        columns = list(dict.fromkeys(s.column for s in self.settings))
        width = max(len(r) for r in rows)
        lines.append(f"layer/head sweep, {len(self.settings)} settings: a row per layer or layer combination, "
                     "a column per head (mean = head mean); 0-based, as --layer/--head")
        for split in summaries[0]:
            for metric in ("pointing", "both_hit"):
                if metric not in summaries[0][split]:
                    continue
                cell = {(s.row, s.column): summ[split][metric] for s, summ in zip(self.settings, summaries)}
                n = summaries[0][split].get("n" if metric == "pointing" else "n_composite")
                lines.append(f"{split} {metric}" + (f" (n={n})" if n is not None else ""))
                lines.append(" " * width + "".join(f"{c:>8}" for c in columns))
                for r in rows:
                    vals = (cell.get((r, c)) for c in columns)
                    lines.append(f"{r:<{width}}" + "".join("       -" if v is None else f"{format_pct(v):>8}" for v in vals))
                best = max(cell.items(), key=lambda kv: -math.inf if math.isnan(kv[1]) else kv[1])
                lines.append(f"best: {best[0][0]} {best[0][1]} {format_pct(best[1]).strip()}")
        return lines


def evaluate_sweep(
    records: Sequence[GroundingRecord],
    source: GradcamSweep,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
) -> SweepReport:
    """Score every record under every setting of `source` in one pass over the data; with
    `out`, one JSON line per (record, setting): the `ItemResult` plus its "setting" label."""
    check_records(records)
    metrics = [defaultdict(SplitMetrics) for _ in source.settings]
    with jsonl_sink(out) as write:
        for recs, maps in map_batches(records, source, batch_size=batch_size, num_workers=num_workers,
                                      progress=progress, desc="layer/head sweep"):  # maps [N, S, gh, gw]
            for rec, per_query, heat in zip(recs, maps, maps.cpu()):
                ids = query_mask(rec)
                points = _setting_points(per_query, (rec.height, rec.width))
                for s, splits, h, point in zip(source.settings, metrics, heat, points):
                    res = score_query(rec, h, point, ids)
                    splits[rec.split].add(res)
                    write({"setting": s.label, **asdict(res)})
    return SweepReport(source.settings, tuple(EvalReport(dict(m)) for m in metrics))
