"""The paper's complex referring segmentation test set (section 4.2): two referring expressions
of different objects of one RefCOCO+ image joined with " and ", the gold mask the union of both
objects' instance masks.

Per image of the chosen REFER splits (default testA + testB, RefCOCO+'s test set) with refs of
at least two different annotated objects, two objects are drawn, then one ref of each (an
object may have several) and one sentence of each ref. Every draw uses a generator seeded by
(seed, image id) only, so a pair does not change when other images are added or the splits are
read in another order. Why the count may differ from the paper's 1,404: docs/segmentation.md.

COCO segmentations (polygons, uncompressed or compressed RLE) are decoded with pycocotools.
Bad files raise `GroundingFileError` naming the file and record.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hist_vlm.data.grounding import GroundingFileError, GroundingRecord, _box, _get, _int, _text, load_refer
from hist_vlm.data.paths import Containment

TEST_SPLITS = ("testA", "testB")
JOIN = " and "


@dataclass(frozen=True)
class ComplexPair:
    """One query: `record` (kind "composite", the two objects' [x, y, w, h] boxes, the joined
    text) and the two objects' COCO segmentations, in the record's box order."""

    record: GroundingRecord
    ref_ids: tuple[int, int]
    ann_ids: tuple[int, int]
    segmentations: tuple[Any, Any]
    source: Path                 # the instances.json they come from (error messages)

    def gold_mask(self) -> np.ndarray:
        """[H, W] bool: the union of both objects' instance masks."""
        h, w = self.record.height, self.record.width
        out = np.zeros((h, w), dtype=bool)
        for ann_id, seg in zip(self.ann_ids, self.segmentations):
            out |= decode_segmentation(seg, h, w, where=f"{self.source}: annotation {ann_id}")
        return out


@dataclass(frozen=True)
class ComplexPairSet:
    pairs: list[ComplexPair]
    images: int                  # images of the splits
    skipped_single: int          # of those, images whose refs name fewer than two objects

    def summary(self) -> str:
        return (f"{len(self.pairs)} complex pairs from {self.images} images "
                f"({self.skipped_single} skipped: refs of fewer than two different objects)")


def decode_segmentation(seg: Any, height: int, width: int, where: str = "segmentation") -> np.ndarray:
    """A COCO segmentation (list of polygons, or RLE with list or string counts) -> [H, W] bool."""
    from pycocotools import mask as mask_utils

    try:
        if isinstance(seg, list):  # polygons [[x1, y1, x2, y2, ...], ...]
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):  # compressed RLE
            rle = seg
        else:
            raise TypeError(f"expected polygons or RLE, got {type(seg).__name__}")
        mask = mask_utils.decode(rle)
    except Exception as e:  # pycocotools raises TypeError/ValueError/IndexError on bad input
        raise GroundingFileError(f"{where}: unreadable segmentation ({e})") from None
    if mask.shape[:2] != (height, width):
        raise GroundingFileError(f"{where}: segmentation is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}")
    return mask.astype(bool)


def _sentence(ref: dict, rng: np.random.Generator, path: Path) -> str:
    sents = ref.get("sentences")
    if not isinstance(sents, list) or not sents:
        raise GroundingFileError(f"{path}: ref {ref.get('ref_id')}: no sentences")
    s = sents[int(rng.integers(len(sents)))]
    # "sent" is REFER's normalised sentence (lower case, tokens joined), what ALBEF's test jsons hold
    text = s.get("sent", s.get("raw")) if isinstance(s, dict) else None
    if not isinstance(text, str):
        raise GroundingFileError(f"{path}: ref {ref.get('ref_id')}: a sentence without 'sent'")
    return text.strip()


def draw_pair(seed: int, image_id: int, refs: Sequence[dict], path: Path) -> tuple[dict, dict, str, str] | None:
    """Two refs of different objects of one image and a sentence of each (None: fewer than two
    objects). The draws depend only on (seed, image_id) and the image's refs."""
    by_object: dict[int, list[dict]] = defaultdict(list)
    for r in sorted(refs, key=lambda r: int(r["ref_id"])):
        by_object[int(_get(r, "ann_id", path, f"ref {r['ref_id']}"))].append(r)
    objects = sorted(by_object)
    if len(objects) < 2:
        return None
    rng = np.random.default_rng([seed, image_id])
    a, b = (objects[int(i)] for i in rng.choice(len(objects), 2, replace=False))
    ref_a = by_object[a][int(rng.integers(len(by_object[a])))]
    ref_b = by_object[b][int(rng.integers(len(by_object[b])))]
    return ref_a, ref_b, _sentence(ref_a, rng, path), _sentence(ref_b, rng, path)


def build_complex_pairs(
    refer_root: str | Path,
    image_root: str | Path,
    *,
    dataset: str = "refcoco+",
    split_by: str = "unc",
    splits: Sequence[str] = TEST_SPLITS,
    seed: int = 0,
    allow_absolute_paths: bool = False,
) -> ComplexPairSet:
    """The pairs of every image of `splits` in `<refer_root>/<dataset>/refs(<split_by>).p` +
    `instances.json`; image paths are instances.json's file names under `image_root`, refused
    outside it unless `allow_absolute_paths` (`hist_vlm.data.paths`)."""
    index = load_refer(refer_root, dataset, split_by)
    images = Containment(image_root, allow_absolute=allow_absolute_paths)
    folder = Path(refer_root) / dataset
    refs_path, inst_path = folder / f"refs({split_by}).p", folder / "instances.json"
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ref_id, ref in index.refs.items():
        if ref.get("split") in splits:
            by_image[int(_get(ref, "image_id", refs_path, f"ref {ref_id}"))].append(ref)
    pairs, skipped = [], 0
    for image_id in sorted(by_image):
        refs = by_image[image_id]
        drawn = draw_pair(seed, image_id, refs, refs_path)
        if drawn is None:
            skipped += 1
            continue
        ref_a, ref_b, text_a, text_b = drawn
        img = index.images.get(image_id)
        ann_ids = (int(ref_a["ann_id"]), int(ref_b["ann_id"]))
        anns = [index.anns.get(a) for a in ann_ids]
        if img is None or None in anns:
            raise GroundingFileError(f"{inst_path}: image {image_id} or its annotations {list(ann_ids)} missing")
        segs = tuple(_get(a, "segmentation", inst_path, f"annotation {i}") for a, i in zip(anns, ann_ids))
        at = f"image {image_id}"
        width, height = (_int(img.get(k), inst_path, at, k, positive=True) for k in ("width", "height"))
        file_name = _text(_get(img, "file_name", inst_path, at), inst_path, at, "file_name")
        record = GroundingRecord(
            id=f"{image_id}_{ref_a['ref_id']}_{ref_b['ref_id']}",
            image=images.check(file_name, where=f"{inst_path}: {at}", error=GroundingFileError),
            text=f"{text_a}{JOIN}{text_b}",
            boxes=tuple(_box(a.get("bbox"), inst_path, f"annotation {i}", "xywh") for a, i in zip(anns, ann_ids)),
            box_format="xywh",
            split=str(ref_a.get("split", "")),
            width=width,
            height=height,
            kind="composite",
        )
        pairs.append(ComplexPair(record, (int(ref_a["ref_id"]), int(ref_b["ref_id"])), ann_ids, segs, inst_path))
    return ComplexPairSet(pairs, len(by_image), skipped)
