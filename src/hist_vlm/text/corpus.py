"""The streaming parse job: (image, captions) stream -> parsed records with Algorithm 1 pairs
-> a JSONL file written atomically.

All captions go through ONE `parse_many` call over a lazy stream, so a multi-process spaCy
parser or a concurrent LLM parser starts its workers once and keeps them busy, while memory
stays bounded by the parser's look-ahead. Never imports torch.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from hist_vlm._io import atomic_file
from hist_vlm.text.pairs import pairs_for_image
from hist_vlm.text.types import CaptionParser, Phrase

__all__ = ["CorpusStats", "ImageRecord", "atomic_write_jsonl", "parse_images", "read_records"]


@dataclass
class ImageRecord:
    """One output line: an image, its captions, the phrases of all of them and the pairs.

    `phrases[k] = (caption_index, phrase)`: the phrase's offsets index into
    `captions[caption_index]`; `pairs` index into `phrases`."""

    image: str
    captions: list[str]
    phrases: list[tuple[int, Phrase]]
    pairs: list[tuple[int, int]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "image": self.image,
            "captions": self.captions,
            "phrases": [
                {
                    "text": p.text,
                    "subject": p.subject,
                    "caption_index": ci,
                    "start": p.start,
                    "end": p.end,
                    "subject_start": p.subject_start,
                    "subject_end": p.subject_end,
                    "subject_lemma": p.subject_lemma,
                }
                for ci, p in self.phrases
            ],
            "pairs": [list(pair) for pair in self.pairs],
        }

    @classmethod
    def from_json(cls, d: dict) -> "ImageRecord":
        return cls(
            image=d["image"],
            captions=d["captions"],
            phrases=[(p["caption_index"], Phrase.from_dict(p)) for p in d["phrases"]],
            pairs=[(i, j) for i, j in d["pairs"]],
        )


@dataclass
class CorpusStats:
    images: int = 0
    captions: int = 0
    phrases: int = 0
    pairs: int = 0
    images_with_pair: int = 0

    @property
    def phrases_per_caption(self) -> float:
        return self.phrases / self.captions if self.captions else 0.0


def parse_images(
    images: Iterable[tuple[str, list[str]]],
    parser: CaptionParser,
    seed: int = 0,
    batch_size: int = 256,
    stats: CorpusStats | None = None,
    progress: Callable[[int], object] | None = None,
) -> Iterator[ImageRecord]:
    """Parse every caption and run Algorithm 1 per image; records come out in input order.
    `progress(n)` is called with the number of captions of each finished image."""
    stats = stats if stats is not None else CorpusStats()
    fed: deque[tuple[str, list[str]]] = deque()  # images whose captions the parser has been given

    def captions() -> Iterator[str]:
        for key, caps in images:
            if caps:
                fed.append((key, caps))
                yield from caps

    results = iter(parser.parse_many(captions(), batch_size))
    for first in results:
        # the image is in `fed` before its first caption reaches the parser
        key, caps = fed.popleft()
        per_caption = [first] + [next(results) for _ in caps[1:]]
        phrases = [(ci, p) for ci, ps in enumerate(per_caption) for p in ps]
        pairs = pairs_for_image([p for _, p in phrases], seed, key)
        stats.images += 1
        stats.captions += len(caps)
        stats.phrases += len(phrases)
        stats.pairs += len(pairs)
        stats.images_with_pair += bool(pairs)
        if progress is not None:
            progress(len(caps))
        yield ImageRecord(key, caps, phrases, pairs)


def atomic_write_jsonl(path: str | Path, records: Iterable[ImageRecord]) -> int:
    """Write one JSON line per record to a temp file beside `path`, then `os.replace` it: an
    exception or Ctrl-C leaves `path` as it was (absent or the previous version). Its folder
    must exist (as before; a missing one is a FileNotFoundError, reported by `hist-vlm parse`)."""
    n = 0
    with atomic_file(path, "w", parents=False) as f:
        for rec in records:
            f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_records(path: str | Path) -> Iterator[ImageRecord]:
    """Read back a file written by `hist-vlm parse` (what the training datasets consume)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield ImageRecord.from_json(json.loads(line))
