"""hist_vlm._io: atomic writes of files and folders, stale-temp cleanup, a real kill -9."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hist_vlm._io import (
    atomic_dir,
    atomic_file,
    atomic_path,
    atomic_write_bytes,
    atomic_write_lines,
    atomic_write_text,
    remove_stale_temps,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_text_and_binary(tmp_path):
    out = tmp_path / "sub" / "a.json"  # the folder is created
    with atomic_file(out) as f:
        f.write("héllo\n")
    assert out.read_bytes() == "héllo\n".encode("utf-8")
    with atomic_file(out, "wb") as f:
        f.write(b"\x00\x01")
    assert out.read_bytes() == b"\x00\x01"
    assert _entries(out.parent) == ["a.json"]  # no temp left
    with pytest.raises(ValueError, match="mode"):
        with atomic_file(out, "a"):
            pass


def test_temp_is_beside_target_with_its_suffix(tmp_path):
    out = tmp_path / "fig.png"
    with atomic_file(out) as f:
        tmp = Path(f.name)
        assert tmp.parent == tmp_path and tmp.name == f".fig.png.tmp-{os.getpid()}.png"
        assert not out.exists()  # nothing at the target until the block ends
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.is_file()


def test_wrappers(tmp_path):
    atomic_write_bytes(tmp_path / "b", b"xyz")
    atomic_write_text(tmp_path / "t", "a\nb\n")
    assert atomic_write_lines(tmp_path / "l", iter(["1", "2", "3"])) == 3
    assert (tmp_path / "b").read_bytes() == b"xyz"
    assert (tmp_path / "t").read_text() == "a\nb\n"
    assert (tmp_path / "l").read_text() == "1\n2\n3\n"
    assert _entries(tmp_path) == ["b", "l", "t"]


@pytest.mark.parametrize("helper", ["file", "path", "lines"])
def test_exception_keeps_previous_and_removes_temp(tmp_path, helper):
    out = tmp_path / "out.txt"
    out.write_text("previous\n")

    def rows():
        yield "new"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        if helper == "file":
            with atomic_file(out) as f:
                f.write("new, half")
                raise RuntimeError("boom")
        elif helper == "path":
            with atomic_path(out) as tmp:
                tmp.write_text("new, half")
                raise RuntimeError("boom")
        else:
            atomic_write_lines(out, rows())
    assert out.read_text() == "previous\n"
    assert _entries(tmp_path) == ["out.txt"]


def test_exception_without_previous_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "x.jsonl") as f:
            f.write("{}\n")
            raise KeyboardInterrupt
    assert _entries(tmp_path) == []


def test_permissions_follow_umask(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.txt", "a")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"b")
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("f")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_dead_temps_removed_by_the_first_write_into_the_folder_live_kept(tmp_path):
    """A process's first write into a folder removes every target's dead temps there (one scan
    per folder, not per file); temps of live processes stay."""
    out = tmp_path / "fig.png"
    dead = tmp_path / f".fig.png.tmp-{_dead_pid()}.png"
    live = tmp_path / f".fig.png.tmp-{os.getppid()}.png"  # our parent: alive
    other = tmp_path / f".other.png.tmp-{_dead_pid()}.png"  # another target's, also dead
    for p in (dead, live, other):
        p.write_bytes(b"half")
    atomic_write_bytes(out, b"png")
    assert out.read_bytes() == b"png"
    assert not dead.exists() and live.exists() and not other.exists()
    again = tmp_path / f".other.png.tmp-{_dead_pid()}.png"
    again.write_bytes(b"half")
    assert remove_stale_temps(tmp_path, "fig.png") == []          # only that target's
    assert remove_stale_temps(tmp_path) == [again]                 # every target's dead temps
    assert _entries(tmp_path) == sorted([live.name, "fig.png"])


def test_atomic_dir_new_and_replacing(tmp_path):
    target = tmp_path / "step-00000010"
    with atomic_dir(target) as d:
        assert d.parent == tmp_path and d.name.startswith(".step-00000010.tmp-")
        (d / "model").mkdir()
        (d / "model" / "w.bin").write_bytes(b"v1")
        (d / "state.json").write_text("1")
    assert (target / "model" / "w.bin").read_bytes() == b"v1"
    with atomic_dir(target) as d:  # replaces the existing folder as a whole
        (d / "state.json").write_text("2")
    assert _entries(target) == ["state.json"] and (target / "state.json").read_text() == "2"
    assert _entries(tmp_path) == ["step-00000010"]  # no temp, no old copy left


def test_atomic_dir_exception_keeps_previous(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "state.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "state.json").write_text("new")
            raise RuntimeError
    assert (target / "state.json").read_text() == "old"
    assert _entries(tmp_path) == ["ckpt"]


def test_kill_between_atomic_dir_renames_restores_previous(tmp_path):
    # what a kill between the two renames leaves: no target, the old one aside, the new one
    pid = _dead_pid()
    old, new = tmp_path / f".ckpt.old-{pid}", tmp_path / f".ckpt.tmp-{pid}"
    old.mkdir()
    (old / "state.json").write_text("old")
    new.mkdir()
    (new / "state.json").write_text("new")
    assert remove_stale_temps(tmp_path, "ckpt") == [new]
    assert _entries(tmp_path) == ["ckpt"] and (tmp_path / "ckpt" / "state.json").read_text() == "old"


_CHILD = textwrap.dedent("""
    import sys, time
    from hist_vlm._io import atomic_file
    with atomic_file(sys.argv[1]) as f:
        f.write("new content, half written")
        f.flush()
        print("ready", flush=True)
        time.sleep(120)
        f.write(" and the rest")
