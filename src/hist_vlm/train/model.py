"""The backbone a run trains: built from `model.params`, or loaded from `model.checkpoint`.

The network's input size is `data.image_size`: it is passed to the backbone as `image_size`
(an official ALBEF checkpoint at another resolution gets its position embeddings interpolated),
and a `model.params.image_size` that disagrees is an error rather than a crash mid-step.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hist_vlm.models import build_backbone
from hist_vlm.models.base import VisionLanguageBackbone
from hist_vlm.train.config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig, image_size: int) -> VisionLanguageBackbone:
    if cfg.name not in ("albef", "blip"):
        raise ConfigError(f"model.name must be albef or blip, got {cfg.name!r}")
    given = cfg.params.get("image_size", image_size)
    if given != image_size:
        raise ConfigError(f"model.params.image_size={given} but data.image_size={image_size}: set one of them")
    if cfg.checkpoint is None:
        return build_backbone(cfg.name, {**cfg.params, "image_size": image_size})
    path = Path(cfg.checkpoint)
    if not path.exists():
        raise ConfigError(f"model.checkpoint not found: {path}")
    if cfg.name == "albef":
        from hist_vlm.models.albef import AlbefModel

        if path.is_dir():
            model = AlbefModel.from_pretrained(path)
        else:
            model = AlbefModel.from_albef_checkpoint(path, **{**cfg.params, "image_size": image_size})
    else:
        from hist_vlm.models.blip import BlipBackbone

        model = BlipBackbone.from_pretrained(path, **cfg.params)
    _check_input_size(model, image_size, path)
    return model


def _check_input_size(model: VisionLanguageBackbone, image_size: int, path: Path) -> None:
    """A pretrained model is built for its own resolution: try one blank image now."""
    try:
        with torch.no_grad():
            model.encode_image(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ConfigError(f"{path} does not take data.image_size={image_size} inputs ({e})") from None
