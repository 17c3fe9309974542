"""Grounding evaluation: records -> heatmaps -> pointing game and multi-object metrics.

The runner knows nothing about backbones: it asks a `MapSource` to preprocess images (in
DataLoader workers) and to turn a batch of (images, texts) into raw [gh, gw] maps. Each batch
loads and encodes every distinct image once; texts point at them through `image_index`, as in
training. `GradcamMaps` is the MapSource of a VisionLanguageBackbone (ITM GradCAM, the
"reference" token recipe of ALBEF's Grounding.py).

Per query the runner records the pointing-game point and hit (any box, strict inclusion, see
eval.pointing), and for composite queries ("A and B") the top-4 points, whether they hit both
objects, and (with an id mask) the IoU parts of the picked region.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from hist_vlm._io import atomic_file
from hist_vlm.data.grounding import GroundingRecord
from hist_vlm.data.images import ImageError, open_rgb
from hist_vlm.eval.pointing import (
    Accuracy,
    IoUMeter,
    all_objects_hit,
    pointing_hit,
    pointing_points,
    region_iou_parts,
    top_k_points,
)


class MapSource(Protocol):
    """What the runner needs from a model."""

    def preprocess(self, image: Image.Image) -> Tensor:
        """An RGB image at its original size -> network input [3, H, W] (runs in workers)."""
        ...

    def __call__(self, pixel_values: Tensor, texts: list[str], image_index: Tensor) -> Tensor:
        """pixel_values [B, 3, H, W], texts [N], image_index [N] -> raw maps [N, gh, gw]."""
        ...


# ----------------------------------------------------------------------------- the model side

def text_length_limit(model, max_length: int) -> int:
    """`max_length` tokens, or fewer when the model's position table is shorter."""
    return min(max_length, model.max_text_length)


def eval_transform(model):
    """The evaluation preprocessing of a backbone: PIL RGB image -> [3, S, S] float tensor,
    resized to the model's resolution with bicubic interpolation (no crop, as ALBEF's test
    transform) and normalised with the CLIP statistics that ALBEF and BLIP use. A plain
    transform object, not a method: DataLoader workers receive it without the model."""
    from torchvision.transforms import v2

    from hist_vlm.data.dataset import IMAGE_MEAN, IMAGE_STD

    size = model.image_size
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGE_MEAN, IMAGE_STD),
    ])


class GradcamMaps:
    """ITM GradCAM maps of a backbone (hist_vlm.losses.gradcam, recipe "reference").

    `layers` are 0-based cross-attention layers (None: the backbone's `default_capture_layers`);
    several are combined with `combine`, `head` picks one head (None: the head mean).

    Images are resized to the model's resolution with bicubic interpolation (no crop) and
    normalised with the CLIP statistics that ALBEF and BLIP use.
    """

    def __init__(
        self,
        model,
        *,
        layers: Sequence[int] | None = None,
        head: int | None = None,
        combine: str = "mean",
        device: str | torch.device = "cpu",
        max_length: int = 64,
    ):
        layers = layers or model.default_capture_layers
        self.model = model.to(device).eval()
        self.layers, self.head, self.combine = tuple(layers), head, combine
        # eval texts are not truncated to the training length (ALBEF's Grounding.py pads to the
        # longest); the position table bounds them
        self.device = torch.device(device)
        self.max_length = text_length_limit(model, max_length)
        self.preprocess = eval_transform(model)

    def encode(self, pixel_values: Tensor, texts: list[str], image_index: Tensor):
        """(image_embeds [B, 1+P, Dv], TextRows) on the device: each image encoded once."""
        from hist_vlm.batch import TextRows

        ids, mask = self.model.tokenize(texts, max_length=self.max_length)
        rows = TextRows(ids, mask, image_index).to(self.device)
        with torch.no_grad():
            image_embeds = self.model.encode_image(pixel_values.to(self.device))  # [B, 1+P, Dv]
        return image_embeds, rows

    def __call__(self, pixel_values: Tensor, texts: list[str], image_index: Tensor) -> Tensor:
        from hist_vlm.losses.gradcam import gradcam_maps

        image_embeds, rows = self.encode(pixel_values, texts, image_index)
        return gradcam_maps(
            self.model, image_embeds, rows, layers=self.layers, head=self.head,
            combine=self.combine, recipe="reference", create_graph=False,
        )


# ----------------------------------------------------------------------------- results

