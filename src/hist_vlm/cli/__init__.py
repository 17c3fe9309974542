"""The `hist-vlm` command. Thin: each sub-command lives in its own module of this package
and calls the library packages; heavy imports (torch) happen inside the commands."""
from __future__ import annotations

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


# Each module registers its commands on `app` when imported.
from hist_vlm.cli import parse  # noqa: E402,F401
from hist_vlm.cli import eval, ground  # noqa: E402,F401
from hist_vlm.cli import train  # noqa: E402,F401
from hist_vlm.cli import demo  # noqa: E402,F401


def main() -> None:  # pragma: no cover - console entry point
    app()
