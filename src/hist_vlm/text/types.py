"""The parser's output types and the protocol every caption parser implements.

Kept free of torch and spaCy so that readers, the cache and Algorithm 1 import cheaply.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Protocol


@dataclass(frozen=True)
class Phrase:
    """One groundable noun phrase of a caption and its subject (head noun).

    Offsets are character offsets into the caption, end exclusive.
    `subject_lemma` is the lower-cased lemma of the subject: Algorithm 1 compares these,
    so that "dog" and "dogs" count as the same subject.
    """

    text: str
    start: int
    end: int
    subject: str
    subject_start: int
    subject_end: int
    subject_lemma: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Phrase":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


class CaptionParser(Protocol):
    """Caption -> phrases. `name` and `version` key the persistent cache: bump `version`
    whenever a change can alter the output."""

    name: str
    version: str

    def parse(self, caption: str) -> list[Phrase]: ...

    def parse_many(self, captions: Iterable[str], batch_size: int = 256) -> Iterator[list[Phrase]]:
        """Phrases of each caption, in input order."""
        ...
