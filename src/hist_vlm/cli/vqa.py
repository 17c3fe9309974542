"""`hist-vlm eval vqa`: answer a VQA file with a fine-tuned VQA checkpoint by ranking the candidate
answer list, write the official results file, and score it (VQA v2 accuracy, per answer type)
when the file has annotator answers (docs/vqa.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hist_vlm.cli.common import (ALLOW_ABSOLUTE_PATHS, CHECKPOINT, CONFIG, DEVICE, JSON, NUM_WORKERS, check_out,
                                 resolve_device)
from hist_vlm.cli.eval import _kept, _last_line, eval_app


@eval_app.command("vqa")
def vqa(
    config: Path = CONFIG,
    checkpoint: Path = CHECKPOINT,
    data: Path = typer.Option(..., "--data", help="Questions in ALBEF's json layout (vqa_val.json, vqa_test.json, the synthetic vqa_val.json)."),
    answer_list: Optional[Path] = typer.Option(None, "--answer-list", help="Candidate answers (answer_list.json); default: the config's vqa.answer_list, or the file beside --data."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Where the image paths of --data start; default: the config's vqa.image_root, else the folder of --data."),
    vg_image_root: Optional[Path] = typer.Option(None, "--vg-image-root", help="Image root of records with \"dataset\": \"vg\"."),
    k: int = typer.Option(128, "--k", min=1, help="Candidates kept by first-token probability, then re-ranked by sequence likelihood (ALBEF: 128)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results file [{question_id, answer}]; default RUN/vqa_results_<data>.json."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    num_workers: int = NUM_WORKERS,
    device: str = DEVICE,
    allow_absolute_paths: bool = ALLOW_ABSOLUTE_PATHS,
) -> None:
    """VQA accuracy (overall and per answer type) and the results file for the evaluation server."""
    from hist_vlm.data.vqa import image_paths, read_answer_list, read_vqa_file
    from hist_vlm.eval.vqa import answer_questions, score_answers, write_results
    from hist_vlm.models.registry import load_head
    from hist_vlm.train.config import ConfigError, load_config

    check_out(out, "--out", JSON)
    try:
        cfg = load_config(config)
        model = load_head(checkpoint, "vqa")
        records = read_vqa_file(data, need_answers=False, allow_absolute_paths=allow_absolute_paths)
        answer_list = answer_list or (Path(cfg.vqa.answer_list) if cfg.vqa.answer_list else data.parent / "answer_list.json")
        candidates = read_answer_list(answer_list)
    except (ConfigError, ValueError, OSError) as e:
        raise typer.BadParameter(str(e)) from None
    root = image_root or (Path(cfg.vqa.image_root) if cfg.vqa.image_root else data.parent)
    vg_root = vg_image_root or (Path(cfg.vqa.vg_image_root) if cfg.vqa.vg_image_root else root)
    try:   # every image path under its root (symbolic links resolved) before any is opened
        image_paths(records, {"vqa": root, "vg": vg_root}, allow_absolute_paths=allow_absolute_paths)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    out = out or Path(cfg.run.dir) / f"vqa_results_{data.stem}.json"
    check_out(out, "--out", JSON)
    dev = resolve_device(device)
    typer.echo(f"{len(records)} questions from {data}; {len(candidates)} candidate answers, k={min(k, len(candidates))}, "
               f"device {dev}")
    try:
        answers = answer_questions(model, records, candidates, {"vqa": root, "vg": vg_root}, k=k,
                                   batch_size=batch_size, max_length=cfg.data.max_length,
                                   num_workers=num_workers, device=dev)
    except (ValueError, OSError) as e:  # an unreadable image (its line, not a DataLoader worker's traceback)
        raise typer.BadParameter(_last_line(e) + _kept([out])) from None
    try:
        write_results(out, answers)
    except OSError as e:
        raise typer.BadParameter(f"cannot write {out}: {e.strerror or e}") from None
    annotated = [(r.question_id, r.answers, r.answer_type) for r in records if r.answers]
    if annotated:
        for line in score_answers(dict(answers), annotated).lines():
            typer.echo(line)
    else:
        typer.echo("no annotator answers in --data (a test split): results written for the evaluation server")
    typer.echo(f"results: {out}")
