"""One process per folder: a second real process is refused with one line naming the holder's
PID, and a killed holder never blocks the next one."""
import os
import signal
import subprocess
import sys
import time

import pytest

from hist_vlm.locks import FolderInUseError, folder_lock

HOLD = ("import sys, time; from hist_vlm.locks import folder_lock\n"
        "with folder_lock(sys.argv[1], 'training run'):\n    print('held', flush=True); time.sleep(60)\n")


def hold_in_child(folder):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_process_is_refused_naming_the_holder_and_a_kill_frees_the_folder(tmp_path):
    child = hold_in_child(tmp_path / "run")
    try:
        with pytest.raises(FolderInUseError) as err:
            with folder_lock(tmp_path / "run", "training run"):
                pass
        assert f"in use by another training run (process {child.pid})" in str(err.value)
        assert "\n" not in str(err.value)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with folder_lock(tmp_path / "run"):                         # the OS released it
        assert (tmp_path / "run" / ".lock").read_text() == f"{os.getpid()}\n"


def test_the_lock_is_released_after_the_block_and_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path):
            raise RuntimeError("boom")
    start = time.perf_counter()
    with folder_lock(tmp_path):
        pass
    assert time.perf_counter() - start < 1
