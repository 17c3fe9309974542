"""The main job: fine-tune a small pretrained base with and without HIST, as the paper does.

The paper never trains from scratch: it fine-tunes a model that already grounds (ALBEF, BLIP)
and shows that the HIST losses make composite queries "A and B" cover both objects. The demo
has the same shape in the synthetic world:

  base      a tiny ALBEF pretrained with the baseline losses (`demo_pretrain` preset) from a
            vision tower taught the captions' words (`demo_tags`), shipped in the package
            (`hist_vlm/demo/base/`); `hist-vlm demo --pretrain` rebuilds it
  baseline  the base fine-tuned with ITC + ITM + MLM on captions (`loss.schedule=off`)
  HIST      the same fine-tuning plus the phrase, subject and addition losses

Every model is evaluated with the same GradCAM layers, chosen before any fine-tuned model is
seen: on the world's val split, by the base model alone (`choose_eval_layers`). Training keeps
the preset's layer (`loss.capture_layers`): the addition loss trains through it.

Every step is the real pipeline a user runs by hand: `generate_world` writes images and a
captions JSONL, the caption reader + spaCy parser + Algorithm 1 (`hist-vlm parse`) turn it into
phrases and pairs, `hist_vlm.train.train` fine-tunes from that file, and the grounding runner
(`hist-vlm eval pointing`) scores the test split. Baseline and HIST start from the same weights,
see the same batches with the same seed and run the same number of steps; only the loss differs.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from hist_vlm._io import atomic_dir, atomic_files, atomic_write_text

#: the shipped pretrained base (package data): model.safetensors, config.json, vocab.txt, recipe.json
DEMO_BASE = Path(__file__).resolve().parent / "base"
PRETRAIN_PRESET = "demo_pretrain"
TAGS_PRESET = "demo_tags"       # stage 1 of the base, before PRETRAIN_PRESET
FINETUNE_PRESET = "demo_finetune"

#: (name, label, loss overrides): the main comparison, then the paper's Table 6 ablation
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("baseline", ("loss.schedule=off",)),
    "phrase": ("+ phrase", ("loss.lambda_subject=0", "loss.lambda_add=0")),
    "phrase_add": ("+ phrase + addition", ("loss.lambda_subject=0",)),
    "hist": ("HIST (+ phrase + addition + subject)", ()),
}
MAIN = ("baseline", "hist")
ABLATION = ("baseline", "phrase", "phrase_add", "hist")
#: test-split metrics reported by the demo: (key in EvalReport.summary(), label)
METRICS = (
    ("pointing", "single-phrase pointing"),
    ("both_hit", "composite both-hit (top-4)"),
    ("ciou", "composite mask cIoU"),
)


@dataclass
class DemoSettings:
    """Sizes of one demo run. `quick()` is the test-suite variant (one seed, smaller)."""

    config: Path                       # fine-tuning preset (demo_finetune)
    base: Path = DEMO_BASE             # the pretrained model both variants start from
    out_dir: Path = Path("demo_out")
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 2048
    n_val: int = 128                   # where the base chooses the evaluation's GradCAM layers
    n_test: int = 640                  # a both-hit rate known well enough: docs/experiments.md, "640 test scenes"
    image_size: int = 64
    world_seed: int = 0
    hist_schedule: str = "paper"
    variants: tuple[str, ...] = MAIN
    #: "val": evaluate at the layers the base points best with on the val split; "train": at
    #: the fine-tuning preset's `loss.capture_layers`
    eval_layers: str = "val"
    overrides: list[str] = field(default_factory=list)   # extra key=value for every variant
    jobs: int | None = None            # fine-tuning runs at a time (`train_runs`; None: one per core)

    @classmethod
    def quick(cls, config: Path, out_dir: Path) -> "DemoSettings":
        return cls(config=config, out_dir=out_dir, seeds=(0,), n_train=128, n_val=16, n_test=32,
                   overrides=["schedule.epochs=2", "data.batch_size=16"])


@dataclass
class DemoResult:
    table: str                                  # the markdown table printed at the end
    metrics: dict[str, dict[str, list[float]]]  # variant -> metric -> one value per seed
    base_metrics: dict[str, float]              # the base model itself, not fine-tuned
    eval_layers: tuple[int, ...]                # the GradCAM layers every model was evaluated at
    val_pointing: dict[tuple[int, ...], float]  # the base's val pointing per candidate ({} with "train")
    figure: Path


def prepare_world(settings: DemoSettings) -> tuple[Path, Path]:
    """Synthetic world + parsed training captions, built once and reused: (phrases, world dir)."""
    from hist_vlm.demo.synthetic import generate_parsed_world

    world = settings.out_dir / "world"
    phrases = world / "phrases_train.jsonl"
    stamp = world / "demo_world.json"
    want = {"n_train": settings.n_train, "n_val": settings.n_val, "n_test": settings.n_test,
            "image_size": settings.image_size, "seed": settings.world_seed}
    if phrases.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return phrases, world
    generate_parsed_world(world, phrases, n_train=settings.n_train, n_val=settings.n_val, n_test=settings.n_test,
                          image_size=settings.image_size, seed=settings.world_seed)
    atomic_write_text(stamp, json.dumps(want))
    return phrases, world


def _train_config(settings: DemoSettings, variant: str, seed: int, phrases: Path, world: Path):
    from hist_vlm.train.config import load_config

    overrides = [
        f"run.dir={settings.out_dir / 'runs' / f'{variant}-seed{seed}'}",
        f"run.seed={seed}",
        f"model.checkpoint={settings.base}",
        "data.synthetic.enabled=false",
        f"data.phrases={phrases}",
        f"data.image_root={world}",
        f"data.image_size={settings.image_size}",
        f"loss.schedule={settings.hist_schedule}",
        *VARIANTS[variant][1],
        *settings.overrides,
    ]
    return load_config(settings.config, overrides)


def _finished(cfg) -> bool:
    """A run of exactly this config trained to its end before (`train_runs` stamps it)."""
    done = Path(cfg.run.dir) / "finished.json"
    return done.is_file() and json.loads(done.read_text()) == cfg.to_dict()


def available_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: the progress queue of a `train_runs` worker process (set by `_init_worker`)
_progress_queue = None


def die_with_parent(parent: int) -> None:
    """Make this process end when its parent does, however the parent ends (a SIGKILL too): Linux's
    parent-death signal, SIGKILL. A parent already gone (between the spawn and this call) ends it
    now. Elsewhere a no-op: there the parent's `finally` (`stop_workers`) is all there is."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(queue, threads: int, parent: int | None = None) -> None:
    """A `train_runs` worker: dies with the parent (`die_with_parent`), leaves Ctrl-C to it
    (the terminal sends SIGINT to the whole process group; the parent stops the workers), and
    trains on `threads` threads."""
    import signal

    global _progress_queue
    if parent is not None:
        die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _progress_queue = queue
    import torch

    torch.set_num_threads(threads)


