"""`hist-vlm demo` stopped from outside: its fine-tuning workers end with it (SIGTERM: the
parent kills them; SIGKILL: Linux's parent-death signal), and one demo holds its folder."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")


def _demo(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from hist_vlm.cli import main; main()", "demo", "--quick", "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _children(pid: int) -> set[int]:
    """Every living process whose parent is `pid`, and theirs."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, parent in parents.items() if parent == p}
        found |= kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"   # a zombie has ended; only its parent's wait is missing


def _workers(pid: int) -> set[int]:
    """The fine-tuning workers of a demo process (spawned multiprocessing children)."""
    out = set()
    for child in _children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.add(child)
        except OSError:
            pass
    return out


def _wait_for_workers(proc, timeout=180) -> set[int]:
    deadline = time.monotonic() + timeout
    while not _workers(proc.pid):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the demo never started its fine-tuning workers"
        time.sleep(0.2)
    time.sleep(1.0)   # the workers' own children (DataLoader workers), if any, start too
    return _children(proc.pid)


def _survivors(pids: set[int], wait: float = 15.0) -> set[int]:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return {p for p in pids if _alive(p)}


def test_a_stopped_demo_leaves_no_worker_and_one_demo_holds_its_folder(tmp_path):
    out = tmp_path / "demo"
    procs = []
    try:
        # 1. SIGTERM: the parent stops its workers itself, says so in one line, exit code 143
        procs.append(first := _demo(out))
        family = _wait_for_workers(first)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
        assert first.returncode == 143, err
        shown = [line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1].strip()]
        assert shown[-1] == "error: terminated (SIGTERM)" and "Traceback" not in err, err
        assert _survivors(family) == set()

        # 2. a second demo while one holds the folder: one line naming the holder's PID
        procs.append(second := _demo(out))
        family = _wait_for_workers(second)
        third = subprocess.run([sys.executable, "-c", "from hist_vlm.cli import main; main()", "demo", "--quick",
                                "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert third.returncode == 2, third.stderr
        assert third.stderr.strip().splitlines() == [
            f"error: {out} is in use by another demo (process {second.pid}): wait for it to end, or use another folder"]

        # 3. SIGKILL of the parent: no cleanup code runs, the parent-death signal ends the workers
        second.kill()
        second.wait(timeout=30)
        assert _survivors(family) == set()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
