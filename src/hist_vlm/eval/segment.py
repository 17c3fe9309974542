"""Complex referring segmentation (paper section 4.2, Table 3): GradCAM top-4 points -> SAM -> cIoU.

Per query, the k = 4 highest cells of the raw [gh, gw] GradCAM map are mapped to pixel centres
of the ORIGINAL image (`eval.pointing.top_k_points`), then into the frame SAM's processor
resized the image to (longest side to its `longest_edge`, aspect kept, padded), and given to
SAM as k positive point prompts of ONE mask. SAM's multimask output is resolved by `multimask`:

  single  multimask_output=False: SAM's single-mask token, which SAM's authors recommend for
          unambiguous prompts such as several points (the default)
  best    multimask_output=True, the mask of the highest predicted IoU score

The mask is SAM's logits upsampled to the original image and thresholded at 0 (SamProcessor's
`post_process_masks`). Metrics (`eval.pointing.IoUMeter`): cIoU = sum of intersections / sum
of unions over the test set (the referring-segmentation convention) and mean per-query IoU.

Batching: the GradCAM maps come in batches of queries (`eval.grounding.map_batches`); SAM encodes
the distinct images of a batch in chunks of `image_batch`, and decodes all the batch's queries
in one mask-decoder pass (each query's image embedding indexed by its image).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from hist_vlm.data.grounding import GroundingRecord
from hist_vlm.eval.pointing import TOP_K, IoUMeter, top_k_points
from hist_vlm.eval.grounding import MapSource, check_records, distinct_images, format_pct, jsonl_sink, map_batches

MULTIMASK = ("single", "best")
DEFAULT_MULTIMASK = "single"

GoldMask = Callable[[GroundingRecord], np.ndarray]  # a record -> its [H, W] bool gold mask


class SamLoadError(ValueError):
    """The SAM folder is missing or holds no SAM model and processor; the message names it."""


def prompt_points(points: Sequence[tuple[int, int]], original_size: Sequence[int],
                  reshaped_size: Sequence[int]) -> Tensor:
    """Points (x, y) in an original image of (H, W) -> [k, 2] float in the (h, w) frame SAM's
    processor resized that image to (the scaling `SamProcessor` applies to `input_points`)."""
    (h0, w0), (h1, w1) = original_size, reshaped_size
    xy = torch.tensor(points, dtype=torch.float32).reshape(-1, 2)  # [k, 2]
    return xy * torch.tensor([w1 / w0, h1 / h0])


def _model_type(folder: Path) -> str | None:
    """The model_type of a save_pretrained folder's config.json (None: none readable)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


class SamSegmenter:
    """SAM (transformers `SamModel` + `SamProcessor`) from a local `save_pretrained` folder
    (e.g. a copy of facebook/sam-vit-huge): point prompts -> one mask per query."""

    def __init__(self, sam_dir: str | Path, *, device: str | torch.device = "cpu",
                 multimask: str = DEFAULT_MULTIMASK, image_batch: int = 4):
        from transformers import SamModel, SamProcessor

        if multimask not in MULTIMASK:
            raise ValueError(f"unknown multimask mode {multimask!r} (choose from {', '.join(MULTIMASK)})")
        folder = Path(sam_dir)
        if not folder.is_dir():
            raise SamLoadError(f"{folder}: SAM folder not found")
        if _model_type(folder) != "sam":
            raise SamLoadError(f"{folder}: holds no SAM model (its config.json must say model_type \"sam\")")
        try:
            self.processor = SamProcessor.from_pretrained(folder)
            self.model = SamModel.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError) as e:
            # transformers' messages run on with hub advice: keep their first sentence
            first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
            raise SamLoadError(f"{folder}: not a loadable SAM model ({first})") from None
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.multimask, self.image_batch = multimask, image_batch

    @torch.no_grad()
    def segment(self, images: Sequence[Image.Image], points: Sequence[Sequence[tuple[int, int]]],
                image_index: Sequence[int]) -> tuple[list[np.ndarray], list[float]]:
        """Distinct RGB images [B] at their original size, per query its k points (x, y) in
        original pixels and its image's index -> per query an [H, W] bool mask and SAM's
        predicted IoU of it."""
        enc = self.processor(images=list(images), return_tensors="pt")
        embeds = torch.cat([
            self.model.get_image_embeddings(chunk.to(self.device))
            for chunk in enc["pixel_values"].split(self.image_batch)
        ])  # [B, C, h', w']
        idx = torch.as_tensor(list(image_index), dtype=torch.long)
        orig, resized = enc["original_sizes"][idx], enc["reshaped_input_sizes"][idx]  # [N, 2] (h, w)
        pts = torch.stack([prompt_points(p, o.tolist(), r.tolist()) for p, o, r in zip(points, orig, resized)])
        out = self.model(
            image_embeddings=embeds[idx.to(self.device)],
            input_points=pts[:, None].to(self.device),  # [N, 1, k, 2]: one mask prompt per query
            input_labels=torch.ones(pts.shape[:2], dtype=torch.long, device=self.device)[:, None],  # [N, 1, k]
            multimask_output=self.multimask == "best",
        )
        scores = out.iou_scores[:, 0]  # [N, M]
        pick = scores.argmax(-1)  # [N]; M = 1 for "single"
        low = out.pred_masks[:, 0][torch.arange(len(pick), device=pick.device), pick]  # [N, h, w] logits
        masks = self.processor.post_process_masks(list(low[:, None, None].float().cpu()), orig, resized)  # N x [1, 1, H, W]
        return ([m[0, 0].numpy() for m in masks],
                scores.gather(-1, pick[:, None])[:, 0].float().cpu().tolist())