def stop_workers(pool) -> None:
    """Kill a process pool's workers now (a fine-tuning run is not waited for) and shut it down:
    what a parent stopped by an error, Ctrl-C or SIGTERM does before it ends."""
    # the executor's own table (Python 3.14 has pool.kill_workers(); this works from 3.8 on)
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=5)
    pool.shutdown(wait=False, cancel_futures=True)


def _train_worker(label: str, cfg) -> float:
    """One fine-tuning run in a worker: its console lines go to RUN/stdout.txt, its steps to
    the parent's progress bar. Returns the seconds it took."""
    from hist_vlm.train.loop import train

    start = time.perf_counter()
    run_dir = Path(cfg.run.dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale or interrupted run of other settings
    run_dir.mkdir(parents=True)
    # the run's console log, streamed as it trains (a log, not an output: it is never replaced)
    with (run_dir / "stdout.txt").open("w") as out, contextlib.redirect_stdout(out):
        train(cfg, progress=False, on_step=lambda step, last: _progress_queue.put((label, step, last)))
    atomic_write_text(run_dir / "finished.json", json.dumps(cfg.to_dict()))
    return time.perf_counter() - start


def train_runs(runs: dict[str, object], jobs: int | None = None) -> None:
    """Train every config of `runs` (label -> TrainConfig) that has not finished before, `jobs`
    at a time (default: one per core), each in its own process with cores // jobs threads.

    Why processes: a second thread speeds the demo's tiny model up far less than a second run
    side by side does, and a run on one thread is bitwise reproducible (two threads are not:
    their reductions split differently from run to run); docs/experiments.md, "Fine-tuning runs
    side by side; demo timings". The workers are spawned: a script that calls this needs the
    usual `if __name__ == "__main__":` guard."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from queue import Empty

    pending = {label: cfg for label, cfg in runs.items() if not _finished(cfg)}
    for label in runs.keys() - pending.keys():
        tqdm.write(f"== {label}: finished before, reused ({runs[label].run.dir})")
    if not pending:
        return
    cores = available_cores()
    jobs = max(1, min(len(pending), jobs or cores))
    ctx = multiprocessing.get_context("spawn")  # no forked copies of the parent's threads (or CUDA)
    queue = ctx.Queue()
    last: dict[str, tuple[int, int]] = {}  # label -> (step, last step)
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(queue, max(1, cores // jobs), os.getpid()))
    bar = tqdm(total=0, desc=f"fine-tune {len(pending)} run{'s' * (len(pending) > 1)}, {jobs} at a time", unit="step", dynamic_ncols=True)
    try:
        futures = {pool.submit(_train_worker, label, cfg): label for label, cfg in pending.items()}
        running = set(futures)
        while running:
            finished, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            try:
                while True:
                    label, step, last_step = queue.get_nowait()
                    last[label] = (step, last_step)
            except Empty:
                pass
            known = [t for _, t in last.values()]
            bar.total = sum(known) + (len(pending) - len(known)) * max(known, default=0)  # equal runs: a good guess
            bar.n = sum(s for s, _ in last.values())
            bar.refresh()
            for future in finished:
                seconds, label = future.result(), futures[future]  # a worker's exception is raised here
                bar.write(f"== {label}: trained in {seconds / 60:.1f} min ({pending[label].run.dir})")
    except BaseException:   # a run failed, Ctrl-C, SIGTERM: no worker outlives the parent's exit
        bar.close()
        stop_workers(pool)
        raise
    bar.close()
    pool.shutdown(wait=True)


def pretrain_base(out_dir: Path, overrides: list[str] = ()) -> Path:
    """Rebuild the demo's base in its two stages: the `demo_tags` preset (the vision tower
    learns which words the captions use), then `demo_pretrain` from its checkpoint (baseline
    losses, stem frozen); package the final model as `OUT/base` (`package_base`). `overrides`
    apply to both stages. Copy that folder over `hist_vlm/demo/base/` to ship it."""
    from hist_vlm.train.config import load_config
    from hist_vlm.train.loop import train

    checkpoint = None
    for preset, run_dir in ((TAGS_PRESET, out_dir / "pretrain_tags"), (PRETRAIN_PRESET, out_dir / "pretrain")):
        start = [f"model.checkpoint={checkpoint}"] if checkpoint is not None else []
        cfg = load_config(preset, [f"run.dir={run_dir}", *start, *overrides])
        shutil.rmtree(run_dir, ignore_errors=True)
        checkpoint = train(cfg, progress=True).checkpoint
    command = " ".join(["hist-vlm demo --pretrain", *(f"--set {o}" for o in overrides)])
    return package_base(checkpoint, out_dir / "base", command)


def package_base(checkpoint: Path, out: Path, command: str) -> Path:
    """A self-contained base folder from a training checkpoint: its model (weights, config,
    vocabulary) plus `recipe.json` (the command, the run's config and final log line).
    Built in a temp folder that takes `out`'s place when complete (`atomic_dir`), so a failed
    copy never leaves half a base."""
    import yaml

    def stage(checkpoint: Path) -> dict:
        run_dir = checkpoint.parent.parent
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
        return {"checkpoint": checkpoint.name, "config": yaml.safe_load((run_dir / "config.yaml").read_text()),
                "final_log": log[-1] if log else {}}

    recipe = {"command": command, "preset": PRETRAIN_PRESET, **stage(checkpoint)}
    start = recipe["config"]["model"].get("checkpoint")
    if start and (Path(start) / "model").is_dir() and (Path(start).parent.parent / "config.yaml").is_file():
        recipe["started_from"] = stage(Path(start))   # stage 1 (demo_tags): its config and final log
    with atomic_dir(out) as tmp:
        shutil.copytree(checkpoint / "model", tmp, dirs_exist_ok=True)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return out


def _evaluate(model, cfg, records, out: Path | None, layers: tuple[int, ...], combine: str = "mean",
              split: str = "test"):
    """(`split` summary, the GradcamMaps source) at GradCAM `layers`, the run's head."""
    from hist_vlm.eval.grounding import GradcamMaps, evaluate

    source = GradcamMaps(model, layers=list(layers), head=cfg.loss.capture_head, combine=combine)
    report = evaluate(records, source, batch_size=64, progress=False, out=out)
    return report.summary()[split], source


def choose_eval_layers(base, cfg, val_records) -> tuple[tuple[int, ...], dict[tuple[int, ...], float]]:
    """The GradCAM layers the demo evaluates every model with, and the base's val pointing of
    each candidate: the training layers (`loss.capture_layers`), each cross-attention layer
    alone, and the mean of all of their maps. The base's best val single-phrase pointing wins,
    ties to the earlier. Chosen by the base alone, on val, before any fine-tuned model is
    evaluated: one fixed rule for baseline and HIST (the paper chooses its layer too, Table 7).
    Training stays at its own layer: the best layer to train the addition loss through (one
    with layers above it) need not be the one whose map points best."""
    n = base.num_cross_attention_layers
    candidates = [tuple(cfg.loss.capture_layers), *((x,) for x in range(n)), tuple(range(n))]
    scores = {}
    for layers in dict.fromkeys(candidates):
        scores[layers] = _evaluate(base, cfg, val_records, None, layers, "mean", "val")[0]["pointing"]
    return max(scores, key=lambda k: scores[k]), scores


def layers_label(layers: tuple[int, ...]) -> str:
    return f"L{layers[0]}" if len(layers) == 1 else "mean(" + ", ".join(f"L{x}" for x in layers) + ")"


def run_demo(settings: DemoSettings) -> DemoResult:
    from hist_vlm.data.grounding import read_synthetic
    from hist_vlm.models import load_backbone
    from hist_vlm.models.registry import model_folder
    from hist_vlm.train.checkpoint import latest_checkpoint

    if not (model_folder(settings.base) / "config.json").is_file():
        from hist_vlm.train.config import ConfigError

        raise ConfigError(f"{settings.base}: no pretrained model there (no config.json); "
                          "rebuild the demo's base with hist-vlm demo --pretrain")
    phrases, world = prepare_world(settings)
    records = read_synthetic(world / "grounding.jsonl", splits=["test"])
    cfg0 = _train_config(settings, settings.variants[0], settings.seeds[0], phrases, world)
    tqdm.write(f"== base model ({settings.base})")
    base = load_backbone(settings.base)
    layers, combine, val_pointing = tuple(cfg0.loss.capture_layers), cfg0.loss.capture_combine, {}
    if settings.eval_layers == "val":
        val = read_synthetic(world / "grounding.jsonl", splits=["val"])
        (layers, val_pointing), combine = choose_eval_layers(base, cfg0, val), "mean"
        tqdm.write("   val pointing of the base: " + ", ".join(
            f"{layers_label(k)} {100 * v:.1f}" for k, v in val_pointing.items()) + f" -> {layers_label(layers)}")
    summary, base_source = _evaluate(base, cfg0, records, settings.out_dir / "base_eval_test.jsonl", layers,
                                     combine)
    base_metrics = {key: summary[key] for key, _ in METRICS}
    metrics: dict[str, dict[str, list[float]]] = {v: {k: [] for k, _ in METRICS} for v in settings.variants}
    figure_maps: dict[str, object] = {"base": base_source}
    runs = {(seed, variant): _train_config(settings, variant, seed, phrases, world)
            for seed in settings.seeds for variant in settings.variants}
    train_runs({f"{VARIANTS[v][0]}, seed {seed}": cfg for (seed, v), cfg in runs.items()}, settings.jobs)
    for (seed, variant), cfg in runs.items():
        run_dir = Path(cfg.run.dir)
        summary, source = _evaluate(load_backbone(latest_checkpoint(run_dir)), cfg, records,
                                    run_dir / "eval_test.jsonl", layers, combine)
        for key, _ in METRICS:
            metrics[variant][key].append(summary[key])
        if seed == settings.seeds[0]:
            figure_maps[variant] = source
    figure = settings.out_dir / "heatmaps.png"
    _comparison_figure(records, figure_maps, figure)
    table = format_table(metrics, base_metrics, settings.variants)
    table += (f"\n\nGradCAM: trained at {layers_label(tuple(cfg0.loss.capture_layers))}, "
              f"evaluated at {layers_label(layers)}")
    if val_pointing:
        table += (f" (the base's best single-phrase pointing on {settings.n_val} val scenes: " + ", ".join(
            f"{layers_label(k)} {100 * v:.1f}" for k, v in val_pointing.items()) + ")")
    with atomic_files(settings.out_dir / "results.md", settings.out_dir / "results.json") as (md, js):
        md.write_text(table + "\n", encoding="utf-8")
        js.write_text(json.dumps({
            "base": base_metrics, **metrics,
            "eval_layers": {"chosen": list(layers), "val_pointing": {layers_label(k): v for k, v in val_pointing.items()}},
        }, indent=1), encoding="utf-8")
    return DemoResult(table=table, metrics=metrics, base_metrics=base_metrics, eval_layers=layers,
                      val_pointing=val_pointing, figure=figure)


def _cell(values: list[float]) -> str:
    """mean ± sample std (0 with one value), in percent."""
    values = [100 * v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def paired_differences(metrics: dict[str, dict[str, list[float]]], key: str, variant: str) -> list[float]:
    """`variant` − baseline per seed (same seed = same data order and draws)."""
    return [h - b for h, b in zip(metrics[variant][key], metrics["baseline"][key])]


def format_table(metrics: dict[str, dict[str, list[float]]], base: dict[str, float],
                 variants: tuple[str, ...] = MAIN) -> str:
    """Markdown table, in percent. With the two main variants: one row per metric (base,
    baseline, HIST, paired difference with the per-seed values). With more (the ablation):
    one row per variant, a column per metric, the base model first."""
    n_seeds = len(metrics[variants[0]][METRICS[0][0]])
    seeds = f"{n_seeds} seed{'s' if n_seeds > 1 else ''}"
    if tuple(variants) == MAIN:
        lines = [f"| test metric ({seeds}) | base (no fine-tuning) | baseline | HIST | HIST − baseline (paired) | per seed |",
                 "|---|---|---|---|---|---|"]
        for key, label in METRICS:
            diff = paired_differences(metrics, key, "hist")
            per_seed = ", ".join(f"{100 * d:+.1f}" for d in diff)
            lines.append(f"| {label} | {100 * base[key]:.1f} | {_cell(metrics['baseline'][key])} | "
                         f"{_cell(metrics['hist'][key])} | {_cell(diff)} | {per_seed} |")
        return "\n".join(lines)
    lines = [f"| variant ({seeds}) | " + " | ".join(label for _, label in METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|",
             "| base (no fine-tuning) | " + " | ".join(f"{100 * base[k]:.1f}" for k, _ in METRICS) + " |"]
    for v in variants:
        lines.append(f"| {VARIANTS[v][0]} | " + " | ".join(_cell(metrics[v][k]) for k, _ in METRICS) + " |")
    return "\n".join(lines)


def _comparison_figure(records, sources: dict, out: Path, n_queries: int = 4) -> None:
    """The same test queries (composite ones first) under every model, side by side, the
    untouched image first, stars on the top-4 points and the referred boxes drawn."""
    import torch

    from hist_vlm.data.images import open_rgb
    from hist_vlm.eval.heatmap import save_heatmap_grid

    picked = [r for r in records if r.kind == "composite"][: n_queries - 1]
    picked += [r for r in records if r.kind != "composite"][: n_queries - len(picked)]
    rows = []
    for rec in picked:
        image = open_rgb(rec.image)
        heats = []
        for source in sources.values():
            pixels = source.preprocess(image)[None]
            heats.append(source(pixels, [rec.text], torch.zeros(1, dtype=torch.long))[0].detach().cpu())
        rows.append((image, rec.text, heats, rec.boxes))
    titles = [VARIANTS[name][0].split(" (")[0] if name in VARIANTS else name for name in sources]
    save_heatmap_grid(rows, titles, out)
