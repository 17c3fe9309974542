"""The `hist-vlm` command: importing this package registers every sub-command (one module each) on
the app of `hist_vlm.cli.app`, puts the `[train]` extra check in front of the model commands and
makes a Ctrl-C or SIGTERM one line (exit 130 / 143) in every command."""
from __future__ import annotations

# Each module registers its commands on `app` when imported; this order is the order of --help.
from . import parse  # noqa: F401
from . import eval, ground  # noqa: F401
from . import train  # noqa: F401
from . import demo  # noqa: F401
from . import data  # noqa: F401
from . import vqa  # noqa: F401
from .app import app, guard_interrupts, guard_model_commands, main, run

guard_model_commands()
guard_interrupts()

__all__ = ["app", "main", "run"]