# ----------------------------------------------------------------------------- the queries

def load_segment_queries(
    data: str,
    data_root: str | Path,
    *,
    image_root: str | Path | None = None,
    splits: Sequence[str] = (),
    seed: int = 0,
    allow_absolute_paths: bool = False,
) -> tuple[list[GroundingRecord], GoldMask, str]:
    """(records, their gold masks, a line saying what was read) of a segmentation test set.

    refcoco+: the complex pairs (`hist_vlm.data.complex_pairs`) of the REFER files under
    `data_root`, images under `image_root`, splits default testA + testB. synthetic: the world's
    composite queries (`data_root/grounding.jsonl`), gold = the union of the referred objects'
    pixels in the query's id mask. Image and mask paths outside their root are refused unless
    `allow_absolute_paths` (`hist_vlm.data.paths`).
    """
    from hist_vlm.data.complex_pairs import TEST_SPLITS, build_complex_pairs
    from hist_vlm.data.grounding import GroundingFileError, read_synthetic
    from hist_vlm.eval.grounding import query_mask

    root = Path(data_root)
    if not root.is_dir():
        raise GroundingFileError(f"{root}: data root is not a folder")
    if data == "refcoco+":
        if image_root is None:
            raise GroundingFileError("refcoco+ needs the COCO train2014 image folder (--image-root)")
        built = build_complex_pairs(root, image_root, splits=tuple(splits) or TEST_SPLITS, seed=seed,
                                    allow_absolute_paths=allow_absolute_paths)
        by_id = {p.record.id: p for p in built.pairs}
        return [p.record for p in built.pairs], lambda rec: by_id[rec.id].gold_mask(), built.summary()
    if data != "synthetic":
        raise GroundingFileError(f"unknown segmentation data {data!r} (choose refcoco+, synthetic)")
    path = root / "grounding.jsonl"
    records = [r for r in read_synthetic(path, splits or None, allow_absolute_paths=allow_absolute_paths)
               if r.kind == "composite"]
    for r in records:
        if r.mask is None or not r.object_ids:
            raise GroundingFileError(f"{path}: query {r.id}: a composite query needs 'masks' and 'object_ids'")
    return (records, lambda rec: np.isin(query_mask(rec), rec.object_ids),
            f"{len(records)} composite queries of the synthetic world ({path})")


# ----------------------------------------------------------------------------- results

@dataclass
class SegmentResult:
    id: str
    split: str
    text: str
    points: list[tuple[int, int]]            # SAM's prompts, (x, y) in original pixels
    sam_score: float                         # SAM's predicted IoU of its mask
    inter: int
    union: int
    iou: float
    mask_pixels: int
    gold_pixels: int


