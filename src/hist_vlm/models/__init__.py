"""Backbones behind one protocol (`base.VisionLanguageBackbone`) and a factory by name.

The backbone modules import torch, timm and transformers, so they are imported lazily:
`import hist_vlm.models` stays cheap for the CLI and the caption parser.
"""
from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hist_vlm.models.base import VisionLanguageBackbone

BACKBONES = ("albef", "blip")


def _as_dict(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if is_dataclass(config) and not isinstance(config, type):
        return asdict(config)
    raise TypeError(f"backbone config must be a dict or a dataclass, got {type(config).__name__}")


def build_backbone(name: str, config: Any = None) -> "VisionLanguageBackbone":
    """A randomly initialised backbone.

    albef: `config` is an `AlbefConfig` or a dict of its fields (ALBEF's names such as
           `image_res` or `hidden_size` are accepted too); None = ALBEF-base.
    blip:  `config` is a transformers `BlipConfig`, or a dict with `size` ("tiny" | "base"),
           optional `image_size`, `with_decoder`, and `BlipBackbone` keywords (`use_enc_token`,
           `temp`); None = tiny.
    Pretrained weights: `AlbefModel.from_albef_checkpoint` / `from_pretrained`, `BlipBackbone.from_pretrained`.
    """
    key = name.lower()
    if key == "albef":
        from hist_vlm.models.albef import AlbefConfig, AlbefModel

        cfg = config if isinstance(config, AlbefConfig) else AlbefConfig.from_dict(_as_dict(config))
        return AlbefModel(cfg)
    if key == "blip":
        from transformers import BlipConfig

        from hist_vlm.models.blip import BlipBackbone, blip_config

        if isinstance(config, BlipConfig):
            return BlipBackbone.from_config(config)
        params = _as_dict(config)
        size, image_size = params.pop("size", "tiny"), params.pop("image_size", None)
        return BlipBackbone.from_config(blip_config(size, image_size=image_size), **params)
    raise ValueError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
