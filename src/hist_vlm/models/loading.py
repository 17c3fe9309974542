"""One loader for every kind of trained weights, shared by training (`model.checkpoint`) and
evaluation (`--checkpoint`), so both accept exactly the same paths:

- a `save_pretrained` folder (ALBEF: `config.json` with "backbone" + `model.safetensors`),
- a training checkpoint `RUN/checkpoints/step-N` (its `model/` folder is used; for a backbone
  without `save_pretrained`, BLIP today, `model/` holds the wrapper's full state + its build config),
- an official ALBEF / SelfEQ `.pth` file,
- a transformers `BlipForImageTextRetrieval` folder,
- the name of a model shipped in the package (`demo_base`: the demo's pretrained tiny ALBEF).

Anything else is an error naming what was expected, never a randomly initialised model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EXPECTED = (
    "a save_pretrained folder (config.json + model.safetensors), a training checkpoint "
    "RUN/checkpoints/step-N (with model/), an official ALBEF .pth, or a BLIP transformers folder"
)
_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"


#: models shipped as package data, found by name from any directory
PACKAGED = {"demo_base": Path(__file__).resolve().parent.parent / "demo_base"}


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` itself when it exists, else the packaged model of that name, else `path`
    (the caller reports it as not found)."""
    path = Path(path)
    if not path.exists() and str(path) in PACKAGED:
        return PACKAGED[str(path)]
    return path


def model_folder(path: str | Path) -> Path:
    """The folder holding the weights: `path/model` for a training checkpoint, else `path`."""
    path = Path(path)
    return path / "model" if (path / "model" / _CONFIG).is_file() else path


def checkpoint_backbone(path: str | Path) -> str:
    """albef | blip, as the checkpoint itself says (our "backbone" key, or transformers'
    "model_type"); a single file can only be an official ALBEF/SelfEQ checkpoint."""
    path = model_folder(path)
    if path.is_file():
        return "albef"
    cfg_path = path / _CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no {_CONFIG}; expected {EXPECTED}")
    try:
        payload = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    name = payload.get("backbone") or payload.get("model_type") if isinstance(payload, dict) else None
    if name not in ("albef", "blip"):
        raise ValueError(f"{cfg_path}: cannot tell the backbone (backbone/model_type = {name!r}); expected {EXPECTED}")
    return name


def load_pretrained(
    checkpoint: str | Path,
    name: str | None = None,
    *,
    params: dict[str, Any] | None = None,
    image_size: int | None = None,
    verbose: bool = False,
):
    """The backbone stored at `checkpoint` (see the module docstring for the accepted kinds).

    `name` ("albef" | "blip") defaults to what the checkpoint says. `params` are build settings
    for what stores no config of ours (an official `.pth`: sizes such as `text_heads` or
    `image_size`; a transformers BLIP folder: `BlipBackbone` keywords); a folder we saved
    describes itself and ignores them. `image_size` builds an official `.pth` at that
    resolution (position embeddings interpolated), as ALBEF evaluates RefCOCO+ at 384 px.
    """
    path = resolve_checkpoint(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    path = model_folder(path)
    name = name or checkpoint_backbone(path)
    params = dict(params or {})
    if name == "albef":
        from hist_vlm.models.albef import AlbefModel

        if path.is_file():
            sizes = {**params, **({"image_size": image_size} if image_size else {})}
            return AlbefModel.from_albef_checkpoint(path, verbose=verbose, **sizes)
        if image_size is not None:
            raise ValueError("an input size can only be chosen for an official .pth checkpoint")
        return AlbefModel.from_pretrained(path)
    if name == "blip":
        if path.is_file():
            raise ValueError(f"{path}: a BLIP checkpoint is a folder; expected {EXPECTED}")
        if image_size is not None:
            raise ValueError("an input size can only be chosen for an official .pth checkpoint")
        stored = _our_payload(path)
        if stored is not None:  # a training checkpoint's model/: the wrapper's own state
            from safetensors.torch import load_model

            from hist_vlm.models import build_backbone

            model = build_backbone("blip", stored.get("config") or {})
            load_model(model, str(path / _WEIGHTS), strict=True)
            return model.eval()
        from hist_vlm.models.blip import BlipBackbone

        return BlipBackbone.from_pretrained(path, **params)
    raise ValueError(f"unknown backbone {name!r} (albef or blip)")


def _our_payload(path: Path) -> dict | None:
    """config.json of a folder we wrote ({"backbone": ..., "config": ...}), else None."""
    cfg_path = path / _CONFIG
    if not cfg_path.is_file():
        return None
    payload = json.loads(cfg_path.read_text())
    if isinstance(payload, dict) and "backbone" in payload:
        if not (path / _WEIGHTS).is_file():
            raise FileNotFoundError(f"{path}: {_WEIGHTS} missing; expected {EXPECTED}")
        return payload
    return None
