"""Official ALBEF / SelfEQ checkpoints in (and out, for parity tests).

Official files are `{'model': state_dict, ...}` (`ALBEF.pth`, `ALBEF_4M.pth`, `refcoco.pth`,
SelfEQ's `checkpoint_*.pth`) in one of two layouts: pretraining (`text_encoder.bert.*` plus the
MLM head `text_encoder.cls.*`) or retrieval/grounding (`text_encoder.*`, no `bert.`, no head).
ALBEF itself loads them with `strict=False`, which hides mistakes; here every key that is
dropped or left missing is named in a `LoadReport`.
"""
from __future__ import annotations

import pickle
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hist_vlm.models.albef import AlbefConfig, AlbefModel
from hist_vlm.models.registry import ForeignFormat, register_foreign

_TEXT_PREFIXES = ("text_encoder.", "text_encoder_m.")


@dataclass
class LoadReport:
    """What loading a foreign checkpoint did. `dropped`: checkpoint keys the model has no
    place for (queues, position_ids buffers, ...); `missing`: model keys the checkpoint did
    not have (left at their initial value, or copied from the online weights for `*_m`)."""

    source: str
    layout: str                                   # "pretrain" | "retrieval"
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    interpolated: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (old, new) patch count
    momentum_from_online: bool = False

    def __str__(self) -> str:
        lines = [f"loaded {self.source} ({self.layout} layout)"]
        for key, (old, new) in self.interpolated.items():
            lines.append(f"  interpolated {key}: {old} -> {new} patches (bicubic)")
        if self.momentum_from_online:
            lines.append("  momentum copies absent from the checkpoint: initialised from the online weights")
        for title, keys in (("dropped", self.dropped), ("missing", self.missing)):
            lines.append(f"  {title} {len(keys)} key(s)" + (":" if keys else ""))
            lines += [f"    {pattern}" for pattern in _compact(keys)]
        return "\n".join(lines)


