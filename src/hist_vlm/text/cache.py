"""Persistent parse cache: (parser name, parser version, caption) -> phrases, in sqlite (WAL).

Why: parsing a corpus is the slow step of data preparation (minutes with spaCy, hours with an
LLM). With the cache a re-run is near-instant, and an interrupted run resumes where it stopped:
every parsed caption is stored as soon as it comes back and committed in small groups and on
any exit (exception, Ctrl-C), so nothing parsed is lost and nothing is stored twice.
Never imports torch.
"""
from __future__ import annotations

import json
import os
import sqlite3
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from hist_vlm.text.types import CaptionParser, Phrase

__all__ = ["CACHE_ENV", "CACHE_FILE", "CachedParser", "ParseCache", "default_cache_dir"]

CACHE_ENV = "HIST_VLM_CACHE"
CACHE_FILE = "parses.sqlite3"
_SQL_VARS = 500  # captions per SELECT ... IN (...), below sqlite's variable limit


def default_cache_dir() -> Path:
    """`$HIST_VLM_CACHE` when set, else `~/.cache/hist-vlm`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hist-vlm"


def _encode(phrases: list[Phrase]) -> str:
    return json.dumps([p.to_dict() for p in phrases], ensure_ascii=False)


def _decode(blob: str) -> list[Phrase]:
    return [Phrase.from_dict(d) for d in json.loads(blob)]


class ParseCache:
    """The sqlite file `<directory>/parses.sqlite3`; safe to share between processes."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / CACHE_FILE
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS parses ("
            " parser TEXT NOT NULL, version TEXT NOT NULL, caption TEXT NOT NULL, phrases TEXT NOT NULL,"
            " PRIMARY KEY (parser, version, caption)) WITHOUT ROWID"
        )
        self._db.commit()

    def get_many(self, parser: str, version: str, captions: Sequence[str]) -> dict[str, list[Phrase]]:
        """The cached phrases of those `captions` that are in the cache."""
        found: dict[str, list[Phrase]] = {}
        unique = list(dict.fromkeys(captions))
        for i in range(0, len(unique), _SQL_VARS):
            chunk = unique[i : i + _SQL_VARS]
            rows = self._db.execute(
                "SELECT caption, phrases FROM parses WHERE parser = ? AND version = ? "
                f"AND caption IN ({','.join('?' * len(chunk))})",
                (parser, version, *chunk),
            )
            found.update((caption, _decode(blob)) for caption, blob in rows)
        return found

    def put_many(self, parser: str, version: str, items: Iterable[tuple[str, list[Phrase]]]) -> None:
        """Store and commit; an existing entry for the same key is replaced, never duplicated."""
        self._db.executemany(
            "INSERT OR REPLACE INTO parses (parser, version, caption, phrases) VALUES (?, ?, ?, ?)",
            ((parser, version, caption, _encode(phrases)) for caption, phrases in items),
        )
        self._db.commit()

    def count(self, parser: str, version: str) -> int:
        return self._db.execute(
            "SELECT COUNT(*) FROM parses WHERE parser = ? AND version = ?", (parser, version)
        ).fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ParseCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CachedParser:
    """A caption parser behind the cache: same interface, parses only what is missing.

    `hits` and `misses` count captions answered from the cache and parsed afresh (repeated
    captions within one call are parsed once)."""

    def __init__(self, parser: CaptionParser, cache: ParseCache, commit_every: int = 64):
        self.parser = parser
        self.cache = cache
        self.commit_every = commit_every
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.parser.name

    @property
    def version(self) -> str:
        return self.parser.version

    def parse(self, caption: str) -> list[Phrase]:
        return next(self.parse_many([caption]))

    def parse_many(self, captions: Iterable[str], batch_size: int = 256) -> Iterator[list[Phrase]]:
        """Look captions up a chunk at a time; the misses of all chunks go to ONE lazy
        `parse_many` call on the wrapped parser, so a multi-process parser starts its workers
        once. Each result is stored as it arrives, committed every `commit_every` results and,
        in `finally`, on any exception or interrupt."""
        it = iter(captions)
        chunks: deque[tuple[list[str], dict[str, list[Phrase]], list[str]]] = deque()  # (chunk, found, missing)
        feed: deque[str] = deque()  # misses not yet handed to the parser

        def next_chunk() -> bool:
            chunk = list(islice(it, batch_size))
            if not chunk:
                return False
            found = self.cache.get_many(self.name, self.version, chunk)
            missing = [c for c in dict.fromkeys(chunk) if c not in found]
            self.hits += len(chunk) - len(missing)
            chunks.append((chunk, found, missing))
            feed.extend(missing)
            return True

        def misses() -> Iterator[str]:
            while feed or next_chunk():
                if feed:
                    yield feed.popleft()

        results = self.parser.parse_many(misses(), batch_size)
        pending: list[tuple[str, list[Phrase]]] = []
        try:
            while chunks or next_chunk():
                chunk, found, missing = chunks[0]
                for caption in missing:  # the parser answers in feed order, chunk after chunk
                    found[caption] = next(results)
                    pending.append((caption, found[caption]))
                    self.misses += 1
                    if len(pending) >= self.commit_every:
                        self.cache.put_many(self.name, self.version, pending)
                        pending = []
                chunks.popleft()
                for caption in chunk:
                    yield found[caption]
        finally:
            if pending:
                self.cache.put_many(self.name, self.version, pending)
