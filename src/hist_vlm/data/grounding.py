"""Readers for grounding benchmarks, all yielding one record type (`GroundingRecord`).

Formats (docs/reference_code.md, "Evaluation data formats"):
- RefCOCO+ / ReferIt (refclef): ALBEF/SelfEQ test jsons, a list of {"image", "text", "ref_id"}
  (refclef adds "split"), plus the REFER files `<refer_root>/<dataset>/refs(<split_by>).p` and
  `instances.json`. Boxes are the referred annotation's [x, y, w, h]; sizes come from
  instances.json; RefCOCO+ splits (val/testA/testB) from the refs, refclef's from its json.
- Flickr30k Entities in info-ground's layout: `<split>.txt` (image ids), `bounding_boxes_<split>.json`,
  `sentences_<split>.json`; every phrase whose id has an entry in the boxes counts (as SelfEQ);
  boxes are [x1, y1, x2, y2], any box may be hit; sizes are read from the image headers.
- The synthetic world's `grounding.jsonl` (hist_vlm.demo.synthetic), xyxy boxes plus id masks.

Bad or missing files raise `GroundingFileError` with a one-line message naming the file.

Every record is checked as it is read: its image (and mask) must lie under its root
(`hist_vlm.data.paths`; an absolute path, `..` above the root or a symbolic link out of it is
refused unless the caller passes `allow_absolute_paths=True`), ids, sizes and fields must have
their types, and a box must be finite and well ordered (x2 >= x1, y2 >= y1; xywh: w, h >= 0). A
box that extends outside its image is clipped to it ([0, width] x [0, height]: the pointing
game's points lie inside the image, so no hit changes) and counted, one line on stderr per file;
a box entirely outside its image can never be hit and is refused.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from hist_vlm.data.paths import Containment

BENCHMARKS = ("refcoco+", "refclef", "flickr30k", "synthetic")


class GroundingFileError(ValueError):
    """A grounding file is missing or malformed; the message names it."""


@dataclass(frozen=True)
class GroundingRecord:
    """One query: a text referring to one or more boxes of an image of (width, height)."""

    id: str
    image: Path
    text: str
    boxes: tuple[tuple[float, float, float, float], ...]
    box_format: str                      # "xywh" (RefCOCO+, ReferIt) | "xyxy" (Flickr30k, synthetic)
    split: str
    width: int
    height: int
    kind: str = "single"                 # "single" | "composite" ("A and B", synthetic only)
    mask: Path | None = None             # PNG of object ids (synthetic only)
    object_ids: tuple[int, ...] = ()     # ids in `mask` of the referred objects, box-aligned


# ----------------------------------------------------------------------------- file access

def _need(path: Path) -> Path:
    if not path.is_file():
        raise GroundingFileError(f"{path}: file not found")
    return path


def _load_json(path: Path) -> Any:
    try:
        with _need(path).open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GroundingFileError(f"{path}: not valid JSON ({e})") from None


class _DataOnlyUnpickler(pickle.Unpickler):
    """REFER's refs pickle holds only lists, dicts, strings and numbers: refuse any class, so
    that a hostile pickle cannot run code."""

    def find_class(self, module: str, name: str):  # noqa: D102
        raise pickle.UnpicklingError(f"refuses to load {module}.{name}")


def _load_pickle(path: Path) -> Any:
    with _need(path).open("rb") as f:
        raw = f.read()
    # the released refs were written by Python 2: byte strings decode as latin-1
    for encoding in ("ASCII", "latin1"):
        try:
            return _DataOnlyUnpickler(io.BytesIO(raw), encoding=encoding).load()
        except UnicodeDecodeError:
            continue
        except Exception as e:  # pickle raises many types on garbage
            raise GroundingFileError(f"{path}: not a readable refs pickle ({e})") from None
    raise GroundingFileError(f"{path}: undecodable strings in pickle")


def _get(rec: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(rec, dict) or key not in rec:
        raise GroundingFileError(f"{path}: {where}: missing field {key!r}")
    return rec[key]


def _read_text(path: Path) -> str:
    try:
        return _need(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise GroundingFileError(f"{path}: invalid UTF-8 at byte {e.start}") from None


def _int(value: Any, path: Path, where: str, key: str, *, strings: bool = False, positive: bool = False) -> int:
    """An integer field (`strings`: or its decimal digits, as some id files write ids)."""
    if strings and isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0):
        raise GroundingFileError(f"{path}: {where}: {key} must be {'a positive' if positive else 'an'} integer, "
                                 f"got {value!r}")
    return value


def _text(value: Any, path: Path, where: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise GroundingFileError(f"{path}: {where}: {key} must be a non-empty string, got {value!r}")
    return value


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer beyond the float range
        return False


def _box(value: Any, path: Path, where: str, fmt: str = "xyxy") -> tuple[float, float, float, float]:
    """A box of 4 finite numbers, well ordered (xyxy: x2 >= x1 and y2 >= y1; xywh: w, h >= 0)."""
    if not (isinstance(value, (list, tuple)) and len(value) >= 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[:4])):
        raise GroundingFileError(f"{path}: {where}: a box must be 4 numbers, got {value!r}")
    if not all(_finite(v) for v in value[:4]):
        raise GroundingFileError(f"{path}: {where}: box {list(value[:4])!r} is not finite")
    x, y, c, d = (float(v) for v in value[:4])
    if fmt == "xywh" and (c < 0 or d < 0):
        raise GroundingFileError(f"{path}: {where}: box [x, y, w, h] = {list(value[:4])!r} has a negative size")
    if fmt != "xywh" and (c < x or d < y):
        raise GroundingFileError(f"{path}: {where}: box [x1, y1, x2, y2] = {list(value[:4])!r} is reversed "
                                 f"(x2 < x1 or y2 < y1)")
    return x, y, c, d


class _Clip:
    """Boxes of one file that extend outside their image, clipped to it and counted; `report`
    prints the count once (stderr). A box with no part inside its image is refused."""

    def __init__(self, path: Path) -> None:
        self.path, self.count, self.first = path, 0, ""

    def __call__(self, box: tuple[float, float, float, float], fmt: str, width: int, height: int,
                 where: str) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = box if fmt != "xywh" else (box[0], box[1], box[0] + box[2], box[1] + box[3])
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise GroundingFileError(f"{self.path}: {where}: box {list(box)!r} ({fmt}) lies outside its "
                                     f"{width} x {height} image")
        c = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
        if c == (x1, y1, x2, y2):
            return box
        self.count += 1
        self.first = self.first or where
        return c if fmt != "xywh" else (c[0], c[1], c[2] - c[0], c[3] - c[1])

    def report(self) -> None:
        if self.count:
            print(f"warning: {self.path}: {self.count} box(es) extend outside their image, clipped to it "
                  f"(the first: {self.first})", file=sys.stderr)


# ----------------------------------------------------------------------------- RefCOCO+ / ReferIt

@dataclass(frozen=True)
class ReferIndex:
    """The parts of REFER's index the pointing game needs."""

    refs: dict[int, dict]                # ref_id -> ref (image_id, ann_id, split, ...)
    anns: dict[int, dict]                # ann_id -> annotation (bbox [x, y, w, h], ...)
    images: dict[int, dict]              # image_id -> image (width, height, ...)


