"""`hist-vlm parse`: caption files -> noun phrases, subjects and Algorithm 1 pairs (JSONL).

Thin: readers (`hist_vlm.data.captions`), parsers and cache (`hist_vlm.text`) and the
streaming job (`hist_vlm.text.corpus`) do the work; this module wires options, prints the
progress bar and the summary, and turns user mistakes into one-line errors (exit code 2).
"""
from __future__ import annotations

import sqlite3
from importlib.resources import files
from pathlib import Path
from typing import Optional

import typer

from hist_vlm.cli.app import app, stop_code, stop_message

SAMPLE = "sample_captions.jsonl"  # bundled in hist_vlm.data
PREVIEW_IMAGES = 3


def _fail(message: str) -> typer.Exit:
    typer.echo(f"hist-vlm parse: error: {message}", err=True)
    return typer.Exit(2)


def _spacy(workers: int):
    from hist_vlm.text.spacy_parser import SpacyParser

    try:
        return SpacyParser(workers=workers)
    except (RuntimeError, OSError) as e:  # no English model installed
        raise _fail(str(e)) from None


def _make_parser(kind: str, workers: int, llm_url: str | None, llm_model: str | None):
    if kind == "spacy":
        return _spacy(workers)
    if kind == "llm":
        from hist_vlm.text.llm_parser import LLMConfig, LLMParser

        if not llm_url or not llm_model:
            raise _fail("--parser llm needs --llm-url and --llm-model (or HIST_VLM_LLM_URL / HIST_VLM_LLM_MODEL)")
        return LLMParser(LLMConfig(base_url=llm_url, model=llm_model, concurrency=max(workers, 1)), fallback=_spacy(1))
    raise _fail(f"unknown parser {kind!r} (choose spacy or llm)")


def _show_text(parser, caption: str) -> None:
    phrases = parser.parse(caption)
    typer.echo(f"caption: {caption}")
    if not phrases:
        typer.echo("  (no noun phrases)")
    for p in phrases:
        typer.echo(f"  [{p.start:>3}:{p.end:<3}] {p.text!r:<32} subject {p.subject!r} (lemma {p.subject_lemma!r})")


def _show_records(records) -> None:
    from hist_vlm.text.pairs import composite_text

    for rec in records:
        typer.echo(f"\nimage {rec.image}")
        for ci, caption in enumerate(rec.captions):
            typer.echo(f"  caption {ci}: {caption}")
        for k, (ci, p) in enumerate(rec.phrases):
            typer.echo(f"    phrase {k:>2} (caption {ci}): {p.text!r}, subject {p.subject!r}")
        for i, j in rec.pairs[:6]:
            typer.echo(f"    pair {i:>2} + {j:>2}: {composite_text(rec.phrases[i][1].text, rec.phrases[j][1].text)!r}")
        if len(rec.pairs) > 6:
            typer.echo(f"    ... {len(rec.pairs) - 6} more pairs")


