"""Atomic writes, for files and for folders: everything is built in a temp beside the target and
renamed onto it only once complete, so a crash, an exception or a kill -9 never leaves a
half-written output behind (readers see the previous version or the new one, never a mix).

- `atomic_file(path, mode)`: an open file (text "w" or binary "wb"); flushed, fsync'd, then
  `os.replace`d onto `path` when the block exits without an exception.
- `atomic_path(path)`: the same, yielding the temp's PATH, for writers that want a filename
  (`savefig`, `safetensors.save_file`, `PIL.Image.save`, `torch.save`).
- `atomic_dir(path)`: a temp folder, put in place of `path` on success.
- `atomic_files(*paths)`: several outputs as a set: all temps written, then all renamed.
- `atomic_write_bytes/text/lines`: one-call wrappers over `atomic_file`.

Temps are named `.{name}.tmp-{pid}{suffix}`: hidden, in the target's folder (a rename across file
systems would not be atomic), with the target's suffix last so that a library choosing the format
from the file name (matplotlib, PIL) still sees it. An exception inside the block removes the temp;
a killed process cannot, so a process's first write into a folder calls `remove_stale_temps`, which
removes the temps there whose pid is no longer alive: the next run of the same command cleans up.
Files and folders are created with the normal umask permissions (0o666 / 0o777 & ~umask), not
`mkstemp`'s 0o600.

Liveness is checked by pid on this machine, in this pid namespace: do not let processes of two
machines (or containers) write the same target on a shared file system (they would race anyway).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import IO, Iterable, Iterator

__all__ = [
    "atomic_dir",
    "atomic_file",
    "atomic_files",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_lines",
    "atomic_write_text",
    "remove_stale_temps",
]

# `.{name}.tmp-{pid}{suffix}`: a temp being written; `.{name}.old-{pid}{suffix}`: the previous
# version of a folder, moved aside by `atomic_dir` between its two renames.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?P<suffix>(\.[^.]*)?)$")


def _temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}{path.suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        # Not a temp this process is writing (each helper removes its own temp before it
        # returns or raises): a leftover of an earlier process that had the same pid, as
        # happens when a container restarts its command in a fresh pid namespace.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be fsync'd)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temps of target `name` in `folder` (of every target with `name=None`) that a
    killed process left: those whose pid is no longer alive. Temps of live processes are kept.

    A folder moved aside by `atomic_dir` (`.{name}.old-{pid}`) is removed too, except when a kill
    between `atomic_dir`'s two renames left no `name` at all: then it is renamed back to `name`
    (the previous version, complete) and the dead process's new folder is removed.
    A temp carrying this process's own pid counts as dead (see `_pid_alive`): the helpers do not
    support two threads of one process writing the same target at once.
    Returns the paths removed (a restored folder is not listed)."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    stale: list[tuple[str, str, Path]] = []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        if m["suffix"] != Path(m["name"]).suffix or _pid_alive(int(m["pid"])):
            continue
        stale.append((m["name"], m["kind"], Path(entry.path)))
    removed = []
    for target, kind, temp in sorted(stale, key=lambda t: t[1] != "old"):  # "old" first
        if kind == "old" and not os.path.lexists(folder / target):
            os.replace(temp, folder / target)
            continue
        _remove(temp)
        removed.append(temp)
    return removed


def _create(path: str | Path, flags: int = 0) -> int:
    """A new file (never an existing one), with the umask's permissions, unlike mkstemp's 0o600."""
    return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)


#: folders this process has already cleaned (a scan per write would make writing n files into
#: one folder cost n^2: the synthetic world writes thousands of images into one)
_cleaned: set[Path] = set()


def _claim(path: Path, parents: bool) -> Path:
    """Create `path`'s folder (with `parents`); on this process's first write into that folder,
    remove every dead temp in it; this process's temp name."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    if folder not in _cleaned:
        remove_stale_temps(folder)
        _cleaned.add(folder)
    return _temp_name(path)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str = "utf-8", *, parents: bool = True) -> Iterator[IO]:
    """`with atomic_file(path) as f: f.write(...)`: `f` is a temp beside `path`, flushed,
    fsync'd and `os.replace`d onto `path` when the block exits normally; on an exception the
    temp is removed and any previous `path` is left as it was. `mode`: "w" (text, `encoding`)
    or "wb". Streamed outputs are written to the temp as they go and appear at the end.
    `path`'s folder is created unless `parents=False` (then a missing one is a FileNotFoundError)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path, parents=parents) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str | Path, *, parents: bool = True) -> Iterator[Path]:
    """`with atomic_path(out) as tmp: fig.savefig(tmp)`: as `atomic_file`, for writers that
    take a file name. `tmp` exists (empty, umask permissions) and ends with `path`'s suffix."""
    path = Path(path)
    tmp = _claim(path, parents)
    os.close(_create(tmp))
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, fsync: bool = True, parents: bool = True) -> Iterator[Path]:
    """`with atomic_dir(folder) as tmp: ...write into tmp...`: `tmp` is a new empty folder
    beside `path`; when the block exits normally it takes `path`'s place (its files fsync'd
    first unless `fsync=False`); on an exception it is removed and `path` is left as it was.

    A folder cannot be `os.replace`d onto a non-empty one, so an existing `path` is first renamed
    aside to `.{name}.old-{pid}`, the new folder renamed in, then the old one deleted. A kill
    between the two renames leaves no `path`, the previous version complete in `.{name}.old-{pid}`
    and the new one complete in `.{name}.tmp-{pid}`: the next `atomic_dir` (or
    `remove_stale_temps`) of the same target renames the previous version back and removes the
    other. A kill before the first rename leaves `path` untouched (and a stale temp); after the
    second, the new `path` (and an old folder for the next run to remove)."""
    path = Path(path)
    tmp = _claim(path, parents)
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        if fsync:
            for root, _, files in os.walk(tmp):
                for f in files:
                    _fsync_file(Path(root) / f)
                _fsync_dir(Path(root))
        if os.path.lexists(path):
            old = _temp_name(path, "old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _fsync_dir(path.parent)
            _remove(old)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_files(*paths: str | Path, parents: bool = True) -> Iterator[list[Path]]:
    """`with atomic_files(a, b) as (ta, tb): ...write both...`: outputs replaced as a set. Every
    temp is written in the block; only then are they renamed onto their targets, one after the
    other. An exception in the block leaves every previous file as it was; a kill during the
    renames (microseconds) can leave some new files beside some old ones."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p, parents=parents)) for p in paths]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` as UTF-8, byte for byte (no newline translation)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_lines(path: str | Path, lines: Iterable[str]) -> int:
    """Stream `lines` (each written with a trailing newline) to a temp file beside `path`, then
    `os.replace` it: for outputs too large to hold in memory. Returns the number of lines."""
    n = 0
    with atomic_file(path, "w") as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    return n