def load_refer(refer_root: str | Path, dataset: str, split_by: str = "unc") -> ReferIndex:
    """Read `<refer_root>/<dataset>/refs(<split_by>).p` and `instances.json`."""
    folder = Path(refer_root) / dataset
    refs_path, inst_path = folder / f"refs({split_by}).p", folder / "instances.json"
    refs = _load_pickle(refs_path)
    inst = _load_json(inst_path)
    if not isinstance(refs, list):
        raise GroundingFileError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    index = ReferIndex({}, {}, {})
    for n, r in enumerate(refs):
        ref_id = _int(_get(r, "ref_id", refs_path, f"refs[{n}]"), refs_path, f"refs[{n}]", "ref_id", strings=True)
        for key in ("image_id", "ann_id"):  # REFER's ids are integers: a string of digits is read as one
            _int(_get(r, key, refs_path, f"ref {ref_id}"), refs_path, f"ref {ref_id}", key, strings=True)
        index.refs[ref_id] = r
    for key, into in (("annotations", index.anns), ("images", index.images)):
        items = _get(inst, key, inst_path, "top level")
        if not isinstance(items, list):
            raise GroundingFileError(f"{inst_path}: {key!r} must be a list, got {type(items).__name__}")
        for n, item in enumerate(items):
            where = f"{key}[{n}]"
            into[_int(_get(item, "id", inst_path, where), inst_path, where, "id", strings=True)] = item
    return index


