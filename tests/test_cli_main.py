"""The command line as the console entry point runs it (hist_vlm.cli.main -> run): usage
mistakes are one line."""
import pytest

from hist_vlm.cli import run


@pytest.mark.parametrize("argv, message", [
    (["eval", "pointing", "demo_tiny", "--checkpoint", "/nonexistent", "--data", "synthetic"],
     "error: Invalid value: /nonexistent: checkpoint not found"),
    (["eval", "pointing"], "error: Missing argument 'config'."),
    (["eval", "retrieval", "demo_tiny", "--checkpoint", "x", "--data", "coco", "--batch-size", "0"],
     "error: Invalid value for '--batch-size':"),
    (["nope"], "error: No such command 'nope'."),
    (["train", "demo_tinny"], "error: config file not found: demo_tinny"),
])
def test_usage_mistakes_are_one_error_line_and_exit_code_2(argv, message, capsys):
    assert run(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.err
    assert "Usage:" not in out.err and "╭" not in out.err and "Traceback" not in out.err


def test_help_and_a_successful_command_exit_0(capsys):
    assert run(["--help"]) == 0
    assert "Usage: hist-vlm" in capsys.readouterr().out
    assert run(["parse", "--text", "a red dog and a cat"]) == 0
    assert "'a red dog'" in capsys.readouterr().out
