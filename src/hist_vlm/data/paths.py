"""Where a record's image may lie: under its root, and nowhere else unless the caller says so.

A dataset record names its image (or mask) by a path relative to an image root. A record whose
path is absolute (`/etc/passwd`), climbs out with `..`, or reaches through a symbolic link inside
the root to a file outside it would make a reader open whatever it points at. Every reader in
`hist_vlm.data` resolves its records' paths here and refuses such a path with one line naming
the file, the record and the path. The root itself may be a symbolic link (it is resolved too).

`allow_absolute=True` (the readers' `allow_absolute_paths`, `data.allow_absolute_paths` in a
config, `--allow-absolute-paths` on the command line) is the explicit opt-in for records that are
trusted: the path is then used as written (an absolute one as it is, a relative one under the
root, `..` and links followed), as before this check existed.

The check is lexical first (absolute, or `..` above the root), then by resolving the path with
`os.path.realpath`. `Containment` caches the resolution of each folder, so checking the 2 million
records of a VQA training set costs one `lstat` per distinct image. Never imports torch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["Containment", "PathEscapeError", "contained", "escapes"]

OPT_IN = "allow_absolute_paths (--allow-absolute-paths)"


class PathEscapeError(ValueError):
    """A record's path leads outside its root; the message is one line naming it."""


def escapes(path: str | os.PathLike) -> str | None:
    """Why `path` leads outside any root by its text alone (absolute, `..` above it), else None.
    For converters and readers that do not know the root yet."""
    text = os.fspath(path)
    if "\0" in text:
        return "holds a NUL byte"
    if os.path.isabs(text):
        return "is absolute"
    norm = os.path.normpath(text)
    if norm == ".." or norm.startswith(".." + os.sep):
        return "climbs above the root with '..'"
    return None


class Containment:
    """Paths under one `root`: `check(path, where=...)` is `root / path`, or an error."""

    def __init__(self, root: str | os.PathLike, *, allow_absolute: bool = False) -> None:
        self.root = Path(root)
        self.allow_absolute = allow_absolute
        self._real_root: str | None = None
        self._real_dirs: dict[str, str] = {}
        self._seen: dict[str, str | None] = {}   # path -> reason: many records share an image

    def reason(self, path: str | os.PathLike) -> str | None:
        """Why `root / path` lies outside the root, or None (always None with `allow_absolute`)."""
        if self.allow_absolute:
            return None
        key = os.fspath(path)
        if key not in self._seen:
            self._seen[key] = self._reason(key)
        return self._seen[key]

    def _reason(self, path: str) -> str | None:
        why = escapes(path)
        if why is not None:
            return why
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        joined = os.path.join(self.root, path)
        parent, name = os.path.split(joined)
        if name in ("", ".", ".."):
            real = os.path.realpath(joined)
        else:
            real_parent = self._real_dirs.get(parent)
            if real_parent is None:
                real_parent = self._real_dirs[parent] = os.path.realpath(parent)
            real = os.path.join(real_parent, name)
            if os.path.islink(real):
                real = os.path.realpath(real)
        root = self._real_root
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return None
        return f"resolves to {real} (a symbolic link out of the root)"

    def check(self, path: str | os.PathLike, *, where: str = "", what: str = "image",
              error: Callable[[str], Exception] = PathEscapeError) -> Path:
        """`root / path` when it lies under the root (or `allow_absolute`); else raises
        `error(message)`, a one-line message "<where>: <what> <path> <why> ...". """
        self.verify(path, where=where, what=what, error=error)
        return self.root / path

    def verify(self, path: str | os.PathLike, *, where: str = "", what: str = "image",
               error: Callable[[str], Exception] = PathEscapeError) -> None:
        """`check` without building the path (for a pass over millions of records)."""
        why = self.reason(path)
        if why is not None:
            prefix = f"{where}: " if where else ""
            raise error(f"{prefix}{what} {os.fspath(path)!r} {why}, outside the image root {self.root}; "
                        f"refused (pass {OPT_IN} to read paths outside the root)")


def contained(root: str | os.PathLike, path: str | os.PathLike, *, allow_absolute: bool = False,
              where: str = "", what: str = "image",
              error: Callable[[str], Exception] = PathEscapeError) -> Path:
    """`root / path` if it stays under `root` once resolved (symbolic links included), else
    `error(one line naming where, what and path)`; `allow_absolute=True` skips the check."""
    return Containment(root, allow_absolute=allow_absolute).check(path, where=where, what=what, error=error)
