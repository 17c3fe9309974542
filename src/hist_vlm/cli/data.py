"""`hist-vlm data ...`: turn the official benchmark downloads into the files the evaluators and
trainers read (library: `hist_vlm.data.prepare`). Thin: each command calls one converter,
prints what it wrote and what it skipped (counts by reason), and turns a malformed input into
one `error: ...` line with exit code 2. Needs no torch."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hist_vlm.cli.app import app

data_app = typer.Typer(help="Prepare benchmark data from the official downloads.", no_args_is_help=True)
app.add_typer(data_app, name="data")

OUT = typer.Option(..., "--out", help="Output folder (files are written atomically).")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr.")


def _run(convert, *args, **kwargs) -> None:
    """Run one converter and print its report; malformed inputs and unwritable outputs are
    one `error:` line and exit code 2."""
    from hist_vlm.data.captions import CaptionFileError
    from hist_vlm.data.grounding import GroundingFileError
    from hist_vlm.data.prepare import PrepareError

    try:
        report = convert(*args, **kwargs)
    except (PrepareError, GroundingFileError, CaptionFileError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        typer.echo(f"error: cannot write {e.filename or ''}: {e.strerror or e}", err=True)
        raise typer.Exit(2) from None
    for line in report.lines():
        typer.echo(line)


@data_app.command("flickr30k-entities")
def flickr30k_entities(
    root: Path = typer.Argument(..., help="Folder with Annotations/ and Sentences/ (annotations.zip unpacked)."),
    out: Path = OUT,
    split: list[str] = typer.Option([], "--split", help="train, val or test (repeatable); default: every id list found."),
    split_dir: Optional[Path] = typer.Option(None, "--split-dir", help="Folder of train.txt/val.txt/test.txt (default ROOT)."),
    progress: bool = PROGRESS,
) -> None:
    """Flickr30k Entities -> info-ground's {split}.txt, bounding_boxes_{split}.json, sentences_{split}.json."""
    from hist_vlm.data.prepare.flickr30k_entities import prepare_flickr30k_entities

    _run(prepare_flickr30k_entities, root, out, split, split_dir, progress)


@data_app.command("refer")
def refer(
    refer_root: Path = typer.Argument(..., help="REFER data folder: <root>/<dataset>/refs(<split-by>).p and instances.json."),
    out: Path = OUT,
    dataset: str = typer.Option("refcoco+", "--dataset", help="refcoco+, refclef, refcoco or refcocog."),
    split: list[str] = typer.Option([], "--split", help="val, test, testA, testB, train ... (repeatable); default: val and test."),
    split_by: str = typer.Option("unc", "--split-by", help="The refs file: refs(<split-by>).p (umd or google for refcocog)."),
    progress: bool = PROGRESS,
) -> None:
    """RefCOCO+ / ReferIt (REFER files) -> <dataset>_<split>.json test lists of {image, text, ref_id, split}."""
    from hist_vlm.data.prepare.refer import DEFAULT_SPLITS, prepare_refer

    _run(prepare_refer, refer_root, dataset, out, split or DEFAULT_SPLITS, split_by, progress)


@data_app.command("karpathy")
def karpathy(
    karpathy_json: Path = typer.Argument(..., help="dataset_coco.json or dataset_flickr30k.json (Karpathy's splits)."),
    out: Path = OUT,
    name: Optional[str] = typer.Option(None, "--name", help="Output prefix (default: from the file name: coco, flickr30k)."),
    progress: bool = PROGRESS,
) -> None:
    """Karpathy splits -> ALBEF's retrieval files <name>_train.json, <name>_val.json, <name>_test.json."""
    from hist_vlm.data.prepare.karpathy import prepare_karpathy

    _run(prepare_karpathy, karpathy_json, out, name, progress)


@data_app.command("vg")
def visual_genome(
    regions: Path = typer.Argument(..., help="region_descriptions.json (Visual Genome v1.2)."),
    image_data: Path = typer.Option(..., "--image-data", help="image_data.json: where each image lies (VG_100K or VG_100K_2)."),
    out: Path = typer.Option(..., "--out", help="Caption JSONL to write, for `hist-vlm parse --format jsonl`."),
    progress: bool = PROGRESS,
) -> None:
    """Visual Genome regions -> a caption JSONL keyed by image path (streamed: flat memory)."""
    from hist_vlm.data.prepare.visual_genome import prepare_visual_genome

    _run(prepare_visual_genome, regions, image_data, out, progress)