def read_refer(
    test_files: Sequence[str | Path],
    refer_root: str | Path,
    image_root: str | Path,
    dataset: str = "refcoco+",
    split_by: str = "unc",
    *,
    allow_absolute_paths: bool = False,
) -> list[GroundingRecord]:
    """RefCOCO+ / refclef queries from ALBEF/SelfEQ test jsons and the REFER files.

    The split is the json's "split" when it has one (refclef; any split containing "test" is
    "test", as SelfEQ counts it), else the ref's (RefCOCO+: val, testA, testB). An image path
    outside `image_root` is refused unless `allow_absolute_paths` (`hist_vlm.data.paths`).
    """
    index = load_refer(refer_root, dataset, split_by)
    inst_path = Path(refer_root) / dataset / "instances.json"
    images = Containment(image_root, allow_absolute=allow_absolute_paths)
    out = []
    for tf in map(Path, test_files):
        items = _load_json(tf)
        if not isinstance(items, list):
            raise GroundingFileError(f"{tf}: expected a JSON list of {{image, text, ref_id}}")
        clip = _Clip(tf)
        for n, item in enumerate(items):
            where = f"item {n}"
            ref_id = _int(_get(item, "ref_id", tf, where), tf, where, "ref_id", strings=True)
            ref = index.refs.get(ref_id)
            if ref is None:
                raise GroundingFileError(f"{tf}: {where}: ref_id {ref_id} is not in refs({split_by}).p")
            ann = index.anns.get(int(ref["ann_id"]))
            img = index.images.get(int(ref["image_id"]))
            if ann is None or img is None:
                raise GroundingFileError(f"{tf}: {where}: ref {ref_id} has no annotation/image in instances.json")
            split = str(item.get("split") or ref.get("split", ""))
            if "test" in split and dataset == "refclef":
                split = "test"
            size = [_int(img.get(k), inst_path, f"image {ref['image_id']}", k, positive=True) for k in ("width", "height")]
            image = _text(_get(item, "image", tf, where), tf, where, "image")
            at = f"{where} (ref {ref_id})"
            out.append(GroundingRecord(
                id=str(ref_id),
                image=images.check(image, where=f"{tf}: {where}", error=GroundingFileError),
                text=_text(_get(item, "text", tf, where), tf, where, "text"),
                boxes=(clip(_box(ann.get("bbox"), tf, at, "xywh"), "xywh", *size, at),),
                box_format="xywh",
                split=split,
                width=size[0],
                height=size[1],
            ))
        clip.report()
    return out


# ----------------------------------------------------------------------------- Flickr30k Entities

