"""Without the `[train]` extra (no torch) the model commands say, in one line, what to install;
`parse` keeps working. Each case runs the real entry point in a fresh interpreter."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hist_vlm.cli.app import INSTALL_TRAIN_EXTRA, NEEDS_TRAIN_EXTRA, TRAIN_EXTRA_MODULES

REPO = Path(__file__).resolve().parent.parent
# `import torch` fails as it does on an install without the extra
BLOCK_TORCH = "import sys; sys.modules['torch'] = None; "
RUN_CLI = "from hist_vlm.cli import main; sys.argv = ['hist-vlm', *sys.argv[1:]]; main()"


def run_cli(args, tmp_path, prelude=BLOCK_TORCH, env_extra=None):
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", prelude + RUN_CLI, *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)


@pytest.mark.parametrize("args", [
    ["train", "demo_tiny"],
    ["eval", "pointing", "demo_tiny", "--checkpoint", "x", "--data", "synthetic"],
    ["ground", "image.png", "a dog", "--checkpoint", "x"],
    ["demo", "--quick"],
])
def test_model_commands_name_the_extra_in_one_line(args, tmp_path):
    res = run_cli(args, tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"error: hist-vlm {args[0]}") and INSTALL_TRAIN_EXTRA in line and "torch" in line
    assert list(tmp_path.iterdir()) == []            # nothing ran: no run or demo folder


def test_a_torch_that_fails_to_import_is_reported_the_same_way(tmp_path):
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('libtorch_cpu.so: cannot open shared object file')\n")
    res = run_cli(["train", "demo_tiny"], tmp_path, prelude="import sys; ",
                  env_extra={"PYTHONPATH": str(stub.parent)})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert INSTALL_TRAIN_EXTRA in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_parse_and_help_work_without_torch(tmp_path):
    res = run_cli(["parse", "--text", "a dog chasing a red frisbee"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "'a red frisbee'" in res.stdout and "subject 'frisbee'" in res.stdout
    res = run_cli(["train", "--help"], tmp_path)
    assert res.returncode == 0 and "overrides" in res.stdout


def test_with_torch_the_guard_lets_the_command_run(tmp_path):
    res = run_cli(["train", "no_such_preset"], tmp_path, prelude="import sys; ")
    assert res.returncode == 2 and "presets: " in res.stderr and INSTALL_TRAIN_EXTRA not in res.stderr


def test_the_checked_modules_are_the_train_extra():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    names = {req.split("=")[0].split(">")[0].split("<")[0].strip().lower() for req in extra}
    assert set(TRAIN_EXTRA_MODULES) <= names and TRAIN_EXTRA_MODULES[0] == "torch"
    assert set(NEEDS_TRAIN_EXTRA) == {"train", "eval", "ground", "demo"}
