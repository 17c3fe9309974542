"""Training checkpoints: everything `--resume` needs to continue exactly, written atomically.

Layout of `RUN/checkpoints/step-00001234/`:
    model/                          the backbone (momentum copies included), as its `save_pretrained`
                                    writes it (model.safetensors + config.json): eval loads it as is
    loss.safetensors                the loss module's own state (ITC queues, ...), model tensors excluded
    optimizer.pt, scheduler.pt      torch state dicts (tensors and numbers only: weights_only loads them)
    rng.pt                          python / numpy / torch / cuda RNG states, one entry per rank
    state.json                      data position: epoch, step in epoch, global step, sampler seed
    config.yaml                     the resolved training config
A checkpoint is built in a hidden temp dir beside its final name and renamed into place
(`hist_vlm._io.atomic_dir`), so a kill at any moment leaves either the previous checkpoints or a
complete new one; the next save removes what a killed one left.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from hist_vlm._io import atomic_dir, remove_stale_temps

_PREFIX = "step-"
_WEIGHTS = "model.safetensors"


@dataclass
class Position:
    """Where training stands: the next optimizer step is `step_in_epoch` of `epoch`."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    seed: int = 0                 # the sampler's order seed
    global_batch: int = 0         # images per optimizer step over all ranks (fixes the order)
    skipped_images: int = 0


def _generators(module: nn.Module) -> dict[str, torch.Generator]:
    """Private `torch.Generator`s held by `module` or its submodules (the loss draws its
    negatives and MLM masks from one), by attribute path."""
    return {
        f"{prefix}.{attr}" if prefix else attr: value
        for prefix, sub in module.named_modules()
        for attr, value in vars(sub).items()
        if isinstance(value, torch.Generator)
    }


def rng_state(module: nn.Module) -> dict[str, Any]:
    """This process's RNG states (global ones and `module`'s generators), in types
    `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                         for k, v in np_state["state"].items()}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: (str(g.device), g.get_state()) for name, g in _generators(module).items()},
    }


def set_rng_state(state: dict[str, Any], module: nn.Module) -> None:
    for name, (device, gen_state) in state["generators"].items():
        *path, attr = name.split(".")
        owner = module.get_submodule(".".join(path))
        generator = torch.Generator(device=device)
        generator.set_state(gen_state)
        setattr(owner, attr, generator)
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {k: (np.array(v, dtype=np.uint32) if isinstance(v, list) else v)
                         for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: loss-state keys of older checkpoints -> today's (the ITC queue moved into losses.itc.ItcLoss)
_RENAMED_LOSS_KEYS = {"queue.": "itc.queue."}


def _renamed(state: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """`state` with the keys of older checkpoints renamed to today's, where today's expects them."""
    out = {}
    for key, value in state.items():
        for old, new in _RENAMED_LOSS_KEYS.items():
            if key.startswith(old) and key not in expected and new + key[len(old):] in expected:
                key = new + key[len(old):]
        out[key] = value
    return out


def _loss_state(objective: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """The loss module's state without the tensors it shares with the model (it may hold it)."""
    owned = {t.data_ptr() for t in model.state_dict().values()}
    return {k: v.contiguous() for k, v in objective.state_dict().items() if v.data_ptr() not in owned}


def save_checkpoint(
    run_dir: str | Path,
    *,
    model: nn.Module,                  # a backbone, or a task model (VQA): anything with save_pretrained
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
    rng_states: list[dict[str, Any]],
    config: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `step-<global_step>` atomically and keep only the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{_PREFIX}{position.global_step:08d}"
    with atomic_dir(final) as tmp:  # hidden `.step-...tmp-<pid>` until complete, then renamed
        model.save_pretrained(tmp / "model")
        save_file(_loss_state(objective, model), str(tmp / "loss.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (tmp / "state.json").write_text(json.dumps(asdict(position), indent=2))  # written last: marks complete
    for old in sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    remove_stale_temps(root)  # left behind by a killed save of any step
    for legacy in root.glob(".tmp-*"):  # the temp names of saves before `atomic_dir`
        shutil.rmtree(legacy, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[Position, list[dict[str, Any]]]:
    """Restore every state in place; returns the data position and the per-rank RNG states."""
    path = Path(path)
    load_model(model, str(path / "model" / _WEIGHTS), strict=True)
    expected = _loss_state(objective, model).keys()
    loss_state = _renamed(load_file(str(path / "loss.safetensors")), expected)
    if set(loss_state) != set(expected):
        raise ValueError(f"{path}: the loss state does not match this config's loss module")
    objective.load_state_dict(loss_state, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_states = torch.load(path / "rng.pt", weights_only=True)
    position = Position(**json.loads((path / "state.json").read_text()))
    return position, rng_states
