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
writes its outputs atomically and as a set (`write_set`: all written, then all renamed), and
raises `PrepareError` (one line naming the file and the record) on a malformed input. A record
whose image path would lead outside the image root (absolute, or `..` above it: `escapes`) is
skipped and counted, never written. Never imports torch.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hist_vlm._io import atomic_files, atomic_write_lines, atomic_write_text
from hist_vlm.data.paths import escapes

__all__ = ["PrepareError", "PrepareReport", "escapes", "read_text", "write_json", "write_lines", "write_set"]


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


def write_set(outputs: Iterable[tuple[Path, Any, int]], report: PrepareReport) -> None:
    """Several outputs `(path, content, records)` replaced as a set (`atomic_files`): every one
    is written to its temp first, then all are renamed, so a failure or a kill while writing
    leaves every previous file as it was (never a new train file beside old val/test files).
    `content`: a str written as it is, anything else as compact JSON."""
    outputs = list(outputs)
    with atomic_files(*(p for p, _, _ in outputs)) as temps:
        for tmp, (_, content, _) in zip(temps, outputs):
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, separators=(",", ":"))
            tmp.write_bytes(text.encode("utf-8"))
    for path, _, records in outputs:
        report.written[path] = records


def read_text(path: Path) -> str:
    """A UTF-8 text input, or a `PrepareError` naming it (not found, invalid UTF-8)."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PrepareError(path, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise PrepareError(path, None, f"invalid UTF-8 at byte {e.start}") from None


def write_lines(path: Path, lines: Iterable[str], report: PrepareReport) -> None:
    """One line per entry, streamed to the file and renamed at the end, counted in `report`."""
    report.written[path] = atomic_write_lines(path, lines)