@dataclass
class ItemResult:
    id: str
    split: str
    kind: str
    text: str
    point: tuple[int, int]                   # pointing-game (x, y) in original pixels
    hit: bool                                # point strictly inside any referred box
    top_points: list[tuple[int, int]] = field(default_factory=list)  # composite queries only
    all_hit: bool | None = None              # top-4 points hit every referred object
    inter: int | None = None                 # picked-region IoU parts (with an id mask)
    union: int | None = None


@dataclass
class SplitMetrics:
    pointing: Accuracy = field(default_factory=Accuracy)            # single queries
    composite_pointing: Accuracy = field(default_factory=Accuracy)  # composite, any-box
    both_hit: Accuracy = field(default_factory=Accuracy)            # composite, top-4 on each object
    iou: IoUMeter = field(default_factory=IoUMeter)                 # composite with masks

    def add(self, r: ItemResult) -> None:
        if r.kind == "composite":
            self.composite_pointing.add(r.hit)
            self.both_hit.add(bool(r.all_hit))
            if r.inter is not None:
                self.iou.add(r.inter, r.union or 0)
        else:
            self.pointing.add(r.hit)

    def as_dict(self) -> dict:
        out = {"pointing": self.pointing.value, "n": self.pointing.total}
        if self.composite_pointing.total:
            out.update(composite_pointing=self.composite_pointing.value, both_hit=self.both_hit.value,
                       n_composite=self.composite_pointing.total)
        if self.iou.count:
            out.update(ciou=self.iou.ciou, miou=self.iou.miou)
        return out


@dataclass
class EvalReport:
    splits: dict[str, SplitMetrics]

    def summary(self) -> dict[str, dict]:
        out = {s: m.as_dict() for s, m in sorted(self.splits.items())}
        if "testA" in out and "testB" in out:  # RefCOCO+'s headline number (SelfEQ)
            out["mean(testA,testB)"] = {"pointing": (out["testA"]["pointing"] + out["testB"]["pointing"]) / 2}
        return out

    def lines(self) -> list[str]:
        """One human-readable line per split."""
        rows = []
        for split, m in self.summary().items():
            parts = [f"{split:>16}: pointing {format_pct(m['pointing'])}" + (f" (n={m['n']})" if "n" in m else "")]
            if "both_hit" in m:
                parts.append(f"composite: any {format_pct(m['composite_pointing'])} both {format_pct(m['both_hit'])}"
                             f" (n={m['n_composite']})")
            if "ciou" in m:
                parts.append(f"cIoU {format_pct(m['ciou'])} mIoU {format_pct(m['miou'])}")
            rows.append("  ".join(parts))
        return rows


def format_pct(x: float) -> str:
    """A share as a 5.1f percentage; nan (nothing counted) as n/a."""
    return "  n/a" if math.isnan(x) else f"{100 * x:5.1f}%"


# ----------------------------------------------------------------------------- the loop

class _Batches(torch.utils.data.Dataset):
    """Batch b = records [b*bs, (b+1)*bs): distinct images loaded and preprocessed once."""

    def __init__(self, records: Sequence[GroundingRecord], batch_size: int, preprocess):
        self.records, self.bs, self.preprocess = records, batch_size, preprocess

    def __len__(self) -> int:
        return math.ceil(len(self.records) / self.bs)

    def __getitem__(self, b: int):
        recs = self.records[b * self.bs:(b + 1) * self.bs]
        images, index = distinct_images(recs)
        pixels = torch.stack([self.preprocess(im) for im in images])
        return list(range(b * self.bs, b * self.bs + len(recs))), pixels, torch.tensor(index, dtype=torch.long)


def distinct_images(recs: Sequence[GroundingRecord]) -> tuple[list[Image.Image], list[int]]:
    """The distinct images of some records, each opened once (RGB, `open_rgb`: 16-bit scaled, an
    unreadable file one ImageError line naming it), and each record's index into them."""
    slot: dict[Path, int] = {}
    for r in recs:
        slot.setdefault(r.image, len(slot))
    images = [open_rgb(path) for path in slot]
    return images, [slot[r.image] for r in recs]


