"""Every command the README shows is a real one, so the guide cannot go stale: each `hist-vlm`
line goes through the real command line (sub-command, options, their types, arguments) with
every command's body replaced by a recorder, its presets exist, and its `key=value` overrides
build a valid config; each `make` line names a Makefile target. (`make demo` and `make test`
themselves run the demo and this suite.) The user's paths in the README are placeholders, so
no command body runs here.
"""
import functools
import re
import shlex
from pathlib import Path

import pytest

from hist_vlm.cli import app, run
from hist_vlm.train.config import load_config, preset_names

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 250


def readme_commands(text: str) -> list[str]:
    """The command lines of the README's ```bash blocks, comments stripped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def command_infos():
    """(full name, Typer's record of the command) for every command and sub-command."""
    for info in app.registered_commands:
        yield info.name or info.callback.__name__.replace("_", "-"), info
    for group in app.registered_groups:
        for info in group.typer_instance.registered_commands:
            yield f"{group.name} {info.name or info.callback.__name__.replace('_', '-')}", info


@pytest.fixture
def recorded(monkeypatch):
    """Every command's body replaced by one that records (command, its arguments); Typer reads
    the same signature, so parsing is the real one."""
    calls = []
    for name, info in command_infos():
        def record(*args, _name=name, **kwargs):
            calls.append((_name, kwargs))
        monkeypatch.setattr(info, "callback", functools.wraps(info.callback)(record))
    return calls


README_TEXT = README.read_text()
COMMANDS = readme_commands(README_TEXT)
HIST_VLM = [line for line in COMMANDS if line.startswith("hist-vlm ")]


def test_the_readme_is_a_short_guide_with_the_two_commands_and_a_command_table():
    assert len(README_TEXT.splitlines()) <= MAX_LINES
    assert "make demo" in COMMANDS and "make test" in COMMANDS
    assert len(HIST_VLM) >= 10
    missing = [name for name, _ in command_infos() if f"| `hist-vlm {name}` |" not in README_TEXT]
    assert missing == []


@pytest.mark.parametrize("line", HIST_VLM)
def test_each_hist_vlm_command_parses_with_real_options_presets_and_overrides(line, recorded, capsys):
    assert run(shlex.split(line)[1:]) == 0, capsys.readouterr().err
    (name, kwargs), = recorded
    presets = set(preset_names())
    if name == "train":
        assert kwargs["config"] in presets
        load_config(kwargs["config"], kwargs["overrides"] or [])   # every override: a real key, a valid value
    elif name == "demo":
        load_config(kwargs["config"], kwargs["override"])
    elif kwargs.get("config") is not None:                           # eval ..., ground: the checkpoint's preset
        assert str(kwargs["config"]) in presets


def test_each_make_line_is_a_makefile_target():
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    for line in COMMANDS:
        if line.startswith("make "):
            assert line.split()[1] in targets, line


@pytest.mark.parametrize("line, error", [
    ("hist-vlm eval pointin albef_vg --checkpoint x", "No such command"),
    ("hist-vlm eval pointing albef_vg --checkpoint x --layer-s 1", "No such option"),
    ("hist-vlm demo --seeds two", "Invalid value for '--seeds'"),
])
def test_the_check_catches_a_stale_command(line, error, recorded, capsys):
    assert run(shlex.split(line)[1:]) == 2
    assert error in capsys.readouterr().err and recorded == []


def test_the_check_catches_a_stale_override():
    from hist_vlm.train.config import ConfigError

    with pytest.raises(ConfigError):
        load_config("albef_coco", ["optim.learning_rate=1e-5"])
