"""Converters from the official benchmark downloads to the layouts this project's readers read
(docs/data.md has the downloads and the commands):

- `flickr30k_entities`: `Sentences/*.txt` + `Annotations/*.xml` + split lists -> info-ground's
  `{split}.txt`, `bounding_boxes_{split}.json`, `sentences_{split}.json` (`read_flickr30k`);
- `refer`: REFER's `refs(unc).p` + `instances.json` -> `<dataset>_<split>.json` test lists
  (`read_refer`, `load_benchmark`);
- `karpathy`: `dataset_coco.json` / `dataset_flickr30k.json` -> ALBEF's retrieval jsons
  (`read_retrieval_train`, `read_retrieval_test`);
- `visual_genome`: `region_descriptions.json` + `image_data.json` -> a caption JSONL whose
  keys are image paths (`hist-vlm parse --format jsonl`, then training).

Every converter returns a `PrepareReport` (files written, records skipped counted by reason),
writes each output atomically, and raises `PrepareError` (one line naming the file and the
record) on a malformed input. Never imports torch.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hist_vlm._io import atomic_write_lines, atomic_write_text

__all__ = ["PrepareError", "PrepareReport", "write_json", "write_lines"]


class PrepareError(ValueError):
    """An input file of a converter is malformed; the message names the file and the record."""

    def __init__(self, path: str | Path, record: str | None, message: str):
        super().__init__(f"{path}: {record}: {message}" if record else f"{path}: {message}")


@dataclass
class PrepareReport:
    """What a converter wrote and what it left out, for the CLI summary."""

    written: dict[Path, int] = field(default_factory=dict)   # output file -> records in it
    skipped: Counter = field(default_factory=Counter)        # reason -> records left out
    notes: Counter = field(default_factory=Counter)          # kept, but worth knowing (reason -> count)

    def lines(self) -> list[str]:
        out = [f"wrote {path}: {n} records" for path, n in self.written.items()]
        out += [f"  skipped {n}: {reason}" for reason, n in sorted(self.skipped.items())]
        out += [f"  note: {n} {reason}" for reason, n in sorted(self.notes.items())]
        return out


def write_json(path: Path, obj: Any, report: PrepareReport, records: int) -> None:
    """`obj` as compact JSON, atomically, counted in `report`."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
    report.written[path] = records


def write_lines(path: Path, lines: Iterable[str], report: PrepareReport) -> None:
    """One line per entry, streamed to the file and renamed at the end, counted in `report`."""
    report.written[path] = atomic_write_lines(path, lines)
