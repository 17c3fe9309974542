"""Karpathy's splits (`dataset_coco.json`, `dataset_flickr30k.json`: {"images": [{"filepath"?,
"filename", "split", "sentences": [{"raw", "tokens", ...}], "imgid", "cocoid"?}]}) -> ALBEF's
retrieval files, which `hist_vlm.data.retrieval` reads:

- `<name>_train.json`: one record per caption, {"caption", "image", "image_id"}; Karpathy's
  "restval" images join "train" (as ALBEF's 113k COCO training images do);
- `<name>_val.json`, `<name>_test.json`: one record per image, {"image", "caption": [...]}.

"image" is relative to the dataset's image root: COCO `<filepath>/<filename>`
(`val2014/COCO_val2014_...jpg`), Flickr30k `flickr30k-images/<filename>` (ALBEF's layouts);
"image_id" is `<name>_<cocoid>` or `<name>_<file stem>`. Captions are the "raw" sentences,
whitespace collapsed. The file (about 150 MB for COCO) is streamed image by image (ijson).
An image whose path is absolute or climbs out of the image root with `..` is skipped and
counted. The three files are replaced as a set (`write_set`).
"""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from hist_vlm.data.captions import _field, _image_key, _list, _stream_items
from hist_vlm.data.prepare import PrepareError, PrepareReport, escapes, write_set

SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}
IMAGE_FOLDER = {"flickr30k": "flickr30k-images"}  # Karpathy's Flickr30k file has no filepath


def prepare_karpathy(path: str | Path, out_dir: str | Path, name: str | None = None, progress: bool = True) -> PrepareReport:
    """Write `<out_dir>/<name>_{train,val,test}.json`; `name` defaults to the file's stem
    without `dataset_` (`dataset_coco.json` -> coco)."""
    path = Path(path)
    name = name or path.stem.removeprefix("dataset_")
    train: list[dict] = []
    tests: dict[str, list[dict]] = {"val": [], "test": []}
    report = PrepareReport()
    records = _stream_items(path, "images.item", "images[{}]")
    for where, rec in tqdm(records, desc=f"{name} images", unit=" images", disable=not progress, leave=False):
        split = SPLIT_OF.get(str(_field(rec, ("split",), path, where)))
        if split is None:
            report.skipped[f"images of split {rec['split']!r} (not train/restval/val/test)"] += 1
            continue
        filename = _image_key(_field(rec, ("filename",), path, where), path, where)
        folder = rec.get("filepath") or IMAGE_FOLDER.get(name)
        if folder is not None and not isinstance(folder, str):
            raise PrepareError(path, where, f"'filepath' must be a string, got {type(folder).__name__}")
        image = f"{folder}/{filename}" if folder else filename
        if escapes(image):
            report.skipped[f"{split}: images whose path is absolute or leaves the image root with '..' "
                           f"(not written)"] += 1
            continue
        captions = []
        for n, sent in enumerate(_list(_field(rec, ("sentences",), path, where), path, where, "sentences")):
            raw = _field(sent, ("raw",), path, f"{where}.sentences[{n}]")
            if not isinstance(raw, str):
                raise PrepareError(path, f"{where}.sentences[{n}]", f"'raw' must be a string, got {type(raw).__name__}")
            if raw.strip():
                captions.append(" ".join(raw.split()))
            else:
                report.skipped[f"{split}: empty captions"] += 1
        if not captions:
            report.skipped[f"{split}: images without a caption"] += 1
            continue
        if split == "train":
            image_id = f"{name}_{rec.get('cocoid', Path(filename).stem)}"
            train.extend({"caption": c, "image": image, "image_id": image_id} for c in captions)
        else:
            tests[split].append({"image": image, "caption": captions})
    out_dir = Path(out_dir)
    for split, items in (("train", train), *tests.items()):
        if not items:
            raise PrepareError(path, None, f"no {split} images (is this a Karpathy dataset_*.json?)")
    write_set([(out_dir / f"{name}_{split}.json", items, len(items))
               for split, items in (("train", train), *tests.items())], report)
    return report
