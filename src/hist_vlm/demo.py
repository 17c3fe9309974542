"""The main job: the same tiny model trained with and without HIST on the synthetic world.

Every step is the real pipeline a user runs by hand: `generate_world` writes images and a
captions JSONL, the caption reader + spaCy parser + Algorithm 1 (`hist-vlm parse`) turn it into
phrases and pairs, `hist_vlm.train.train` trains from that file, and the grounding runner
(`hist-vlm eval pointing`) scores the test split. Baseline and HIST start from the same
initialisation (same seed) and see the same batches; only `loss.schedule` differs.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

VARIANTS = ("baseline", "hist")
#: test-split metrics reported by the demo: (key in EvalReport.summary(), label)
METRICS = (
    ("pointing", "single-phrase pointing"),
    ("both_hit", "composite both-hit (top-4)"),
    ("ciou", "composite mask cIoU"),
)


@dataclass
class DemoSettings:
    """Sizes of one demo run. `quick()` is the test-suite variant (one seed, smaller)."""

    config: Path                       # training preset (configs/demo_tiny.yaml)
    out_dir: Path = Path("demo_out")
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 512
    n_test: int = 128
    image_size: int = 64
    world_seed: int = 0
    hist_schedule: str = "paper"
    overrides: list[str] = field(default_factory=list)   # extra key=value for both variants

    @classmethod
    def quick(cls, config: Path, out_dir: Path) -> "DemoSettings":
        return cls(config=config, out_dir=out_dir, seeds=(0,), n_train=128, n_test=32,
                   overrides=["schedule.epochs=2", "data.batch_size=16"])


@dataclass
class DemoResult:
    table: str                                  # the markdown table printed at the end
    metrics: dict[str, dict[str, list[float]]]  # variant -> metric -> one value per seed
    figure: Path


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_vocab(caption_file: Path, out: Path) -> int:
    """A WordPiece vocabulary of the training captions' words (ALBEF's cleaning), for a model
    trained from scratch: the demo world has ~60 words, and an MLM head over bert-base's 30,522
    would cost most of a tiny model's step. Returns the vocabulary size."""
    import re

    from hist_vlm.data.captions import read_captions
    from hist_vlm.models.tokenization import pre_caption

    words: set[str] = set()
    for _, captions in read_captions(caption_file, "jsonl"):
        for caption in captions:
            words.update(re.findall(r"\w+|[^\w\s]", pre_caption(caption)))
    vocab = [*SPECIAL_TOKENS, *sorted(words)]
    out.write_text("\n".join(vocab) + "\n")
    return len(vocab)


def prepare_world(settings: DemoSettings) -> tuple[Path, Path]:
    """Synthetic world + parsed training captions + their vocabulary, built once and reused:
    (phrases, world dir)."""
    from hist_vlm.data.captions import read_captions
    from hist_vlm.data.synthetic import generate_world
    from hist_vlm.text.corpus import atomic_write_jsonl, parse_images
    from hist_vlm.text.spacy_parser import SpacyParser

    world = settings.out_dir / "world"
    phrases = world / "phrases_train.jsonl"
    stamp = world / "demo_world.json"
    want = {"n_train": settings.n_train, "n_test": settings.n_test,
            "image_size": settings.image_size, "seed": settings.world_seed}
    if phrases.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return phrases, world
    paths = generate_world(world, n_train=settings.n_train, n_val=0, n_test=settings.n_test,
                           image_size=settings.image_size, seed=settings.world_seed)
    images = read_captions(paths.captions["train"], "jsonl")
    atomic_write_jsonl(phrases, parse_images(images, SpacyParser(), seed=settings.world_seed))
    write_vocab(paths.captions["train"], world / "vocab.txt")
    stamp.write_text(json.dumps(want))
    return phrases, world


def _train_config(settings: DemoSettings, variant: str, seed: int, phrases: Path, world: Path):
    from hist_vlm.train.config import load_config

    overrides = [
        f"run.dir={settings.out_dir / 'runs' / f'{variant}-seed{seed}'}",
        f"run.seed={seed}",
        "data.synthetic.enabled=false",
        f"data.phrases={phrases}",
        f"data.image_root={world}",
        f"data.image_size={settings.image_size}",
        f"model.params.image_size={settings.image_size}",
        f"model.params.vocab_file={world / 'vocab.txt'}",
        f"model.params.vocab_size={len((world / 'vocab.txt').read_text().split())}",
        f"loss.schedule={'off' if variant == 'baseline' else settings.hist_schedule}",
        *settings.overrides,
    ]
    return load_config(settings.config, overrides)


