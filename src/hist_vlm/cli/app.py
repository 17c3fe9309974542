"""The `hist-vlm` Typer app and its entry points (`run`, `main`), and the `[train]` extra check
that the model commands run first."""
from __future__ import annotations

import functools
import importlib.util
import signal
import threading

import typer

app = typer.Typer(
    name="hist-vlm",
    help="HIST: train vision-language models with syntactic structure from captions alone.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """HIST: train vision-language models with syntactic structure from captions alone."""


#: sub-commands (and command groups) that run models: they need the `[train]` extra
NEEDS_TRAIN_EXTRA = ("train", "eval", "ground", "demo")
#: the import names of pyproject.toml's `[train]` extra that the code imports
TRAIN_EXTRA_MODULES = ("torch", "torchvision", "transformers", "timm", "safetensors", "matplotlib")
INSTALL_TRAIN_EXTRA = "pip install 'hist-vlm[train]'"


def missing_train_extra() -> str | None:
    """The first module of the `[train]` extra that is not importable, or None. torch is really
    imported (a broken install fails here, not mid-command); the rest are only looked up."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch"
    for name in TRAIN_EXTRA_MODULES[1:]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            found = False
        if not found:
            return name
    return None


def _requiring_train_extra(command: str, callback):
    """`callback` preceded by the extra check: one line and exit code 2 instead of a
    ModuleNotFoundError traceback. `--help` still works (it never runs the callback)."""

    @functools.wraps(callback)
    def checked(*args, **kwargs):
        missing = missing_train_extra()
        if missing is not None:
            typer.echo(f"error: hist-vlm {command} needs the [train] extra ({missing} is not installed): "
                       f"{INSTALL_TRAIN_EXTRA}", err=True)
            raise typer.Exit(2)
        return callback(*args, **kwargs)

    return checked


def guard_model_commands() -> None:
    """Put the extra check in front of the commands of NEEDS_TRAIN_EXTRA (and of every command
    of such a group). Call it once, after the command modules have registered their commands."""
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        if name in NEEDS_TRAIN_EXTRA:
            info.callback = _requiring_train_extra(name, info.callback)
    for group in app.registered_groups:
        if group.name in NEEDS_TRAIN_EXTRA:
            for info in group.typer_instance.registered_commands:
                sub = info.name or info.callback.__name__.replace("_", "-")
                info.callback = _requiring_train_extra(f"{group.name} {sub}", info.callback)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, as Ctrl-C raises KeyboardInterrupt: the same
    cleanup runs (`finally` blocks, `_io`'s context managers removing their temps, the demo
    killing its workers), and code that handles Ctrl-C handles it too (`stop_code` tells them apart)."""


#: the exit code of a command stopped by a signal: 128 + the signal's number, as a shell reports it
STOP_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def stop_code(error: BaseException) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM (`Terminated`)."""
    return STOP_CODES[signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT]


def stop_message(error: BaseException) -> str:
    return "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted"


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _stopping_cleanly(callback):
    """`callback`, but a Ctrl-C or SIGTERM that reaches its end is ONE `error:` line and exit
    code 130 / 143, not a traceback. A command that handles the interruption itself (and says
    what it kept) exits on its own first (`typer.Exit`), and nothing more is printed."""

    @functools.wraps(callback)
    def stopping(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt as e:
            typer.echo(f"error: {stop_message(e)}", err=True)
            raise typer.Exit(stop_code(e)) from None

    return stopping


def guard_interrupts() -> None:
    """Put `_stopping_cleanly` around every command. Call it once, after the command modules
    have registered their commands."""
    infos = list(app.registered_commands)
    for group in app.registered_groups:
        infos += group.typer_instance.registered_commands
    for info in infos:
        info.callback = _stopping_cleanly(info.callback)


def main() -> None:  # pragma: no cover - the console entry point: `run` with the process's arguments
    raise SystemExit(run())


def run(argv: list[str] | None = None) -> int:
    """The `hist-vlm` command line -> exit code. A usage mistake (a bad option value, a missing argument, a
    file that is not there) is ONE `error: ...` line on stderr and exit code 2, not Typer's
    usage text and box; `--help` and the commands' own exits are unchanged.

    SIGTERM is raised as `Terminated` (a KeyboardInterrupt) while the command runs, so `kill PID`
    stops it as cleanly as Ctrl-C does: one `error:` line, exit code 143 (Ctrl-C: 130)."""
    from typer.exceptions import TyperException  # Typer's (vendored click's) usage and file errors

    main_thread = threading.current_thread() is threading.main_thread()  # signals go to the main thread only
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        code = app(args=argv, prog_name="hist-vlm", standalone_mode=False)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 1
    except TyperException as e:
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"error: {' '.join(message.split())}", err=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt as e:  # outside a command (while its options are read): Typer did not see it
        typer.echo(f"error: {stop_message(e)}", err=True)
        return stop_code(e)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return code if isinstance(code, int) else 0
