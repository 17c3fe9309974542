"""Which parse file and image folder a run trains on; builds the synthetic world when asked.

The synthetic world is the demo's (`hist_vlm.demo.synthetic`, registered as the "captions_world"
generator of the `hist_vlm.plugins` entry point). Its path runs the same steps a user runs by hand (`generate_world`, then the
`hist-vlm parse` pipeline: caption reader, spaCy parser, Algorithm 1) once, on rank 0, into
`RUN/world/`, with the recipe it was built from (`data.synthetic`) in `RUN/world/recipe.json`. A
later run reuses it only when the recipe is the same: a changed one (or a world of an earlier
version, without the stamp) is rebuilt, said in one line, never trained on under a config that
describes another.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hist_vlm._io import atomic_write_text

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
    if is_main:
        try:
            generate_parsed_world = generator("captions_world", "data.synthetic.enabled=true")
        except LookupError as e:
            raise ConfigError(str(e)) from None
        syn = cfg.synthetic
        synthetic_world(world, recipe(syn), phrases, "data.synthetic", lambda: generate_parsed_world(
            world, phrases, n_train=syn.n_train, n_val=syn.n_val, n_test=syn.n_test,
            image_size=syn.image_size, seed=syn.seed))
    barrier()
    return phrases, world


RECIPE_FILE = "recipe.json"


def recipe(synthetic: Any) -> dict[str, Any]:
    """What a synthetic world is built from: its `SyntheticConfig` without `enabled`."""
    return {k: v for k, v in dataclasses.asdict(synthetic).items() if k != "enabled"}


def synthetic_world(folder: Path, want: dict[str, Any], complete: Path, section: str,
                    build: Callable[[], None]) -> None:
    """`folder` built by `build()` from recipe `want` (the `section` settings), unless a
    complete one (`complete` exists) of that very recipe is there: one of another recipe, or of
    none (an earlier version wrote no stamp), is removed and rebuilt, said in one line. The stamp
    is written last, so an interrupted build is rebuilt too."""
    stamp = folder / RECIPE_FILE
    try:
        have = json.loads(stamp.read_text())
    except (OSError, ValueError):
        have = None
    if complete.is_file() and have == want:
        return
    if complete.is_file():
        if isinstance(have, dict):
            changed = [k for k in want if have.get(k) != want[k]]
            why = ("was built for " + ", ".join(f"{section}.{k}={have.get(k)!r}" for k in changed)
                   + "; rebuilding it for " + ", ".join(f"{k}={want[k]!r}" for k in changed))
        else:
            why = "has no recipe stamp (an earlier version built it); rebuilding it from " + section
        print(f"note: {folder} {why}", file=sys.stderr)
    if folder.exists():
        shutil.rmtree(folder)
    build()
    atomic_write_text(stamp, json.dumps(want, sort_keys=True))
