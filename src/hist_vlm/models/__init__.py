"""Backbones behind one protocol (`base.VisionLanguageBackbone`), looked up by name in the
registry (`registry`). The backbone modules import torch, timm and transformers and are
imported only when a backbone is first looked up: `import hist_vlm.models` stays cheap for the
CLI and the caption parser.
"""
from hist_vlm.models.registry import (
    backbone_names,
    build_backbone,
    build_sized,
    checkpoint_backbone,
    get_backbone,
    load_backbone,
    register,
)

__all__ = ["backbone_names", "build_backbone", "build_sized", "checkpoint_backbone", "get_backbone",
           "load_backbone", "register"]
