"""The typed training configuration: YAML presets (package data, by name) plus `key=value` overrides.

Every section is a dataclass, so a typo in a preset or on the command line is an error that
names the key, never a silently ignored setting. The `loss` section IS the losses package's
`HistLossConfig` (no copy of its fields here), so a new loss option needs no change in this file.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hist_vlm.losses.hist import HistLossConfig
from hist_vlm.plugins import preset_folders
from hist_vlm.train.tasks import task_names


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false. Under PyYAML's YAML 1.1 rules `off`, `on`,
    `yes` and `no` are booleans, so `loss.schedule=off` would arrive as False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


class ConfigError(ValueError):
    """A user mistake in a config file or override; the CLI prints it as one line."""


@dataclass
class ModelConfig:
    """Which backbone, its sizes, and optional pretrained weights."""

    name: str = "albef"                                      # a registered backbone (hist_vlm.models.backbone_names())
    checkpoint: str | None = None                            # a save_pretrained dir or an official .pth
    params: dict[str, Any] = field(default_factory=dict)     # backbone config fields (sizes, fusion_layer, ...)
    # from scratch (ALBEF): the vocabulary is the training texts' words, written to RUN/vocab.txt
    # and saved with every checkpoint; sets params.vocab_file and params.vocab_size itself
    derive_vocab: bool = False
    # fine-tuning presets set this: no model.checkpoint is then an error, never a randomly initialised model
    require_checkpoint: bool = False


@dataclass
class SyntheticConfig:
    """Train on the built-in synthetic world instead of `data.phrases` (the CPU demo)."""

    enabled: bool = False
    n_train: int = 256
    n_val: int = 32               # val/test scenes are written too, for `hist-vlm eval`
    n_test: int = 64
    image_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "n_train")
        _at_least(self, "n_val", 0)
        _at_least(self, "n_test", 0)
        _positive(self, "image_size")
        _seed(self, "seed")


@dataclass
class DataConfig:
    """Where the `hist-vlm parse` output and the images are, and how batches are formed."""

    phrases: str = ""             # JSONL written by `hist-vlm parse`
    image_root: str = ""          # the "image" fields of `phrases` are relative to this folder
    image_size: int = 256         # network input (square)
    batch_size: int = 56          # images per process per micro-batch
    max_length: int = 25          # token limit of every text row (ALBEF trains with 25)
    pad_to_max_length: bool = False   # pad rows to max_length, not to the longest: fixed shapes
    num_workers: int = 4
    crop_scale: tuple[float, float] = (0.5, 1.0)   # RandomResizedCrop area range
    hflip: bool = True            # only where no text of the sample says "left"/"right"
    #: share of captions that also bring an ITM negative: the caption with one subject swapped
    #: for one the corpus names and this image's captions do not (`HistDataset._swap`); 0 = off
    swap_negatives: float = 0.0
    allow_absolute_paths: bool = False   # read records whose image lies outside image_root (absolute, .., links out)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _positive(self, "image_size")
        _positive(self, "batch_size")
        _positive(self, "max_length")
        _at_least(self, "num_workers", 0)
        low, high = self.crop_scale
        if not (_finite(low) and _finite(high) and 0.0 < low <= high <= 1.0):
            raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(self.crop_scale)}")
        if not 0.0 <= self.swap_negatives <= 1.0:
            raise ConfigError(f"data.swap_negatives must be in [0, 1], got {self.swap_negatives}")


@dataclass
class OptimConfig:
    """AdamW with the reference weight-decay groups (no decay on biases and 1-D parameters)."""

    lr: float = 2e-5
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accum: int = 1                    # micro-batches per optimizer step
    max_grad_norm: float | None = None     # clip the global gradient norm when set
    #: parameter-name prefixes kept as loaded (e.g. `visual_encoder.patch_embed`: a stem taught by `task: tags`)
    freeze: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _positive(self, "grad_accum")
        _number(self, "lr", above=0.0)
        _number(self, "weight_decay", at_least=0.0)
        _number(self, "eps", above=0.0)
        for i, beta in enumerate(self.betas):
            if not (_finite(beta) and 0.0 <= beta < 1.0):
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        if self.max_grad_norm is not None:
            _number(self, "max_grad_norm", above=0.0)


@dataclass
class ScheduleConfig:
    """Cosine decay over all optimizer steps after a linear warm-up from `warmup_lr`."""

    epochs: int = 3
    warmup_steps: int = 1000
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6

    def __post_init__(self) -> None:
        _positive(self, "epochs")
        _at_least(self, "warmup_steps", 0)
        _number(self, "warmup_lr", at_least=0.0)
        _number(self, "min_lr", at_least=0.0)


@dataclass
class RunConfig:
    """Where the run lives and how it reports."""

    dir: str = "runs/hist"
    seed: int = 42
    device: str = "auto"              # "auto" | "cpu" | "cuda"
    precision: str = "auto"           # "auto" (bf16 autocast on GPU, fp32 on CPU) | "bf16" | "fp32"
    log_every: int = 50               # optimizer steps between log lines
    save_every: int = 1000            # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2         # newest checkpoints kept on disk
    max_steps: int | None = None      # stop after this many optimizer steps (smoke runs)
    tensorboard: bool = False

    def __post_init__(self) -> None:
        _positive(self, "log_every")
        _positive(self, "save_every")
        _positive(self, "keep_checkpoints")
        if self.max_steps is not None:
            _positive(self, "max_steps")
        _seed(self, "seed")


@dataclass
class VqaConfig:
    """`task: vqa`: ALBEF's VQA fine-tuning (docs/vqa.md). The data are ALBEF's json files; batch
    size, image size, crop, flip, text length and workers come from the `data` section."""

    train_files: list[str] = field(default_factory=list)   # vqa_train.json, vqa_val.json, vg_qa.json
    image_root: str = ""             # the "image" paths of VQA records (COCO) are relative to this
    vg_image_root: str = ""          # ... and those of VG records ("dataset": "vg") to this
    answer_list: str = ""            # the candidates `hist-vlm eval vqa` ranks (answer_list.json)
    decoder_layers: int | None = None   # None: as many as the backbone's fusion layers (ALBEF: 6)
    distill: bool = True             # momentum copies + distillation of the answer tokens
    alpha: float = 0.4               # distillation weight, ramped over epoch 0
    momentum: float = 0.995
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)   # the synthetic VQA set

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if self.decoder_layers is not None:
            _positive(self, "decoder_layers")
        if self.alpha > 0 and not self.distill:
            raise ValueError("alpha > 0 needs distill=true (the momentum copies give the soft targets)")


@dataclass
class TrainConfig:
    #: what is trained: "hist" (HIST / ALBEF objectives on `hist-vlm parse` output), "vqa", or
    #: a task a plugin registers (`hist_vlm.train.tasks`)
    task: str = "hist"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: HistLossConfig = field(default_factory=HistLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    vqa: VqaConfig = field(default_factory=VqaConfig)

    def __post_init__(self) -> None:
        if self.task not in task_names():
            raise ValueError(f"task must be one of {', '.join(task_names())}, got {self.task!r}")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _positive(section: Any, name: str) -> None:
    _at_least(section, name, 1)


def _at_least(section: Any, name: str, low: int) -> None:
    if getattr(section, name) < low:
        raise ValueError(f"{name} must be at least {low}, got {getattr(section, name)}")


def _seed(section: Any, name: str) -> None:
    if not 0 <= getattr(section, name) < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {getattr(section, name)}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(section: Any, name: str, *, above: float | None = None, at_least: float | None = None) -> None:
    """A finite number (never inf or nan: `optim.lr=.inf` would train a model of NaNs) above
    (or at least) a bound."""
    value = getattr(section, name)
    if not _finite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if above is not None and not value > above:
        raise ValueError(f"{name} must be greater than {above:g}, got {value!r}")
    if at_least is not None and not value >= at_least:
        raise ValueError(f"{name} must be at least {at_least:g}, got {value!r}")


PRESET_SUFFIX = ".yaml"


def _preset_dirs() -> list[Path]:
    """The presets shipped inside the package (`hist_vlm/configs/*.yaml`, wherever it is
    installed), then each plugin's (`hist_vlm.plugins`: the demo's `demo_*`)."""
    return [Path(str(importlib.resources.files("hist_vlm") / "configs")), *preset_folders()]


def _presets() -> dict[str, Path]:
    """Every preset by name; the library's own win over a plugin's of the same name."""
    found: dict[str, Path] = {}
    for folder in _preset_dirs():
        for path in sorted(folder.glob(f"*{PRESET_SUFFIX}")):
            if path.is_file():
                found.setdefault(path.name[: -len(PRESET_SUFFIX)], path)
    return found


def preset_names() -> list[str]:
    """Names of the shipped presets, e.g. `demo_tiny`, `albef_coco`."""
    return sorted(_presets())


def resolve_config(name_or_path: str | Path) -> Path:
    """The YAML file a config argument means: an existing file wins, else a preset name
    (`demo_tiny` or `demo_tiny.yaml`), so `hist-vlm train demo_tiny` works from any directory."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    if path.name == text:  # a bare name, no folder: look it up among the presets
        stem = text[: -len(PRESET_SUFFIX)] if text.endswith(PRESET_SUFFIX) else text
        preset = _presets().get(stem)
        if preset is not None:
            return preset
    raise ConfigError(f"config file not found: {text} (nor a preset of that name; presets: {', '.join(preset_names())})")


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A preset (by name) or YAML file, then `section.key=value` overrides applied in order."""
    path = resolve_config(path)
    try:
        raw = _load_yaml(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return _build(TrainConfig, raw, "")


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A config from a mapping (a checkpoint's config.yaml), checked as a file is."""
    return _build(TrainConfig, raw, "")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    try:
        node[leaf] = _load_yaml(text) if text else ""
    except yaml.YAMLError:
        node[leaf] = text


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """A dataclass from a mapping, checking every key and value type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    raw = _without_retired(raw, prefix)
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known in this section: {', '.join(sorted(known))})"
        )
    values = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in raw.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # the dataclass's own validation (__post_init__)
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


#: keys earlier versions wrote into RUN/config.yaml that no longer exist, and the value at which
#: each meant what the code now does (docs/experiments.md, "Options removed from the library")
RETIRED_KEYS = {"loss.add_detach_parts": False}


def _without_retired(raw: dict, prefix: str) -> dict:
    """`raw` without the retired keys of this section that hold their neutral value; one at
    another value is an error (the run it describes cannot be reproduced by this version)."""
    out = dict(raw)
    for key, neutral in RETIRED_KEYS.items():
        section, _, leaf = key.rpartition(".")
        if prefix == section + "." and leaf in out:
            if out[leaf] != neutral:
                raise ConfigError(f"{key}={out[leaf]!r} was removed (docs/experiments.md, "
                                  f"\"Options removed from the library\"); only {neutral!r} is still accepted")
            del out[leaf]
    return out


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, X | None, tuple, list, dict, dataclass)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        arg = typing.get_args(tp)[0]
        return tuple(_coerce(arg, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_coerce(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _plain(value: Any) -> Any:
    """Tuples as lists, so the dict round-trips through YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