def mask_iou_parts(pred: np.ndarray, gold: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts of two [H, W] bool masks."""
    if pred.shape != gold.shape:
        raise ValueError(f"mask of shape {pred.shape} against a gold mask of shape {gold.shape}")
    return int((pred & gold).sum()), int((pred | gold).sum())


@dataclass
class SegmentReport:
    splits: dict[str, IoUMeter]
    overall: IoUMeter = field(default_factory=IoUMeter)

    def summary(self) -> dict[str, dict]:
        meters = {**dict(sorted(self.splits.items())), "all": self.overall}
        return {s: {"ciou": m.ciou, "miou": m.miou, "n": m.count} for s, m in meters.items()}

    def lines(self) -> list[str]:
        return [f"{s:>8}: cIoU {format_pct(m['ciou'])}  mIoU {format_pct(m['miou'])}  (n={m['n']})"
                for s, m in self.summary().items()]


@dataclass
class FigureRow:
    image: Image.Image
    text: str
    heat: Tensor                             # raw [gh, gw]
    mask: np.ndarray                         # SAM's, [H, W] bool
    gold: np.ndarray                         # [H, W] bool
    iou: float


def evaluate_segmentation(
    records: Sequence[GroundingRecord],
    source: MapSource,
    segmenter: SamSegmenter,
    gold_mask: GoldMask,
    *,
    k: int = TOP_K,
    batch_size: int = 16,
    num_workers: int = 0,
    out: str | Path | None = None,
    figure_rows: int = 0,
    progress: bool = True,
) -> tuple[SegmentReport, list[FigureRow]]:
    """Segment every record; with `out`, one JSON line of `SegmentResult` per record. Returns the
    report and the first `figure_rows` queries' figure rows."""
    check_records(records)
    report, rows = SegmentReport(defaultdict(IoUMeter)), []
    with jsonl_sink(out) as write:
        for recs, maps in map_batches(records, source, batch_size=batch_size, num_workers=num_workers,
                                      progress=progress, desc="segmentation eval"):  # maps [N, gh, gw]
            maps = maps.cpu()
            images, image_index = distinct_images(recs)  # originals: SAM resizes them itself
            points = [top_k_points(heat, (r.height, r.width), k) for r, heat in zip(recs, maps)]
            masks, scores = segmenter.segment(images, points, image_index)
            for rec, slot, heat, pts, mask, score in zip(recs, image_index, maps, points, masks, scores):
                gold = gold_mask(rec)
                inter, union = mask_iou_parts(mask, gold)
                res = SegmentResult(rec.id, rec.split, rec.text, pts, score, inter, union,
                                    inter / union if union else 0.0, int(mask.sum()), int(gold.sum()))
                report.splits[rec.split].add(inter, union)
                report.overall.add(inter, union)
                write(asdict(res))
                if len(rows) < figure_rows:
                    rows.append(FigureRow(images[slot], rec.text, heat, mask, gold, res.iou))
    report.splits = dict(report.splits)
    return report, rows


# ----------------------------------------------------------------------------- the figure

MASK_COLOUR = (30, 144, 255)


def overlay_mask(image: Image.Image, mask: np.ndarray, alpha: float = 0.55,
                 colour: tuple[int, int, int] = MASK_COLOUR) -> np.ndarray:
    """image + [H, W] bool mask -> [H, W, 3] uint8, the mask's pixels tinted with `colour`."""
    out = np.asarray(image.convert("RGB"), dtype=np.float64).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float64)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_segment_figure(rows: Sequence[FigureRow], out: str | Path, *, k: int = TOP_K, dpi: int = 110) -> None:
    """One row per query: image | heatmap with the k prompt points starred | SAM mask | gold mask."""
    from hist_vlm.eval.heatmap import draw_heatmap, draw_image, fit_title, pyplot, save_figure

    if not rows:
        raise ValueError("no queries to draw")
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 4, figsize=(2.8 * 4, 2.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        draw_image(axes[r][0], row.image, title=fit_title(row.text, 34))
        draw_heatmap(axes[r][1], row.image, row.heat, title="GradCAM, top-%d points" % k, k=k)
        for c, (mask, title) in enumerate(((row.mask, f"SAM mask (IoU {100 * row.iou:.1f}%)"),
                                           (row.gold, "gold mask")), start=2):
            axes[r][c].imshow(overlay_mask(row.image, mask))
            axes[r][c].set_title(title, fontsize=9)
            axes[r][c].set_axis_off()
    save_figure(fig, out, dpi)