@app.command()
def parse(
    input: Optional[Path] = typer.Argument(None, metavar="INPUT", help="Caption file to parse.", show_default=False),
    fmt: Optional[str] = typer.Option(None, "--format", help="Input format: coco, vg, albef or jsonl."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output JSONL, one line per image (written atomically)."),
    parser_kind: str = typer.Option("spacy", "--parser", help="spacy (default) or llm."),
    llm_url: Optional[str] = typer.Option(
        None, "--llm-url", envvar="HIST_VLM_LLM_URL", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1."
    ),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", envvar="HIST_VLM_LLM_MODEL", help="Model name at that endpoint."),
    workers: int = typer.Option(1, "--workers", min=1, help="spaCy processes, or LLM requests in flight."),
    seed: int = typer.Option(0, "--seed", help="Seed of Algorithm 1's partner choice (per image)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Captions per parser batch."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Parse cache directory (default: $HIST_VLM_CACHE, else ~/.cache/hist-vlm)."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the parse cache."),
    text: Optional[str] = typer.Option(None, "--text", help="Parse one caption and print its phrases."),
    sample: bool = typer.Option(False, "--sample", help="Parse the bundled sample captions and show a few images."),
) -> None:
    """Parse captions into noun phrases, subjects and composite pairs (Algorithm 1)."""
    from hist_vlm.data.captions import FORMATS

    if text is not None:
        if input is not None or sample:
            raise _fail("--text parses one caption: give no INPUT and no --sample")
        _parse_text(text, parser_kind, llm_url, llm_model)
        return
    if sample:
        if input is not None:
            raise _fail("--sample parses the bundled captions: give no INPUT")
        input, fmt = Path(str(files("hist_vlm.data") / SAMPLE)), "jsonl"
    elif input is None:
        raise _fail("give INPUT (with --format and --out), --sample or --text")
    if fmt is None:
        raise _fail(f"give --format ({', '.join(FORMATS)})")
    if fmt not in FORMATS:
        raise _fail(f"unknown format {fmt!r} (choose {', '.join(FORMATS)})")
    if out is None and not sample:
        raise _fail("give --out OUT.jsonl")
    if no_cache and cache_dir is not None:
        raise _fail("give either --cache-dir or --no-cache, not both")
    if not input.is_file():
        raise _fail(f"{input}: no such file" if not input.exists() else f"{input}: not a file")

    parser, cache = _cached_parser(parser_kind, workers, llm_url, llm_model, cache_dir, no_cache)
    if sample:
        _parse_sample(input, out, parser, cache, seed, batch_size)
    else:
        _parse_file(input, fmt, out, parser, cache, seed, batch_size)


def _parse_text(text: str, parser_kind: str, llm_url: str | None, llm_model: str | None) -> None:
    """--text: parse one caption and print its phrases."""
    from hist_vlm.text.llm_parser import LLMError

    try:
        _show_text(_make_parser(parser_kind, 1, llm_url, llm_model), text)
    except LLMError as e:
        raise _fail(str(e)) from None


def _parse_sample(input: Path, out: Path | None, parser, cache, seed: int, batch_size: int) -> None:
    """--sample: parse the bundled captions and show the first images; with --out, write them all
    and print the summary too."""
    from hist_vlm.text.corpus import read_records

    stats, read_stats, preview = _stream(input, "jsonl", out, parser, cache, seed, batch_size)
    _show_records(list(read_records(out))[:PREVIEW_IMAGES] if out is not None else preview)
    if out is not None:
        _summary(parser, stats, read_stats, out, cache)


def _parse_file(input: Path, fmt: str, out: Path, parser, cache, seed: int, batch_size: int) -> None:
    """INPUT --format --out: parse a caption file into OUT and print the summary."""
    stats, read_stats, _ = _stream(input, fmt, out, parser, cache, seed, batch_size)
    _summary(parser, stats, read_stats, out, cache)


def _cached_parser(kind: str, workers: int, llm_url: str | None, llm_model: str | None,
                   cache_dir: Path | None, no_cache: bool):
    """(parser, parse cache or None): the parser of --parser behind the cache unless --no-cache."""
    from hist_vlm.text.cache import CachedParser, ParseCache

    parser = _make_parser(kind, workers, llm_url, llm_model)
    cache = None
    try:
        if not no_cache:
            cache = ParseCache(cache_dir)
            parser = CachedParser(parser, cache)
    except (OSError, sqlite3.Error) as e:
        raise _fail(f"cannot open the parse cache: {e}") from None
    return parser, cache


def _stream(input: Path, fmt: str, out: Path | None, parser, cache, seed: int, batch_size: int):
    """Parse INPUT image by image behind a progress bar into OUT (atomically), or, with no OUT, only
    the first PREVIEW_IMAGES images -> (corpus stats, read stats, those images or None). Closes the
    cache; a failure is one error line (exit code 2), an interrupt exit code 130."""
    from tqdm import tqdm

    from hist_vlm.data.captions import CaptionFileError, ReadStats, read_captions
    from hist_vlm.text.corpus import CorpusStats, atomic_write_jsonl, parse_images
    from hist_vlm.text.llm_parser import LLMError

    read_stats, stats = ReadStats(), CorpusStats()
    preview = None
    bar = tqdm(unit=" captions", desc="parsing", dynamic_ncols=True)
    records = parse_images(read_captions(input, fmt, read_stats), parser, seed, batch_size, stats, bar.update)
    try:
        if out is not None:
            atomic_write_jsonl(out, records)
        else:  # --sample without --out: parse for the preview only
            preview = [rec for _, rec in zip(range(PREVIEW_IMAGES), records)]
    except BaseException as e:
        bar.leave = False  # the error, not a stale bar, is the last thing on the terminal
        bar.close()
        if isinstance(e, CaptionFileError):
            raise _fail(f"{e} ({out or 'no output'} not written)") from None
        if isinstance(e, LLMError):
            kept = "; captions parsed so far are cached" if cache is not None else ""
            raise _fail(f"{e} ({out} not written{kept})") from None
        if isinstance(e, OSError):
            raise _fail(f"cannot write {out}: {e.strerror or e}") from None
        if isinstance(e, KeyboardInterrupt):
            resume = "; re-run to resume from the cache" if cache is not None else ""
            typer.echo(f"{stop_message(e)}: {out} not written{resume}", err=True)
            raise typer.Exit(stop_code(e)) from None
        raise
    finally:
        bar.close()
        if cache is not None:
            cache.close()
    return stats, read_stats, preview


def _summary(parser, stats, read_stats, out: Path, cache) -> None:
    from hist_vlm.data.captions import MAX_CAPTION_CHARS

    typer.echo(f"\nwrote {out}: {stats.images} images, {stats.captions} captions ({parser.name} {parser.version})")
    typer.echo(f"  phrases: {stats.phrases} ({stats.phrases_per_caption:.2f} per caption)")
    typer.echo(f"  images with at least one pair: {stats.images_with_pair} of {stats.images} ({stats.pairs} pairs)")
    typer.echo(
        f"  captions skipped: {read_stats.skipped_empty} empty; images without a usable caption: "
        f"{read_stats.images_without_captions}; captions truncated at {MAX_CAPTION_CHARS} characters: {read_stats.truncated}"
    )
    if cache is not None:
        typer.echo(f"  cache: {parser.hits} hits, {parser.misses} parsed ({cache.directory})")
        parser = parser.parser
    if hasattr(parser, "stats"):
        typer.echo(f"  LLM: {parser.stats.summary()}")
