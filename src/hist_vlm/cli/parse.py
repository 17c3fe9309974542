"""`hist-vlm parse`: captions -> phrases, subjects and composite pairs."""
from __future__ import annotations

import json

import typer

from hist_vlm.cli import app


@app.command()
def parse(
    text: str = typer.Option(None, "--text", help="Parse one caption and print its phrases."),
) -> None:
    """Parse captions into noun phrases, subjects and composite pairs."""
    from hist_vlm.text.spacy_parser import SpacyParser

    if text is None:
        raise typer.BadParameter("give --text (file input is not wired yet)")
    for p in SpacyParser().parse(text):
        typer.echo(json.dumps(p.to_dict()))
