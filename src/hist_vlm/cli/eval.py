"""`hist-vlm eval pointing`: the pointing game (and the synthetic world's multi-object metrics)
of a trained checkpoint on RefCOCO+, ReferIt, Flickr30k Entities or the synthetic world.
`hist-vlm eval retrieval`: image-text retrieval recall (ALBEF's protocol, docs/retrieval.md) on
COCO / Flickr30k test files or the synthetic world's test captions.
`hist-vlm eval segment`: complex referring segmentation (GradCAM points prompting SAM, cIoU;
docs/segmentation.md) on RefCOCO+ pairs or the synthetic world's composite queries."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from hist_vlm._io import atomic_files
from hist_vlm.cli.app import app
from hist_vlm.cli.common import (ALLOW_ABSOLUTE_PATHS, CHECKPOINT, CONFIG, CSV, DEVICE, JSON, JSONL, NUM_WORKERS,
                                 check_out, figure_suffixes, gradcam_source, load_model, resolve_device, sweep_source)
from hist_vlm.data.grounding import BENCHMARKS

eval_app = typer.Typer(help="Evaluate a trained checkpoint.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("pointing")
def pointing(
    config: Path = CONFIG,
    checkpoint: Path = CHECKPOINT,
    data: str = typer.Option(..., "--data", help=f"One of: {', '.join(BENCHMARKS)}."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Benchmark folder (synthetic: default RUN/world)."),
    ann: list[Path] = typer.Option([], "--ann", help="RefCOCO+/ReferIt test json(s); default: <name>_*val*/*test*.json in --data-root."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Where the image paths of the annotations start."),
    split: list[str] = typer.Option([], "--split", help="Only these splits (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Per-query results, OUT.jsonl (with --sweep: a line per query and setting), and OUT.summary.json; written together at the end."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    num_workers: int = NUM_WORKERS,
    device: str = DEVICE,
    layers: list[int] = typer.Option([], "--layer", help="Cross-attention layer(s), 0-based; default: the backbone's evaluation map (docs/evaluation.md)."),
    head: Optional[int] = typer.Option(None, "--head", help="One attention head (0-based); default: the backbone's evaluation map's (ALBEF: head mean)."),
    combine: Optional[str] = typer.Option(None, "--combine", help="mean | product of several layers' maps; default: the evaluation map's."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size for an official ALBEF .pth (RefCOCO+/ReferIt: 384)."),
    sweep: bool = typer.Option(False, "--sweep", help="The layer/head study (paper Table 7): every setting of the --sweep-* grid in one pass (docs/sweep.md)."),
    sweep_layers: Optional[str] = typer.Option(None, "--sweep-layers", help="Layers of the sweep, 0-based: all (default) | 6,7,8 | 6-8."),
    sweep_heads: Optional[str] = typer.Option(None, "--sweep-heads", help="Heads of the sweep: all (default: the head mean and each head) | mean,9,10."),
    sweep_combine: Optional[str] = typer.Option(None, "--sweep-combine", help="Layer combinations: mean,product (default) | mean | product | none."),
    sweep_pairs: Optional[str] = typer.Option(None, "--sweep-pairs", help="Layers combined: adjacent (default) | all | 7+8,6+8."),
    sweep_csv: Optional[Path] = typer.Option(None, "--sweep-csv", help="The sweep's table, one row per setting; default: OUT.sweep.csv, or RUN/sweep_DATA.csv without --out."),
    allow_absolute_paths: bool = ALLOW_ABSOLUTE_PATHS,
) -> None:
    """Pointing-game accuracy per split (and multi-object metrics on the synthetic world).

    Composite ("A and B") queries also report any-box pointing, the share whose top-4 points
    hit both objects, and the cIoU of the masks those points pick. The GradCAM map is the
    backbone's evaluation map (the paper's; 0-based, ALBEF: layer 2, head mean; BLIP: the mean
    of layers 7 and 8 at head 9); --layer/--head/--combine override it. With --sweep, a grid
    of GradCAM layers, heads and layer combinations is scored in one pass over the data.
    """
    from hist_vlm.data.grounding import GroundingFileError, load_benchmark
    from hist_vlm.data.images import ImageError
    from hist_vlm.eval.grounding import EvalInputError, evaluate
    from hist_vlm.eval.sweep import evaluate_sweep

    if data not in BENCHMARKS:
        raise typer.BadParameter(f"--data {data!r}: choose one of {', '.join(BENCHMARKS)}")
    grid = dict(layers=sweep_layers, heads=sweep_heads, combine=sweep_combine, pairs=sweep_pairs)
    if sweep and (layers or head is not None or combine):
        raise typer.BadParameter("--layer/--head/--combine pick one setting; a sweep's grid is set with --sweep-layers, --sweep-heads, --sweep-combine, --sweep-pairs")
    if not sweep and (sweep_csv is not None or any(v is not None for v in grid.values())):
        raise typer.BadParameter("the --sweep-* options need --sweep")
    check_out(out, "--out", JSONL)
    check_out(sweep_csv, "--sweep-csv", CSV)
    if sweep:
        (source, cfg), map_line = sweep_source(config, checkpoint, device, image_size, grid), None
    else:
        source, cfg, map_line = gradcam_source(config, checkpoint, layers, head, combine, device, image_size)
    if data_root is None:
        if data != "synthetic":
            raise typer.BadParameter("--data-root is required for real benchmarks")
        data_root = Path(cfg.run.dir) / "world"
    try:
        records = load_benchmark(data, data_root, ann_files=ann, image_root=image_root, splits=split or None,
                                 allow_absolute_paths=allow_absolute_paths)
    except GroundingFileError as e:
        raise typer.BadParameter(str(e)) from None
    if not records:
        raise typer.BadParameter(f"no queries in {data_root} for splits {split or 'all'}")
    if sweep:
        what = f"sweep of {len(source.settings)} settings, layers {list(source.layers)} captured in one pass"
    else:
        what = f"layers {list(source.layers)}, head {source.head if source.head is not None else 'mean'}"
    if sweep:
        csv_path = sweep_csv or (out.with_suffix(".sweep.csv") if out else Path(cfg.run.dir) / f"sweep_{data}.csv")
        check_out(csv_path, "--sweep-csv", CSV)
        companion = csv_path
    else:
        companion = out.with_suffix(".summary.json") if out is not None else None
        check_out(companion, "--out's summary")
    if map_line is not None:
        typer.echo(map_line, err=True)
    typer.echo(f"{len(records)} queries from {data} ({data_root}); {what}, device {source.device}")
    # the per-query JSONL and its summary (or sweep table) are written as temps as the evaluation
    # goes and replace the previous files together at the end: a failed or killed run keeps them
    targets = [p for p in (out, companion) if p is not None]
    try:
        with atomic_files(*targets) as temps:
            temp = dict(zip(targets, temps))
            report = (evaluate_sweep if sweep else evaluate)(
                records, source, batch_size=batch_size, num_workers=num_workers, out=temp.get(out))
            if sweep:
                report.write_csv(temp[csv_path], checkpoint=str(checkpoint), data=data)
            elif out is not None:
                temp[companion].write_text(json.dumps(report.summary(), indent=2) + "\n")
    except (FileNotFoundError, ImageError, EvalInputError) as e:  # a missing or unreadable image or mask, an empty query
        raise typer.BadParameter(_last_line(e) + _kept(targets)) from None
    except OSError as e:
        raise typer.BadParameter(f"cannot write {' / '.join(map(str, targets))}: {e.strerror or e}") from None
    for line in report.lines():
        typer.echo(line)
    if sweep:
        typer.echo(f"sweep table: {csv_path}" + (f"; per-query results: {out}" if out else ""))
    elif out is not None:
        typer.echo(f"per-query results: {out}; summary: {companion}")


RETRIEVAL_DATA = ("coco", "flickr30k", "synthetic")


def _kept(targets) -> str:
    """What a failed evaluation says about its outputs: none was written or changed."""
    return f" ({', '.join(map(str, targets))} not written)" if targets else ""


def _last_line(error: Exception) -> str:
    """The message of an error, without the worker traceback that a DataLoader worker's
    re-raised error carries (its last line is "OSError: <message>")."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)


