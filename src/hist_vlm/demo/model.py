"""The demo's tiny model, registered as the backbone `albef_demo`: ALBEF with a convolutional
stem in place of ViT's patchify, and an initialisation for training from scratch at width 64.

The stem: overlapping 3x3 convolutions give each token a receptive field that holds one of the
world's shapes, where a 4-px patch does not (docs/experiments.md, "The demo base grounds
colours, not shapes"). Alone, trained on captions, it did not make the tower learn shapes (same
entry; "The convolutional stem (patch_embed=conv); the first base does not overfit"): the shapes
come from the tags stage (`demo_tags`, `hist_vlm.demo.tags`), and caption pretraining then keeps
the stem frozen ("What taught shapes: a tower tagged with every caption word", "The two-stage
base ships (demo_tags, then demo_pretrain)").

The init: the text side, projections and ITM head are drawn at 1/sqrt(fan_in), because BERT's
std 0.02 at width 64 makes every text layer nearly the identity and every caption one feature
("The first base: what made a tiny model ground"); the vision tower keeps timm's init (its
blocks start near the identity, the tower near its stem), which beat drawing it at
1/sqrt(fan_in) too ("The vision tower's initialisation: fan_in against fan_in_text"). Both
other choices were rejected for the demo, so this backbone has no init option.

Everything else is ALBEF's (`hist_vlm.models.albef`): the same parameter names, GradCAM,
losses, checkpoints and VQA head. Folders an earlier version saved as backbone "albef" with
`patch_embed: conv` load as this backbone (`LEGACY_FOLDER`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from safetensors.torch import load_model
from timm.layers import HybridEmbed, LayerNorm2d
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from hist_vlm.models.albef import TINY, AlbefConfig, AlbefModel
from hist_vlm.models.albef_vqa import AlbefVqaModel
from hist_vlm.models.layout import CONFIG_FILE, WEIGHTS_FILE
from hist_vlm.models.registry import ForeignFormat, register, register_head


@dataclass
class DemoAlbefConfig(AlbefConfig):
    """ALBEF's sizes; the patch embedding is log2(patch_size) stride-2 3x3 convolutions (timm's
    ConvStem + HybridEmbed, Xiao et al. 2021), each after `conv_stem_extra` stride-1 ones. With
    LayerNorm, not BatchNorm: a sample's tokens never depend on its batch (GradCAM batching and
    many-process training stay exact)."""

    #: stride-1 3x3 convolutions before each stride-2 one; each widens a token's receptive field
    #: at the same grid (patch 4: 7 px with none, 13 px with 1, 19 px with 2)
    conv_stem_extra: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"the convolutional stem needs a power-of-2 patch_size (stride-2 convolutions), "
                             f"got {self.patch_size}")
        if self.conv_stem_extra < 0:
            raise ValueError(f"conv_stem_extra must be >= 0, got {self.conv_stem_extra}")

    def patch_embedding(self) -> dict:
        halvings = self.patch_size.bit_length() - 1                  # stride 2 ** halvings = patch_size
        per_stage = self.conv_stem_extra + 1                         # stride-1 convolutions, then a stride-2 one
        # ConvStem's own tiers halve the channels at every layer (1 channel at depth 6 of 32):
        # here they halve per stride-2 stage, so an added layer never thins the stem
        channels = tuple(self.vision_width >> (halvings - 1 - k) for k in range(halvings) for _ in range(per_stage))
        strides = ((1,) * self.conv_stem_extra + (2,)) * halvings
        stem = ConvStem(in_chans=3, depth=len(strides), channels=channels, stride=strides,
                        kernel_size=3, norm_layer=LayerNorm2d, act_layer=nn.GELU)
        return {"patch_size": 1, "embed_layer": partial(HybridEmbed, backbone=stem, proj=False)}


def _init_fan_in(module: nn.Module) -> None:
    """normal(0, 1/sqrt(fan_in)) for every Linear, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=module.in_features ** -0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _claims_legacy_folder(path: Path) -> bool:
    """A folder an earlier version saved as backbone "albef" with the convolutional stem."""
    try:
        payload = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    config = payload.get("config") if isinstance(payload, dict) else None
    return payload.get("backbone") == "albef" and isinstance(config, dict) and config.get("patch_embed") == "conv"


def _load_legacy_folder(path: Path, params: dict, image_size: int | None, verbose: bool) -> "DemoAlbefModel":
    config = json.loads((path / CONFIG_FILE).read_text())["config"]
    for key in ("patch_embed", "init", "pos_embed_init"):   # the stem is this class's; inits are replaced by the weights
        config.pop(key, None)
    model = DemoAlbefModel.from_config(config, root=path)
    load_model(model, str(path / WEIGHTS_FILE), strict=True)
    return model.eval()


LEGACY_FOLDER = ForeignFormat(
    "a demo model folder saved as backbone albef with patch_embed conv", _claims_legacy_folder, _load_legacy_folder
)


@register("albef_demo", sizes={"tiny": TINY}, foreign=(LEGACY_FOLDER,), derives_vocab=True)
class DemoAlbefModel(AlbefModel):
    """ALBEF with the demo's stem; drawn from scratch, every Linear outside the vision tower at
    normal(0, 1/sqrt(fan_in))."""

    config_class = DemoAlbefConfig

    def __init__(self, config: DemoAlbefConfig | None = None, tokenizer=None):
        super().__init__(config, tokenizer)
        for name, part in self.named_children():
            if name != "visual_encoder" and not name.endswith("_m"):
                part.apply(_init_fan_in)
        if self.config.momentum:
            self.copy_params_to_momentum()


class DemoAlbefVqaModel(AlbefVqaModel):
    """ALBEF's VQA model on the demo's backbone."""

    name = "albef_demo_vqa"
    config_class = DemoAlbefConfig


register_head("albef_demo", "vqa", DemoAlbefVqaModel)
