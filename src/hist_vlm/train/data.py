"""Which parse file and image folder a run trains on; builds the synthetic world when asked.

The synthetic world is the demo's (`hist_vlm.demo.synthetic`, registered as the "captions_world"
generator of the `hist_vlm.plugins` entry point). Its path runs the same steps a user runs by hand (`generate_world`, then the
`hist-vlm parse` pipeline: caption reader, spaCy parser, Algorithm 1) once, on rank 0, into
`RUN/world/`; a resumed run finds it there and reuses it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hist_vlm.plugins import generator
from hist_vlm.train.config import ConfigError, DataConfig


def prepare_data(cfg: DataConfig, run_dir: Path, is_main: bool, barrier: Callable[[], None]) -> tuple[Path, Path]:
    """(phrase file, image root) for this run."""
    if not cfg.synthetic.enabled:
        if not cfg.phrases:
            raise ConfigError("data.phrases is empty: give a `hist-vlm parse` output file "
                              "(or set data.synthetic.enabled=true)")
        phrases = Path(cfg.phrases)
        if not phrases.is_file():
            raise ConfigError(f"data.phrases: file not found: {phrases}")
        root = Path(cfg.image_root) if cfg.image_root else phrases.parent
        if not root.is_dir():
            raise ConfigError(f"data.image_root: folder not found: {root}")
        return phrases, root
    world = run_dir / "world"
    phrases = world / "phrases_train.jsonl"
    if is_main and not phrases.is_file():
        _build_synthetic(cfg, world, phrases)
    barrier()
    return phrases, world


def _build_synthetic(cfg: DataConfig, world: Path, phrases: Path) -> None:
    try:
        generate_parsed_world = generator("captions_world", "data.synthetic.enabled=true")
    except LookupError as e:
        raise ConfigError(str(e)) from None
    syn = cfg.synthetic
    generate_parsed_world(world, phrases, n_train=syn.n_train, n_val=syn.n_val, n_test=syn.n_test,
                          image_size=syn.image_size, seed=syn.seed)
