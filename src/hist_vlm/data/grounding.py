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
"""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

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


def _box(value: Any, path: Path, where: str) -> tuple[float, float, float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) >= 4 and all(isinstance(v, (int, float)) for v in value[:4])):
        raise GroundingFileError(f"{path}: {where}: a box must be 4 numbers, got {value!r}")
    return tuple(float(v) for v in value[:4])  # type: ignore[return-value]


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
    try:
        return ReferIndex(
            refs={int(r["ref_id"]): r for r in refs},
            anns={int(a["id"]): a for a in _get(inst, "annotations", inst_path, "top level")},
            images={int(i["id"]): i for i in _get(inst, "images", inst_path, "top level")},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise GroundingFileError(f"{refs_path.parent}: malformed REFER files (missing {e})") from None


def read_refer(
    test_files: Sequence[str | Path],
    refer_root: str | Path,
    image_root: str | Path,
    dataset: str = "refcoco+",
    split_by: str = "unc",
) -> list[GroundingRecord]:
    """RefCOCO+ / refclef queries from ALBEF/SelfEQ test jsons and the REFER files.

    The split is the json's "split" when it has one (refclef; any split containing "test" is
    "test", as SelfEQ counts it), else the ref's (RefCOCO+: val, testA, testB).
    """
    index = load_refer(refer_root, dataset, split_by)
    out = []
    for tf in map(Path, test_files):
        items = _load_json(tf)
        if not isinstance(items, list):
            raise GroundingFileError(f"{tf}: expected a JSON list of {{image, text, ref_id}}")
        for n, item in enumerate(items):
            where = f"item {n}"
            ref_id = int(_get(item, "ref_id", tf, where))
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
            out.append(GroundingRecord(
                id=str(ref_id),
                image=Path(image_root) / str(_get(item, "image", tf, where)),
                text=str(_get(item, "text", tf, where)),
                boxes=(_box(ann.get("bbox"), tf, f"{where} (ref {ref_id})"),),
                box_format="xywh",
                split=split,
                width=int(img["width"]),
                height=int(img["height"]),
            ))
    return out


# ----------------------------------------------------------------------------- Flickr30k Entities

def read_flickr30k(ann_dir: str | Path, image_dir: str | Path, split: str) -> list[GroundingRecord]:
    """Flickr30k Entities phrases of one split in info-ground's layout; images `<id>.jpg`."""
    ann_dir, image_dir = Path(ann_dir), Path(image_dir)
    ids_path = ann_dir / f"{split}.txt"
    ids = _need(ids_path).read_text().split()
    boxes_path, sents_path = ann_dir / f"bounding_boxes_{split}.json", ann_dir / f"sentences_{split}.json"
    all_boxes, all_sents = _load_json(boxes_path), _load_json(sents_path)
    label = "val" if "val" in ids_path.name else "test"  # SelfEQ names the split by the id file
    out = []
    for image_id in ids:
        image_boxes = _get(_get(all_boxes, image_id, boxes_path, "top level"), "boxes", boxes_path, image_id)
        image = image_dir / f"{image_id}.jpg"
        width, height = _image_size(image)
        for s, sent in enumerate(_get(all_sents, image_id, sents_path, "top level")):
            for phrase in _get(sent, "phrases", sents_path, f"{image_id} sentence {s}"):
                pid = str(_get(phrase, "phrase_id", sents_path, f"{image_id} sentence {s}"))
                if pid not in image_boxes:
                    continue
                where = f"{image_id} phrase {pid}"
                out.append(GroundingRecord(
                    id=f"{image_id}_{s}_{pid}",
                    image=image,
                    text=str(_get(phrase, "phrase", sents_path, where)),
                    boxes=tuple(_box(b, boxes_path, where) for b in image_boxes[pid]),
                    box_format="xyxy",
                    split=label,
                    width=width,
                    height=height,
                ))
    return out


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with Image.open(_need(path)) as im:
            return im.size
    except OSError as e:
        raise GroundingFileError(f"{path}: not a readable image ({e})") from None


# ----------------------------------------------------------------------------- synthetic world

def read_synthetic(path: str | Path, splits: Iterable[str] | None = None) -> list[GroundingRecord]:
    """The synthetic world's grounding JSONL; image and mask paths are relative to its folder."""
    path = Path(path)
    root = path.parent
    keep = set(splits) if splits is not None else None
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
            boxes = tuple(_box(b, path, where) for b in _get(rec, "boxes", path, where))
            object_ids = tuple(int(i) for i in rec.get("object_ids", ()))
            if object_ids and len(object_ids) != len(boxes):
                raise GroundingFileError(f"{path}: {where}: {len(boxes)} boxes but {len(object_ids)} object_ids")
            mask = rec.get("masks")
            out.append(GroundingRecord(
                id=str(rec.get("id", f"{path.stem}_{lineno}")),
                image=root / str(_get(rec, "image", path, where)),
                text=str(_get(rec, "text", path, where)),
                boxes=boxes,
                box_format=str(rec.get("box_format", "xyxy")),
                split=split,
                width=int(_get(rec, "width", path, where)),
                height=int(_get(rec, "height", path, where)),
                kind=str(rec.get("kind", "single")),
                mask=root / mask if isinstance(mask, str) else None,
                object_ids=object_ids,
            ))
    return out


# ----------------------------------------------------------------------------- by benchmark name

def load_benchmark(
    name: str,
    data_root: str | Path,
    *,
    ann_files: Sequence[str | Path] = (),
    image_root: str | Path | None = None,
    splits: Sequence[str] | None = None,
) -> list[GroundingRecord]:
    """Records of a benchmark from its usual layout under `data_root`.

    refcoco+ / refclef: REFER folders under data_root; test jsons `ann_files` (default: the
    `<name>_*val*.json` and `<name>_*test*.json` files in data_root); image paths in the jsons are
    joined to `image_root` (default data_root). flickr30k: info-ground files in data_root, images in
    `image_root` (default data_root/flickr30k-images or flickr30k_images), splits val and test. synthetic:
    data_root/grounding.jsonl. `splits` keeps only those splits.
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
        records = read_refer(files, root, image_root or root, dataset=name)
    elif name == "flickr30k":
        wanted = list(splits) if splits else [s for s in ("val", "test") if (root / f"{s}.txt").is_file()]
        if not wanted:
            raise GroundingFileError(f"{root}: no val.txt or test.txt image-id files")
        # the official download unpacks to flickr30k-images/; some preprocessed copies use flickr30k_images/
        default = next((root / n for n in ("flickr30k-images", "flickr30k_images") if (root / n).is_dir()),
                       root / "flickr30k-images")
        images = Path(image_root) if image_root else default
        records = [r for s in wanted for r in read_flickr30k(root, images, s)]
    else:
        records = read_synthetic(root / "grounding.jsonl")
    if splits:
        records = [r for r in records if r.split in set(splits)]
    return records