""")


def test_sigkill_mid_write_keeps_old_and_rerun_cleans(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text("old\n")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        temp = tmp_path / f".results.jsonl.tmp-{child.pid}.jsonl"
        assert temp.read_text() == "new content, half written"
        remove_stale_temps(tmp_path, out.name)  # the writer is alive: its temp is kept
        assert temp.exists()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert out.read_text() == "old\n"  # the kill left the previous file intact
    assert temp.exists()  # ... and a stale temp, which the next write removes
    atomic_write_text(out, "rerun\n")
    assert out.read_text() == "rerun\n"
    assert _entries(tmp_path) == ["results.jsonl"]


def test_atomic_file_parents_false_needs_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_file(tmp_path / "missing" / "o.jsonl", parents=False) as f:
            f.write("x")
    assert _entries(tmp_path) == []


def test_save_checkpoint_is_an_atomic_dir_and_cleans_killed_saves(tmp_path):
    torch = pytest.importorskip("torch")
    from hist_vlm.train.checkpoint import Position, latest_checkpoint, save_checkpoint

    class Tiny(torch.nn.Linear):
        def save_pretrained(self, directory):
            Path(directory).mkdir(parents=True)
            (Path(directory) / "w.txt").write_text(str(self.weight.sum().item()))

    model = Tiny(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    pid = _dead_pid()
    (root / f".step-00000009.tmp-{pid}").mkdir()                      # a killed save, another step
    (root / f".tmp-step-00000001-{pid}").mkdir()                      # a killed save, old naming
    (root / f".step-00000003.tmp-{os.getppid()}").mkdir()             # a live writer's: kept

    def save(step):
        return save_checkpoint(tmp_path / "run", model=model, objective=torch.nn.Module(), optimizer=opt,
                               scheduler=sched, position=Position(global_step=step), rng_states=[{}],
                               config={"step": step}, keep=2)

    for step in (1, 2, 2, 3):  # step 2 twice: the second replaces the first as a whole
        assert save(step) == root / f"step-{step:08d}"
    assert _entries(root) == [f".step-00000003.tmp-{os.getppid()}", "step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path / "run") == root / "step-00000003"
    assert sorted(p.name for p in (root / "step-00000003").iterdir()) == [
        "config.yaml", "loss.safetensors", "model", "optimizer.pt", "rng.pt", "scheduler.pt", "state.json"]
