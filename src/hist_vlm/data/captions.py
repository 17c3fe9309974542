"""Caption file readers: COCO captions, Visual Genome region descriptions, ALBEF/SelfEQ json
lists and plain JSONL, all turned into one stream of (image key, [captions]).

Every caption is cleaned the same way (whitespace collapsed; empty ones skipped; very long
ones cut at a word boundary) and counted in `ReadStats`. A malformed file raises
`CaptionFileError`, whose message names the file and the record: the CLI prints it as one line.
JSONL is read line by line and Visual Genome's json (700 MB) record by record (ijson); the
other json formats are single documents and are loaded whole. Never imports torch.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import ijson

__all__ = [
    "FORMATS",
    "MAX_CAPTION_CHARS",
    "CaptionFileError",
    "ReadStats",
    "clean_caption",
    "read_captions",
]

FORMATS = ("coco", "vg", "albef", "jsonl")

# Longer captions are cut at the last word boundary before this many characters. Training
# truncates texts at ~30-50 tokens anyway (ALBEF's pre_caption keeps 50 words); 300
# characters is well beyond that and keeps a runaway record from stalling the parser.
MAX_CAPTION_CHARS = 300


class CaptionFileError(ValueError):
    """A user's caption file is unusable; the message names the file and the record."""

    def __init__(self, path: str | Path, record: str | None, message: str):
        where = f"{path}: {record}" if record else f"{path}"
        super().__init__(f"{where}: {message}")


@dataclass
class ReadStats:
    """What the reader yielded and what it dropped or changed, for the CLI summary."""

    images: int = 0
    captions: int = 0
    skipped_empty: int = 0
    truncated: int = 0
    images_without_captions: int = 0


def clean_caption(text: str, max_chars: int = MAX_CAPTION_CHARS) -> tuple[str, bool]:
    """Collapse whitespace and cut at a word boundary; returns (caption, was_truncated)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text, False
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[: cut if cut > 0 else max_chars].rstrip(), True


def read_captions(
    path: str | Path,
    fmt: str,
    stats: ReadStats | None = None,
    max_chars: int = MAX_CAPTION_CHARS,
) -> Iterator[tuple[str, list[str]]]:
    """Yield (image key, cleaned captions) per image, in file order. Images left without a
    usable caption are counted in `stats.images_without_captions` and not yielded."""
    if fmt not in _READERS:
        raise CaptionFileError(path, None, f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")
    stats = stats if stats is not None else ReadStats()
    path = Path(path)
    for key, captions, where in _READERS[fmt](path):
        kept = []
        for n, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise CaptionFileError(
                    path, f"{where} caption {n}", f"caption must be a string, got {type(caption).__name__}"
                )
            text, truncated = clean_caption(caption, max_chars)
            if not text:
                stats.skipped_empty += 1
                continue
            stats.truncated += truncated
            kept.append(text)
        if not kept:
            stats.images_without_captions += 1
            continue
        stats.images += 1
        stats.captions += len(kept)
        yield key, kept


# --- file access -------------------------------------------------------------------------


def _open_binary(path: Path):
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise CaptionFileError(path, None, "no such file") from None
    except IsADirectoryError:
        raise CaptionFileError(path, None, "is a directory, expected a file") from None
    except PermissionError:
        raise CaptionFileError(path, None, "permission denied") from None


def _decode(raw: bytes, path: Path, where: str | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CaptionFileError(path, where, f"invalid UTF-8 at byte {e.start}") from None


def _load_json(path: Path) -> Any:
    with _open_binary(path) as f:
        text = _decode(f.read(), path, None)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CaptionFileError(path, None, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _stream_items(path: Path, prefix: str = "item", label: str = "[{}]") -> Iterator[tuple[str, Any]]:
    """(record label, record) for each element of the JSON array at `prefix` ("item": the top
    level), read one at a time: memory stays flat for any file size, and a broken tail is an
    error only when the reader gets there. Numbers come as int or float."""
    with _open_binary(path) as f:
        if prefix == "item":  # ijson finds no items in a non-array: say what the top level is
            head = f.read(1)
            while head.isspace():
                head = f.read(1)
            if head != b"[":
                kind = {b"{": "dict", b'"': "str", b"": "nothing"}.get(head, "a scalar")
                raise CaptionFileError(path, "top level", f"the top level must be a list, got {kind}")
            f.seek(0)
        n = 0  # the record being read
        try:
            for item in ijson.items(f, prefix, use_float=True):
                yield label.format(n), item
                n += 1
        except ijson.JSONError as e:
            msg = e.args[0] if e.args else e
            msg = (msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)).splitlines()[0]
            raise CaptionFileError(path, label.format(n), f"invalid JSON ({msg})") from None


def _field(record: Any, names: tuple[str, ...], path: Path, where: str) -> Any:
    """The first of `names` present in a JSON object, else a one-line error."""
    if not isinstance(record, dict):
        raise CaptionFileError(path, where, f"expected a JSON object, got {type(record).__name__}")
    for name in names:
        if name in record:
            return record[name]
    raise CaptionFileError(path, where, f"missing field {' or '.join(repr(n) for n in names)}")


def _image_key(value: Any, path: Path, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CaptionFileError(path, where, f"image must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _list(value: Any, path: Path, where: str, what: str) -> list:
    if not isinstance(value, list):
        raise CaptionFileError(path, where, f"{what} must be a list, got {type(value).__name__}")
    return value


# --- formats: each yields (image key, raw captions, record label) --------------------------

_Raw = Iterator[tuple[str, list, str]]


def _read_coco(path: Path) -> _Raw:
    """`captions_train2014.json`: images[{id, file_name}], annotations[{image_id, caption}].
    The key is the image's file_name; images come in the order of `images`."""
    data = _load_json(path)
    images = _list(_field(data, ("images",), path, "top level"), path, "images", "images")
    annotations = _list(_field(data, ("annotations",), path, "top level"), path, "annotations", "annotations")
    names: dict[Any, str] = {}
    for n, img in enumerate(images):
        where = f"images[{n}]"
        names[_field(img, ("id",), path, where)] = _image_key(_field(img, ("file_name",), path, where), path, where)
    grouped: dict[Any, list] = defaultdict(list)
    for n, ann in enumerate(annotations):
        where = f"annotations[{n}]"
        image_id = _field(ann, ("image_id",), path, where)
        if image_id not in names:
            raise CaptionFileError(path, where, f"image_id {image_id!r} is not in images")
        grouped[image_id].append(_field(ann, ("caption",), path, where))
    for n, image_id in enumerate(names):
        yield names[image_id], grouped.get(image_id, []), f"images[{n}]"


