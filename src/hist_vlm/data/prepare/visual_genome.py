"""Visual Genome (https://visualgenome.org, v1.2) -> a caption JSONL for `hist-vlm parse
--format jsonl`, one {"image": "VG_100K/1.jpg", "captions": [region phrases]} per image.

Why: `region_descriptions.json` names images by id only, while the images lie in two folders,
`VG_100K/` and `VG_100K_2/`; `image_data.json` tells which (the last two parts of each
image's "url"). Both files are streamed (ijson) and the output is written line by line, so the
700 MB region file never sits in memory. Captions are cleaned as every caption reader cleans
them (`hist_vlm.data.captions`). An image whose path from its url would lead outside the image
root (`..`) is skipped and counted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from hist_vlm.data.captions import ReadStats, _field, _image_key, _stream_items, read_captions
from hist_vlm.data.prepare import PrepareError, PrepareReport, escapes, write_lines


def image_paths(path: Path) -> dict[str, str]:
    """image id -> "<folder>/<file>" from `image_data.json` ([{"image_id" | "id", "url"}])."""
    paths = {}
    for where, rec in _stream_items(path):
        image_id = _image_key(_field(rec, ("image_id", "id"), path, where), path, where)
        parts = str(_field(rec, ("url",), path, where)).rstrip("/").split("/")
        if len(parts) < 2 or not parts[-1]:
            raise PrepareError(path, where, f"url {rec['url']!r} does not end in <folder>/<file>")
        paths[image_id] = f"{parts[-2]}/{parts[-1]}"
    if not paths:
        raise PrepareError(path, None, "no images")
    return paths


def prepare_visual_genome(
    regions: str | Path, image_data: str | Path, out: str | Path, progress: bool = True
) -> PrepareReport:
    """Write the caption JSONL `out`; images missing from `image_data` are skipped and counted."""
    regions, out = Path(regions), Path(out)
    paths = image_paths(Path(image_data))
    report, stats = PrepareReport(), ReadStats()

    def lines() -> Iterator[str]:
        images = read_captions(regions, "vg", stats)
        for key, captions in tqdm(images, desc="visual genome", unit=" images", disable=not progress, leave=False):
            if key not in paths:
                report.skipped["images not in image_data.json"] += 1
                continue
            if escapes(paths[key]):
                report.skipped["images whose url path leaves the image root with '..' (not written)"] += 1
                continue
            yield json.dumps({"image": paths[key], "captions": captions}, ensure_ascii=False)

    write_lines(out, lines(), report)
    report.skipped.update({"empty region phrases": stats.skipped_empty,
                           "images without a usable region phrase": stats.images_without_captions})
    report.notes["region phrases cut at a word boundary (too long)"] += stats.truncated
    report.skipped, report.notes = +report.skipped, +report.notes  # drop zero counts
    return report