@eval_app.command("retrieval")
def retrieval(
    config: Path = CONFIG,
    checkpoint: Path = CHECKPOINT,
    data: str = typer.Option(..., "--data", help=f"One of: {', '.join(RETRIEVAL_DATA)}."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="coco_test.json / flickr30k_test.json (ALBEF layout); synthetic: a captions JSONL, default RUN/world/captions_test.jsonl."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Where the image paths of --ann start (required for coco, flickr30k; synthetic: the world folder)."),
    k_test: Optional[int] = typer.Option(None, "--k-test", min=1, help="Candidates re-ranked by ITM per query; default 256 (coco), 128 (flickr30k), 16 (synthetic)."),
    score: str = typer.Option("itm", "--score", help="itm: ITM match logit (ALBEF) | itm+itc: plus the ITC cosine (BLIP's evaluation)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Metrics and per-query ranks, JSON (written atomically)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per encoding batch."),
    itm_batch: int = typer.Option(256, "--itm-batch", min=1, help="(image, text) pairs per ITM fusion pass."),
    max_length: int = typer.Option(30, "--max-length", min=1, help="Text tokens incl. [CLS] (ALBEF: 30)."),
    num_workers: int = NUM_WORKERS,
    device: str = DEVICE,
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size for an official ALBEF .pth (ALBEF's retrieval: 384)."),
    allow_absolute_paths: bool = ALLOW_ABSOLUTE_PATHS,
) -> None:
    """Image-text retrieval: TR@1/5/10, IR@1/5/10 and their means, after ITC ranking and ITM
    re-ranking of the top k, as ALBEF's Retrieval.py evaluates."""
    from hist_vlm.data.images import ImageError
    from hist_vlm.data.retrieval import CaptionFileError, read_caption_corpus, read_retrieval_test
    from hist_vlm.eval.retrieval import DEFAULT_K, SCORES, check_retrieval_backbone, evaluate_retrieval

    if data not in RETRIEVAL_DATA:
        raise typer.BadParameter(f"--data {data!r}: choose one of {', '.join(RETRIEVAL_DATA)}")
    if score not in SCORES:
        raise typer.BadParameter(f"--score {score!r}: choose one of {', '.join(SCORES)}")
    if data != "synthetic" and ann is None:
        raise typer.BadParameter(f"--ann is required for {data} (the {data}_test.json of ALBEF's layout)")
    if data != "synthetic" and image_root is None:
        raise typer.BadParameter(f"--image-root is required for {data}")
    check_out(out, "--out", JSON)
    model, cfg = load_model(config, checkpoint, image_size)
    try:
        check_retrieval_backbone(model)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if ann is None:
        ann = Path(cfg.run.dir) / "world" / "captions_test.jsonl"
    try:
        reader = read_caption_corpus if data == "synthetic" else read_retrieval_test
        corpus = reader(ann, image_root, allow_absolute_paths=allow_absolute_paths)
    except CaptionFileError as e:
        raise typer.BadParameter(str(e)) from None
    k = k_test or DEFAULT_K[data]
    dev = resolve_device(device)
    typer.echo(f"{len(corpus.images)} images, {len(corpus.texts)} texts from {data} ({ann}); "
               f"k_test {k}, score {score}, device {dev}")
    try:
        report = evaluate_retrieval(model, corpus, k_test=k, device=dev, batch_size=batch_size,
                                    pair_batch=itm_batch, max_length=max_length, score=score,
                                    num_workers=num_workers)
    except (OSError, ImageError) as e:  # a missing or unreadable image
        raise typer.BadParameter(_last_line(e) + _kept([out] if out else [])) from None
    for line in report.lines():
        typer.echo(line)
    if out is not None:
        try:
            report.write_json(out, data=data, ann=str(ann), checkpoint=str(checkpoint))
        except OSError as e:
            raise typer.BadParameter(f"cannot write {out}: {e.strerror or e}") from None
        typer.echo(f"results: {out}")


SEGMENT_DATA = ("refcoco+", "synthetic")


@eval_app.command("segment")
def segment(
    config: Path = CONFIG,
    checkpoint: Path = CHECKPOINT,
    sam: Path = typer.Option(..., "--sam", help="SAM save_pretrained folder (a local copy of e.g. facebook/sam-vit-huge)."),
    data: str = typer.Option(..., "--data", help=f"One of: {', '.join(SEGMENT_DATA)}."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="refcoco+: the REFER folder holding refcoco+/refs(unc).p and instances.json; synthetic: the world (default RUN/world)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="refcoco+: the COCO train2014 image folder."),
    split: list[str] = typer.Option([], "--split", help="Only these splits (repeatable); refcoco+ default: testA, testB."),
    multimask: str = typer.Option("single", "--multimask", help="single: SAM's one-mask output | best: of its 3 masks the highest predicted IoU."),
    seed: int = typer.Option(0, "--seed", help="Seed of the refcoco+ pair draws (per image)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Per-query results, JSONL, and OUT.summary.json."),
    figure: Optional[Path] = typer.Option(None, "--figure", help="Figure of the first --figure-n queries: image, heatmap with the prompt points, SAM mask, gold mask."),
    figure_n: int = typer.Option(4, "--figure-n", min=1, help="Queries in the --figure."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Queries per GradCAM and SAM mask-decoder pass."),
    sam_batch: int = typer.Option(4, "--sam-batch", min=1, help="Images per SAM image-encoder pass."),
    num_workers: int = NUM_WORKERS,
    device: str = DEVICE,
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size for an official ALBEF .pth (RefCOCO+: 384)."),
    allow_absolute_paths: bool = ALLOW_ABSOLUTE_PATHS,
) -> None:
    """Complex referring segmentation (paper Table 3): the top-4 GradCAM points of each "A and B"
    query prompt SAM for one mask; cIoU and mean IoU against the union of both objects' masks."""
    from hist_vlm.data.grounding import GroundingFileError
    from hist_vlm.eval.segment import (MULTIMASK, SamLoadError, SamSegmenter, evaluate_segmentation,
                                       load_segment_queries, save_segment_figure)

    if data not in SEGMENT_DATA:
        raise typer.BadParameter(f"--data {data!r}: choose one of {', '.join(SEGMENT_DATA)}")
    if multimask not in MULTIMASK:
        raise typer.BadParameter(f"--multimask {multimask!r}: choose one of {', '.join(MULTIMASK)}")
    if data_root is None and data != "synthetic":
        raise typer.BadParameter("--data-root is required for refcoco+ (the REFER folder)")
    check_out(out, "--out", JSONL)
    summary_path = out.with_suffix(".summary.json") if out is not None else None
    check_out(summary_path, "--out's summary")
    check_out(figure, "--figure", figure_suffixes())
    dev = resolve_device(device)
    try:
        segmenter = SamSegmenter(sam, device=dev, multimask=multimask, image_batch=sam_batch)
    except SamLoadError as e:
        raise typer.BadParameter(str(e)) from None
    source, cfg, map_line = gradcam_source(config, checkpoint, [], None, None, dev, image_size)
    data_root = data_root or Path(cfg.run.dir) / "world"
    try:
        records, gold_mask, what = load_segment_queries(data, data_root, image_root=image_root, splits=split, seed=seed,
                                                        allow_absolute_paths=allow_absolute_paths)
    except GroundingFileError as e:
        raise typer.BadParameter(str(e)) from None
    if not records:
        raise typer.BadParameter(f"no queries in {data_root} for splits {split or 'default'}")
    typer.echo(map_line, err=True)
    typer.echo(f"{what}; layers {list(source.layers)}, SAM {sam} ({multimask}), device {dev}")
    # results, summary and figure: temps until the end, then replace the previous files together
    targets = [p for p in (out, summary_path, figure) if p is not None]
    try:
        with atomic_files(*targets) as temps:
            temp = dict(zip(targets, temps))
            report, rows = evaluate_segmentation(records, source, segmenter, gold_mask, batch_size=batch_size,
                                                 num_workers=num_workers, out=temp.get(out),
                                                 figure_rows=figure_n if figure else 0)
            if out is not None:
                temp[summary_path].write_text(json.dumps({"data": data, "multimask": multimask, "seed": seed,
                                                          "checkpoint": str(checkpoint), **report.summary()},
                                                         indent=2) + "\n")
            if figure is not None:
                save_segment_figure(rows, temp[figure])
    except (OSError, ValueError) as e:  # a missing image or mask, an unreadable segmentation, an unwritable output
        raise typer.BadParameter(_last_line(e) + _kept(targets)) from None
    for line in report.lines():
        typer.echo(line)
    if out is not None:
        typer.echo(f"per-query results: {out}; summary: {summary_path}")
    if figure is not None:
        typer.echo(f"figure: {figure}")