def read_flickr30k(ann_dir: str | Path, image_dir: str | Path, split: str, *,
                   allow_absolute_paths: bool = False) -> list[GroundingRecord]:
    """Flickr30k Entities phrases of one split in info-ground's layout; images `<id>.jpg`,
    refused outside `image_dir` unless `allow_absolute_paths` (`hist_vlm.data.paths`)."""
    ann_dir, image_dir = Path(ann_dir), Path(image_dir)
    ids_path = ann_dir / f"{split}.txt"
    ids = _read_text(ids_path).split()
    boxes_path, sents_path = ann_dir / f"bounding_boxes_{split}.json", ann_dir / f"sentences_{split}.json"
    all_boxes, all_sents = _load_json(boxes_path), _load_json(sents_path)
    label = "val" if "val" in ids_path.name else "test"  # SelfEQ names the split by the id file
    images, clip = Containment(image_dir, allow_absolute=allow_absolute_paths), _Clip(boxes_path)
    out = []
    for image_id in ids:
        image = images.check(f"{image_id}.jpg", where=f"{ids_path}: image id {image_id!r}", error=GroundingFileError)
        image_boxes = _get(_get(all_boxes, image_id, boxes_path, "top level"), "boxes", boxes_path, image_id)
        if not isinstance(image_boxes, dict):
            raise GroundingFileError(f"{boxes_path}: {image_id}: 'boxes' must be an object, got {type(image_boxes).__name__}")
        width, height = _image_size(image)
        for s, sent in enumerate(_get(all_sents, image_id, sents_path, "top level")):
            for phrase in _get(sent, "phrases", sents_path, f"{image_id} sentence {s}"):
                pid = str(_get(phrase, "phrase_id", sents_path, f"{image_id} sentence {s}"))
                if pid not in image_boxes:
                    continue
                where = f"{image_id} phrase {pid}"
                if not isinstance(image_boxes[pid], list):
                    raise GroundingFileError(f"{boxes_path}: {where}: boxes must be a list, got {image_boxes[pid]!r}")
                out.append(GroundingRecord(
                    id=f"{image_id}_{s}_{pid}",
                    image=image,
                    text=str(_get(phrase, "phrase", sents_path, where)),
                    boxes=tuple(clip(_box(b, boxes_path, where), "xyxy", width, height, where) for b in image_boxes[pid]),
                    box_format="xyxy",
                    split=label,
                    width=width,
                    height=height,
                ))
    clip.report()
    return out


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixels are not decoded
            with Image.open(_need(path)) as im:
                return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, GroundingFileError):
            raise
        reason = " ".join(str(e).split()) or type(e).__name__
        raise GroundingFileError(f"{path}: not a readable image ({reason})") from None


# ----------------------------------------------------------------------------- synthetic world