def _compact(keys: list[str]) -> list[str]:
    """Name every key, folding layer numbers: `a.layer.{0,1,2}.b` stands for three keys."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        groups[re.sub(r"\.(\d+)\.", ".#.", key)].append(key)
    out = []
    for pattern, members in groups.items():
        if len(members) == 1:
            out.append(members[0])
            continue
        numbers = sorted({int(n) for m in members for n in re.findall(r"\.(\d+)\.", m)})
        out.append(pattern.replace("#", "{" + ",".join(map(str, numbers)) + "}"))
    return sorted(out)


#: the first bytes of a torch.save file: a zip archive (torch >= 1.6) or a pickle (protocol 2+)
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def read_albef_state_dict(path_or_state: str | Path | dict) -> tuple[dict[str, Tensor], str]:
    """`{'model': sd, ...}` or a bare state dict, from a path (`torch.load(weights_only=True)`) or in memory."""
    if isinstance(path_or_state, dict):
        obj, source = path_or_state, "<state dict>"
    else:
        path = Path(path_or_state)
        if not path.is_file():
            raise FileNotFoundError(f"no ALBEF checkpoint at {path}")
        source = str(path)
        with path.open("rb") as f:
            head = f.read(4)
        if not head.startswith(_TORCH_MAGIC):
            raise ValueError(f"{source} is not a torch checkpoint (it starts with {head!r}: a truncated "
                             f"download or a saved error page?); expected an official ALBEF .pth") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # torch's message advises weights_only=False: unsafe for a foreign file, so keep only its cause
            found = re.search(r"GLOBAL (\S+)", str(err))
            what = f"{found.group(1)} objects" if found else "objects other than tensors"
            raise ValueError(f"{source} cannot be read safely: it holds {what} (only tensors and plain "
                             f"containers are loaded, torch.load weights_only=True)") from None
        except Exception as err:  # noqa: BLE001 - damaged bytes make the reader fail in any way
            raise ValueError(f"{source} is a damaged torch checkpoint ({type(err).__name__}; a truncated "
                             f"download?)") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source} holds no state dict (expected {{'model': state_dict}} or a bare state dict)")
    return state, source


def to_our_keys(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str, dict[str, str]]:
    """Rename the retrieval/grounding layout (`text_encoder.embeddings...`) to the pretraining
    layout (`text_encoder.bert.embeddings...`) that our model uses.
    Returns (state, layout, our key -> checkpoint key)."""
    if any(k.startswith("text_encoder.bert.") for k in state):
        return dict(state), "pretrain", {k: k for k in state}
    out, original = {}, {}
    for key, value in state.items():
        prefix = next((p for p in _TEXT_PREFIXES if key.startswith(p)), None)
        ours = key
        if prefix and not key.startswith(prefix + "cls."):
            ours = prefix + "bert." + key[len(prefix):]
        out[ours], original[ours] = value, key
    return out, "retrieval", original


def to_albef_state_dict(model: AlbefModel, layout: str = "pretrain") -> dict[str, Tensor]:
    """Our weights in ALBEF's key layout, as `model_without_ddp.state_dict()` would hold them
    (with the `embeddings.position_ids` buffers; without the queues, which the caller may add).
    layout "retrieval" drops `bert.` and the MLM head, as `model_retrieval.ALBEF` has none."""
    if layout not in ("pretrain", "retrieval"):
        raise ValueError(f"layout must be 'pretrain' or 'retrieval', got {layout!r}")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    positions = torch.arange(model.config.max_position_embeddings).unsqueeze(0)  # [1, max_pos]
    for prefix in _TEXT_PREFIXES:
        if f"{prefix}bert.embeddings.word_embeddings.weight" in sd:
            sd[f"{prefix}bert.embeddings.position_ids"] = positions.clone()
    if layout == "pretrain":
        return sd
    return {
        k.replace("bert.", "", 1): v
        for k, v in sd.items()
        if not any(k.startswith(p + "cls.") for p in _TEXT_PREFIXES)
    }


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """[1, 1+P0, D] -> [1, 1+gh*gw, D]: CLS kept, the square grid resized bicubically
    (align_corners=False); returned unchanged when the size already matches."""
    old = pos_embed.shape[1] - 1
    side = int(round(old**0.5))
    if side * side != old:
        raise ValueError(f"pos_embed holds {old} patch positions, not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    cls_pos, patches = pos_embed[:, :1], pos_embed[:, 1:]
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)          # [1, D, g0, g0]
    patches = F.interpolate(patches.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    patches = patches.to(pos_embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)   # [1, gh*gw, D]
    return torch.cat([cls_pos, patches], dim=1)


def config_from_state_dict(state: dict[str, Tensor], **overrides) -> AlbefConfig:
    """Sizes read off the weights. Head counts cannot be, so they default to width // 64
    (ViT-B and BERT-base); pass `vision_heads=`/`text_heads=` for other models.
    `image_size` defaults to the checkpoint's pos_embed grid."""
    sd = to_our_keys(state)[0]
    try:
        patch = sd["visual_encoder.patch_embed.proj.weight"]              # [Dv, 3, p, p]
        vision_width, patch_size = patch.shape[0], patch.shape[-1]
        grid = int(round((sd["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
        layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.", k))}
        cross_ids = {
            int(m.group(1)) for k in sd if (m := re.match(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.crossattention", k))
        }
        words = sd["text_encoder.bert.embeddings.word_embeddings.weight"]  # [V, D]
        inferred = dict(
            image_size=grid * patch_size,
            patch_size=patch_size,
            vision_width=vision_width,
            vision_depth=1 + max(int(m.group(1)) for k in sd if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k))),
            vision_heads=max(1, vision_width // 64),
            vision_mlp_ratio=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / vision_width,
            text_width=words.shape[1],
            text_layers=1 + max(layer_ids),
            text_heads=max(1, words.shape[1] // 64),
            text_intermediate_size=sd["text_encoder.bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            fusion_layer=min(cross_ids),
            vocab_size=words.shape[0],
            max_position_embeddings=sd["text_encoder.bert.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=sd["text_encoder.bert.embeddings.token_type_embeddings.weight"].shape[0],
            embed_dim=sd["vision_proj.weight"].shape[0],
            momentum=any(k.startswith("visual_encoder_m.") for k in sd),
        )
    except (KeyError, ValueError) as err:
        raise ValueError(f"not an ALBEF state dict (cannot read its sizes: {err})") from None
    inferred.update(overrides)
    return AlbefConfig(**inferred)


def load_albef_checkpoint(
    model: AlbefModel, path_or_state: str | Path | dict, verbose: bool = True
) -> LoadReport:
    """Load an official checkpoint into `model` by name and report every dropped/missing key
    (dropped keys as the checkpoint names them, missing ones as the model does).

    pos_embed (online and momentum) is interpolated to the model's grid. Momentum copies the
    checkpoint lacks are set from the online weights (ALBEF's `copy_params`). Shape mismatches
    are an error: they mean the config does not describe the checkpoint.
    """
    state, source = read_albef_state_dict(path_or_state)
    sd, layout, original = to_our_keys(state)
    report = LoadReport(source=source, layout=layout)
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in sd:
            old = sd[key].shape[1] - 1
            sd[key] = interpolate_pos_embed(sd[key], model.patch_grid)
            if sd[key].shape[1] - 1 != old:
                report.interpolated[key] = (old, sd[key].shape[1] - 1)

    own = model.state_dict()
    aliases = _tied_aliases(model)
    report.dropped = sorted(original[k] for k in sd if k not in own)
    wrong = [f"{original[k]}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sd if k in own and sd[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"{source} does not match the model config ({len(wrong)} shape mismatches, first: {wrong[0]})")
    present = set(sd) | {a for k in sd for a in aliases.get(k, ())}
    report.missing = sorted(k for k in own if k not in present)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if model.config.momentum and not any(k.startswith("visual_encoder_m.") for k in sd):
        model.copy_params_to_momentum()
        report.momentum_from_online = True
    model.load_report = report
    if verbose:
        print(report, file=sys.stderr)
    return report


def _tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """state-dict names that share one tensor (the MLM decoder and the word embeddings)."""
    by_tensor: dict[int, set[str]] = defaultdict(set)
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor[id(tensor)].add(name)
    return {name: names - {name} for names in by_tensor.values() for name in names}


def load_albef_model(
    path_or_state, config: AlbefConfig | None = None, verbose: bool = True, **overrides
) -> AlbefModel:
    """Build the model `config` describes, or else the one the checkpoint describes with
    `overrides` (e.g. `image_size=384`, `text_heads=...`), and load the checkpoint into it.
    Returned in eval mode, like transformers' `from_pretrained`; training calls `.train()`."""
    state, source = read_albef_state_dict(path_or_state)
    if config is not None and overrides:
        raise ValueError("pass either a full config or overrides of the checkpoint's sizes, not both")
    model = AlbefModel(config or config_from_state_dict(state, **overrides))
    load_albef_checkpoint(model, state, verbose=verbose).source = source
    return model.eval()


def _load_official(path: Path, params: dict, image_size: int | None, verbose: bool) -> AlbefModel:
    """The registry's loader of an official `.pth`: built at `image_size` (position embeddings
    interpolated) with `params` overriding the sizes read off the weights."""
    sizes = {**params, **({"image_size": image_size} if image_size else {})}
    return load_albef_model(path, verbose=verbose, **sizes)


# a single file can only be an official ALBEF / SelfEQ checkpoint: every other format is a folder
register_foreign("albef", ForeignFormat("an official ALBEF .pth", Path.is_file, _load_official))