def _read_vg(path: Path) -> _Raw:
    """`region_descriptions.json`: [{"id" | "image_id", "regions": [{"phrase", ...}]}]; the key
    is the image id, the captions are the region phrases."""
    for where, rec in _stream_items(path):
        key = _image_key(_field(rec, ("id", "image_id"), path, where), path, where)
        regions = _list(_field(rec, ("regions",), path, where), path, where, "regions")
        phrases = [_field(r, ("phrase",), path, f"{where}.regions[{m}]") for m, r in enumerate(regions)]
        yield key, phrases, where


def _read_albef(path: Path) -> _Raw:
    """ALBEF/SelfEQ lists: [{"image": ..., "caption": str | [str]}]; records that share an
    image are merged, in order of first appearance."""
    data = _list(_load_json(path), path, "top level", "the top level")
    grouped: dict[str, list] = {}
    first: dict[str, str] = {}
    for n, rec in enumerate(data):
        where = f"[{n}]"
        key = _image_key(_field(rec, ("image",), path, where), path, where)
        caption = _field(rec, ("caption",), path, where)
        grouped.setdefault(key, []).extend(caption if isinstance(caption, list) else [caption])
        first.setdefault(key, where)
    for key, captions in grouped.items():
        yield key, captions, first[key]


def _read_jsonl(path: Path) -> _Raw:
    """One {"image": ..., "captions": [...]} per line, streamed; blank lines are ignored."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"line {lineno}"
            line = _decode(raw, path, where).strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaptionFileError(path, where, f"invalid JSON at column {e.colno}: {e.msg}") from None
            key = _image_key(_field(rec, ("image",), path, where), path, where)
            yield key, _list(_field(rec, ("captions",), path, where), path, where, "captions"), where


_READERS: dict[str, Any] = {"coco": _read_coco, "vg": _read_vg, "albef": _read_albef, "jsonl": _read_jsonl}