def read_synthetic(path: str | Path, splits: Iterable[str] | None = None, *,
                   allow_absolute_paths: bool = False) -> list[GroundingRecord]:
    """The synthetic world's grounding JSONL; image and mask paths are relative to its folder
    and refused outside it unless `allow_absolute_paths` (`hist_vlm.data.paths`)."""
    path = Path(path)
    root = path.parent
    keep = set(splits) if splits is not None else None
    files, clip = Containment(root, allow_absolute=allow_absolute_paths), _Clip(path)
    out = []
    with _need(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            where = f"line {lineno}"
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise GroundingFileError(f"{path}: {where}: not valid JSON ({e})") from None
            split = str(_get(rec, "split", path, where))
            if keep is not None and split not in keep:
                continue
            fmt, kind, mask = rec.get("box_format", "xyxy"), rec.get("kind", "single"), rec.get("masks")
            if fmt not in ("xyxy", "xywh"):
                raise GroundingFileError(f"{path}: {where}: box_format must be \"xyxy\" or \"xywh\", got {fmt!r}")
            if kind not in ("single", "composite"):
                raise GroundingFileError(f"{path}: {where}: kind must be \"single\" or \"composite\", got {kind!r}")
            raw_boxes, object_ids = _get(rec, "boxes", path, where), rec.get("object_ids", [])
            width, height = (_int(_get(rec, k, path, where), path, where, k, positive=True) for k in ("width", "height"))
            if not isinstance(raw_boxes, list):
                raise GroundingFileError(f"{path}: {where}: boxes must be a list, got {raw_boxes!r}")
            boxes = tuple(clip(_box(b, path, where, fmt), fmt, width, height, where) for b in raw_boxes)
            if not isinstance(object_ids, list):
                raise GroundingFileError(f"{path}: {where}: object_ids must be a list of integers, got {object_ids!r}")
            object_ids = tuple(_int(i, path, where, "an object id") for i in object_ids)
            if object_ids and len(object_ids) != len(boxes):
                raise GroundingFileError(f"{path}: {where}: {len(boxes)} boxes but {len(object_ids)} object_ids")
            if mask is not None and not isinstance(mask, str):
                raise GroundingFileError(f"{path}: {where}: masks must be a path string, got {mask!r}")
            at = f"{path}: {where}"
            out.append(GroundingRecord(
                id=str(rec.get("id", f"{path.stem}_{lineno}")),
                image=files.check(_text(_get(rec, "image", path, where), path, where, "image"), where=at,
                                  error=GroundingFileError),
                text=_text(_get(rec, "text", path, where), path, where, "text"),
                boxes=boxes,
                box_format=fmt,
                split=split,
                width=width,
                height=height,
                kind=kind,
                mask=files.check(mask, where=at, what="mask", error=GroundingFileError) if mask is not None else None,
                object_ids=object_ids,
            ))
    clip.report()
    return out


# ----------------------------------------------------------------------------- by benchmark name

def load_benchmark(
    name: str,
    data_root: str | Path,
    *,
    ann_files: Sequence[str | Path] = (),
    image_root: str | Path | None = None,
    splits: Sequence[str] | None = None,
    allow_absolute_paths: bool = False,
) -> list[GroundingRecord]:
    """Records of a benchmark from its usual layout under `data_root`.

    refcoco+ / refclef: REFER folders under data_root; test jsons `ann_files` (default: the
    `<name>_*val*.json` and `<name>_*test*.json` files in data_root); image paths in the jsons are
    joined to `image_root` (default data_root). flickr30k: info-ground files in data_root, images in
    `image_root` (default data_root/flickr30k-images or flickr30k_images), splits val and test. synthetic:
    data_root/grounding.jsonl. `splits` keeps only those splits. Image (and mask) paths outside
    their root are refused unless `allow_absolute_paths` (`hist_vlm.data.paths`).
    """
    root = Path(data_root)
    if name not in BENCHMARKS:
        raise GroundingFileError(f"unknown benchmark {name!r} (choose {', '.join(BENCHMARKS)})")
    if not root.is_dir():
        raise GroundingFileError(f"{root}: data root is not a folder")
    if name in ("refcoco+", "refclef"):
        files = [Path(f) for f in ann_files] or sorted(
            p for p in root.glob(f"{name}_*.json") if "val" in p.name or "test" in p.name
        )
        if not files:
            raise GroundingFileError(f"{root}: no {name}_*val*.json / {name}_*test*.json test files (give --ann)")
        records = read_refer(files, root, image_root or root, dataset=name, allow_absolute_paths=allow_absolute_paths)
    elif name == "flickr30k":
        wanted = list(splits) if splits else [s for s in ("val", "test") if (root / f"{s}.txt").is_file()]
        if not wanted:
            raise GroundingFileError(f"{root}: no val.txt or test.txt image-id files")
        # the official download unpacks to flickr30k-images/; some preprocessed copies use flickr30k_images/
        default = next((root / n for n in ("flickr30k-images", "flickr30k_images") if (root / n).is_dir()),
                       root / "flickr30k-images")
        images = Path(image_root) if image_root else default
        records = [r for s in wanted for r in read_flickr30k(root, images, s, allow_absolute_paths=allow_absolute_paths)]
    else:
        records = read_synthetic(root / "grounding.jsonl", allow_absolute_paths=allow_absolute_paths)
    if splits:
        records = [r for r in records if r.split in set(splits)]
    return records
