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
complete new one; the next save removes what a killed one left. A save the disk cannot take
(full, read-only) is one `TrainingError` line and leaves the previous checkpoints as they were;
weights holding inf or NaN are never saved (`NonFiniteError`).

Reading back (`read_checkpoint`) reads and checks every part before anything is applied, so a
damaged folder (a truncated safetensors or .pt file, a missing or corrupt state.json, ...) is a
`DamagedCheckpoint` naming the file, and `--resume` falls back to the previous complete one
(`newest_loadable`).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from hist_vlm._io import atomic_dir, remove_stale_temps
from hist_vlm.models.base import VisionLanguageBackbone
from hist_vlm.train.config import ConfigError
from hist_vlm.train.errors import NonFiniteError, TrainingError

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
    """Write checkpoint `step-<global_step>` atomically and keep only the newest `keep`.
    Folders of later steps (a damaged one `--resume` fell back from) belong to the abandoned
    continuation and are removed once this one is in place."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{_PREFIX}{position.global_step:08d}"
    loss_state = _loss_state(objective, model)
    bad = non_finite({**{f"model.{k}": v for k, v in model.state_dict().items()},
                      **{f"loss.{k}": v for k, v in loss_state.items()}})
    if bad:
        raise NonFiniteError(f"not saving {final.name}: {_listed(bad)} hold inf or NaN values; "
                             "the previous checkpoints are kept")
    try:
        with atomic_dir(final) as tmp:  # hidden `.step-...tmp-<pid>` until complete, then renamed
            model.save_pretrained(tmp / "model")
            save_file(loss_state, str(tmp / "loss.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_states, tmp / "rng.pt")
            (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            (tmp / "state.json").write_text(json.dumps(asdict(position), indent=2))  # written last: marks complete
    except (OSError, SafetensorError, RuntimeError) as e:  # a full or read-only disk (torch.save: RuntimeError)
        reason = getattr(e, "strerror", None) or _first_line(e)
        raise TrainingError(f"cannot save checkpoint {final}: {reason}; nothing of it was kept, the previous "
                            "checkpoints are intact") from None
    folders = step_folders(root.parent)
    for later in (p for p in folders if _step_of(p) > position.global_step):
        shutil.rmtree(later, ignore_errors=True)
    for old in [p for p in folders if _step_of(p) <= position.global_step][:-keep]:
        shutil.rmtree(old)
    remove_stale_temps(root)  # left behind by a killed save of any step
    for legacy in root.glob(".tmp-*"):  # the temp names of saves before `atomic_dir`
        shutil.rmtree(legacy, ignore_errors=True)
    return final


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _listed(names: list[str], most: int = 3) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding an inf or NaN (one host sync in all)."""
    floats = {k: v for k, v in tensors.items() if torch.is_floating_point(v) and v.numel()}
    if not floats:
        return []
    flags = torch.stack([torch.isfinite(v).all() for v in floats.values()]).tolist()
    return [k for k, ok in zip(floats, flags) if not ok]


def _step_of(folder: Path) -> int:
    return int(folder.name[len(_PREFIX):])


def step_folders(run_dir: str | Path) -> list[Path]:
    """Every `RUN/checkpoints/step-N` folder, complete or not, oldest step first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob(f"{_PREFIX}*") if re.fullmatch(rf"{_PREFIX}\d+", p.name) and p.is_dir()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint folder with its state.json (written last); `newest_loadable`
    also reads it back."""
    done = [p for p in step_folders(run_dir) if (p / "state.json").is_file()]
    return done[-1] if done else None


class DamagedCheckpoint(TrainingError):
    """A checkpoint folder that cannot be read back; the message names the file."""


@dataclass
class SavedStates:
    """A checkpoint read into memory and checked, not yet applied (`apply_checkpoint`)."""

    path: Path
    position: Position
    config: dict[str, Any]
    loss: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]] = field(default_factory=list)


def _check_weights(file: Path) -> None:
    """The safetensors header parses and the file holds every byte it announces (a truncated or
    empty file does not); the tensors themselves are read when applied."""
    with safe_open(str(file), "pt") as f:
        f.keys()


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {type(value).__name__}")
    return value


def read_checkpoint(path: str | Path) -> SavedStates:
    """Every part of checkpoint `path` read and checked; a part that is missing or cannot be read
    is a `DamagedCheckpoint` naming it."""
    path = Path(path)

    def part(name: str, read):
        file = path / name
        if not file.is_file():
            raise DamagedCheckpoint(f"{file} is missing")
        try:
            return read(file)
        except Exception as e:  # truncated, corrupt, not what we wrote: whatever the reader raises
            raise DamagedCheckpoint(f"{file} cannot be read ({_first_line(e)})") from None

    position = part("state.json", lambda f: Position(**_mapping(json.loads(f.read_text()))))
    config = part("config.yaml", lambda f: _mapping(yaml.safe_load(f.read_text())))
    part("model/config.json", lambda f: _mapping(json.loads(f.read_text())))
    part(f"model/{_WEIGHTS}", _check_weights)
    loss = part("loss.safetensors", lambda f: load_file(str(f)))
    optimizer = part("optimizer.pt", lambda f: _mapping(torch.load(f, weights_only=True)))
    scheduler = part("scheduler.pt", lambda f: _mapping(torch.load(f, weights_only=True)))
    rng = part("rng.pt", lambda f: torch.load(f, weights_only=True))
    if not isinstance(rng, list) or not rng:
        raise DamagedCheckpoint(f"{path / 'rng.pt'} holds no RNG states")
    return SavedStates(path, position, config, loss, optimizer, scheduler, rng)


def newest_loadable(run_dir: str | Path, warn) -> SavedStates | None:
    """The newest checkpoint of `run_dir` that reads back whole; each newer damaged one is
    named by `warn(line)`. None when there is none."""
    for folder in reversed(step_folders(run_dir)):
        try:
            saved = read_checkpoint(folder)
        except DamagedCheckpoint as e:
            warn(f"warning: checkpoint {folder.name} is damaged ({e}); trying the previous one")
            continue
        return saved
    return None


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[Position, list[dict[str, Any]]]:
    """Restore every state in place; returns the data position and the per-rank RNG states.
    Every part is read (`read_checkpoint`: a damaged one is a `DamagedCheckpoint`) before any is applied."""
    saved = read_checkpoint(path)
    apply_checkpoint(saved, model=model, objective=objective, optimizer=optimizer, scheduler=scheduler)
    return saved.position, saved.rng


def apply_checkpoint(
    saved: SavedStates,
    *,
    model: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Put the states `read_checkpoint` read into the modules, optimizer and schedule."""
    path = saved.path
    try:
        if isinstance(model, VisionLanguageBackbone):  # it knows what it saved (LoRA: the adapters only)
            model.load_saved_weights(path / "model")
        else:
            load_model(model, str(path / "model" / _WEIGHTS), strict=True)
    except SafetensorError as e:   # damaged after it was checked (the tensor bytes themselves)
        raise DamagedCheckpoint(f"{path / 'model' / _WEIGHTS} cannot be read ({_first_line(e)})") from None
    except ValueError as e:        # the backbone's own reader: the same, as its one line
        raise DamagedCheckpoint(str(e)) from None
    expected = _loss_state(objective, model).keys()
    loss_state = _renamed(saved.loss, expected)
    if set(loss_state) != set(expected):
        raise ConfigError(f"{path}: the loss state does not match this config's loss module")
    objective.load_state_dict(loss_state, strict=False)
    optimizer.load_state_dict(saved.optimizer)
    scheduler.load_state_dict(saved.scheduler)