def _train_and_load(cfg):
    """Train (or reuse a finished run of the same config) and return the final model."""
    import shutil

    from hist_vlm.eval.runner import load_backbone
    from hist_vlm.train.checkpoint import latest_checkpoint
    from hist_vlm.train.loop import train

    run_dir = Path(cfg.run.dir)
    done = run_dir / "finished.json"
    if not (done.is_file() and json.loads(done.read_text()) == cfg.to_dict()):
        shutil.rmtree(run_dir, ignore_errors=True)  # a stale or interrupted run of other settings
        train(cfg, progress=True)
        done.write_text(json.dumps(cfg.to_dict()))
    return load_backbone(latest_checkpoint(run_dir))


def run_demo(settings: DemoSettings) -> DemoResult:
    from hist_vlm.data.grounding import read_synthetic
    from hist_vlm.eval.runner import GradcamMaps, evaluate

    phrases, world = prepare_world(settings)
    records = read_synthetic(world / "grounding.jsonl", splits=["test"])
    metrics: dict[str, dict[str, list[float]]] = {v: {k: [] for k, _ in METRICS} for v in VARIANTS}
    figure_maps: dict[str, object] = {}
    for seed in settings.seeds:
        for variant in VARIANTS:
            tqdm.write(f"== {variant}, seed {seed}")
            cfg = _train_config(settings, variant, seed, phrases, world)
            model = _train_and_load(cfg)
            source = GradcamMaps(model, layers=cfg.loss.capture_layers, head=cfg.loss.capture_head,
                                 combine=cfg.loss.capture_combine)
            report = evaluate(records, source, batch_size=64, progress=False,
                              out=Path(cfg.run.dir) / "eval_test.jsonl")
            summary = report.summary()["test"]
            for key, _ in METRICS:
                metrics[variant][key].append(summary[key])
            if seed == settings.seeds[0]:
                figure_maps[variant] = source
    figure = settings.out_dir / "heatmaps.png"
    _comparison_figure(records, figure_maps, figure)
    table = format_table(metrics, len(settings.seeds))
    (settings.out_dir / "results.md").write_text(table + "\n")
    (settings.out_dir / "results.json").write_text(json.dumps(metrics, indent=1))
    return DemoResult(table, metrics, figure)


def format_table(metrics: dict[str, dict[str, list[float]]], n_seeds: int) -> str:
    """Markdown table of mean ± std (sample std over seeds; 0 with one seed), in percent."""

    def cell(values: list[float]) -> str:
        values = [100 * v for v in values if not math.isnan(v)]
        if not values:
            return "n/a"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.1f} ± {std:.1f}"

    lines = [f"| test metric ({n_seeds} seed{'s' if n_seeds > 1 else ''}) | baseline | HIST |",
             "|---|---|---|"]
    for key, label in METRICS:
        lines.append(f"| {label} | {cell(metrics['baseline'][key])} | {cell(metrics['hist'][key])} |")
    return "\n".join(lines)


def _comparison_figure(records, sources: dict, out: Path, n_queries: int = 4) -> None:
    """Baseline vs HIST maps of the same test queries (composite ones first), side by side."""
    import torch
    from PIL import Image

    from hist_vlm.eval.heatmap import save_heatmap_grid

    picked = [r for r in records if r.kind == "composite"][: n_queries - 1]
    picked += [r for r in records if r.kind != "composite"][: n_queries - len(picked)]
    rows = []
    for rec in picked:
        with Image.open(rec.image) as im:
            image = im.convert("RGB")
        heats = []
        for variant in VARIANTS:
            source = sources[variant]
            pixels = source.preprocess(image)[None]
            heats.append(source(pixels, [rec.text], torch.zeros(1, dtype=torch.long))[0].detach().cpu())
        rows.append((image, rec.text, heats, rec.boxes))
    save_heatmap_grid(rows, ["baseline", "HIST"], out)