def query_mask(rec: GroundingRecord) -> np.ndarray | None:
    """The object-id mask [H, W] a composite query's region IoU needs (None: not scored); its
    values as stored (ids, not colours). An unreadable mask is one ImageError line naming it."""
    if rec.kind != "composite" or rec.mask is None or not rec.object_ids:
        return None
    try:
        with Image.open(rec.mask) as m:
            ids = np.asarray(m)
    except (OSError, ValueError, SyntaxError) as e:  # not an image, truncated, empty (SyntaxError: bad headers)
        raise ImageError(f"{rec.mask}: not a readable mask image ({' '.join(str(e).split()) or type(e).__name__})") from None
    if ids.ndim != 2 or ids.shape != (rec.height, rec.width):
        raise ImageError(f"{rec.mask}: the id mask of query {rec.id} is {'x'.join(map(str, ids.shape[::-1]))}, "
                         f"not a single channel of its image's {rec.width}x{rec.height}")
    return ids


def score_query(rec: GroundingRecord, heat: Tensor, point: tuple[int, int], ids: np.ndarray | None) -> ItemResult:
    """One query's result from its raw map [gh, gw], its pointing point and its `query_mask`."""
    res = ItemResult(rec.id, rec.split, rec.kind, rec.text, point, pointing_hit(point, rec.boxes, rec.box_format))
    if rec.kind == "composite":
        pts = top_k_points(heat, (rec.height, rec.width))
        res.top_points = pts
        res.all_hit = all_objects_hit(pts, rec.boxes, rec.box_format)
        if ids is not None:
            res.inter, res.union = region_iou_parts(pts, ids, rec.object_ids)
    return res


class EvalInputError(ValueError):
    """Records that cannot be evaluated (none, an empty query); one line."""


def check_records(records: Sequence[GroundingRecord]) -> None:
    """There are records, every query has a text and every image exists: checked before any
    model work, not met as a worker traceback halfway through (an empty text would be scored
    as a map of nothing)."""
    if not records:
        raise EvalInputError("no grounding records to evaluate")
    empty = [r for r in records if not r.text.strip()]
    if empty:
        raise EvalInputError(f"query {empty[0].id} (image {empty[0].image}) has an empty text: nothing to ground "
                             f"({len(empty)} empty queries; remove them from the data)")
    missing = [p for p in dict.fromkeys(r.image for r in records) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: image not found ({len(missing)} images missing)")


def map_batches(records: Sequence[GroundingRecord], source: MapSource, *, batch_size: int, num_workers: int,
                progress: bool, desc: str):
    """Yield (records, raw maps of `source`, detached float) per batch of `batch_size` records,
    images loaded and preprocessed in `num_workers` DataLoader workers, with a progress bar."""
    loader = torch.utils.data.DataLoader(
        _Batches(records, batch_size, source.preprocess), batch_size=None, num_workers=num_workers,
    )
    with tqdm(total=len(records), desc=desc, unit="query", disable=not progress) as bar:
        try:
            for idx, pixels, image_index in loader:
                recs = [records[i] for i in idx]
                yield recs, source(pixels, [r.text for r in recs], image_index).detach().float()
                bar.update(len(recs))
        except BaseException:
            bar.leave = False   # an error, an interrupt: its one line, not a stale bar, is what stays on the terminal
            raise


@contextlib.contextmanager
def jsonl_sink(out: str | Path | None):
    """A `write(dict)` that appends JSON lines to `out` (a no-op without `out`): streamed to a
    temp beside `out` as the evaluation goes, renamed onto `out` when it ends, so a failed or
    interrupted run leaves the previous `out` intact."""
    if out is None:
        yield lambda row: None
        return
    with atomic_file(out, "w") as f:
        yield lambda row: f.write(json.dumps(row) + "\n")


def evaluate(
    records: Sequence[GroundingRecord],
    source: MapSource,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
) -> EvalReport:
    """Score every record; with `out`, write one JSON line of `ItemResult` per record."""
    check_records(records)
    splits: dict[str, SplitMetrics] = defaultdict(SplitMetrics)
    with jsonl_sink(out) as write:
        for recs, maps in map_batches(records, source, batch_size=batch_size, num_workers=num_workers,
                                      progress=progress, desc="grounding eval"):  # maps [N, gh, gw]
            # upsampling + argmax where the maps are (the GPU in SelfEQ's scripts too)
            points = pointing_points(maps, [(r.height, r.width) for r in recs])
            for rec, heat, point in zip(recs, maps.cpu(), points):
                res = score_query(rec, heat, point, query_mask(rec))
                splits[rec.split].add(res)
                write(asdict(res))
    return EvalReport(dict(splits))
