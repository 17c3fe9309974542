"""The backbone registry: every backbone module registers its class here, and training,
evaluation, grounding, the benchmarks and the tests look backbones up by name. Nothing outside
a backbone's own file names it.

A backbone is found by importing every module of `hist_vlm.models`, every installed package
that declares a `hist_vlm.backbones` entry point, and the backbone modules of every plugin
(`hist_vlm.plugins`, e.g. the demo's `albef_demo`), so adding one is adding one file:

    @register("mine", sizes={"tiny": {...}}, foreign=(ForeignFormat(...),))
    class MyBackbone(VisionLanguageBackbone): ...

What a registry entry loads (`load_backbone`):
- a folder that `save_pretrained` wrote (config.json with "backbone" + model.safetensors),
- a training checkpoint `RUN/checkpoints/step-N` (its `model/` folder),
- the name of a model a plugin ships as package data (the demo's `demo_base`),
- a backbone's foreign formats (an official ALBEF `.pth`, a transformers folder), each
  recognised by the `ForeignFormat` it registered.
Anything else is an error naming what was expected, never a randomly initialised model.

This module imports no torch: `import hist_vlm.models` stays cheap for the CLI and the parser.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from hist_vlm.models.layout import CONFIG_FILE, WEIGHTS_FILE
from hist_vlm.plugins import packaged_models, plugins

if TYPE_CHECKING:
    from hist_vlm.models.base import VisionLanguageBackbone

ENTRY_POINT_GROUP = "hist_vlm.backbones"


@dataclass(frozen=True)
class ForeignFormat:
    """Weights a backbone loads that it did not save itself (an official `.pth`, a
    transformers folder).

    claims(path) -> bool: whether `path` (a file or folder) is in this format; cheap, no weights read.
    load(path, params, image_size, verbose) -> backbone in eval mode. `params`: build settings
        the format does not store; `image_size`: the input size the caller will feed (a
        format that can adapt, such as interpolating position embeddings, uses it; else the
        registry checks it against the loaded model).
    """

    description: str
    claims: Callable[[Path], bool]
    load: Callable[..., "VisionLanguageBackbone"]


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    cls: type
    #: named from-scratch build configs: "tiny" (tests, CPU benchmarks), "base" (real sizes)
    sizes: Mapping[str, Mapping[str, Any]]
    foreign: tuple[ForeignFormat, ...] = ()
    #: trained from scratch, it can use a vocabulary derived from the training texts
    #: (`model.derive_vocab`: build config keys `vocab_file`, `vocab_size`)
    derives_vocab: bool = False
    #: the task-specific models built on this backbone, by task ("vqa": a class with
    #: `from_backbone` and `from_pretrained`)
    heads: Mapping[str, type] = field(default_factory=dict)


_ENTRIES: dict[str, BackboneEntry] = {}
_discovered = False


def register(name: str, *, sizes: Mapping[str, Mapping[str, Any]], foreign: tuple[ForeignFormat, ...] = (),
             derives_vocab: bool = False) -> Callable[[type], type]:
    """Class decorator: register a `VisionLanguageBackbone` subclass under `name`."""
    key = name.lower()

    def wrap(cls: type) -> type:
        if key in _ENTRIES and _ENTRIES[key].cls is not cls:
            raise ValueError(f"backbone {key!r} is registered twice ({_ENTRIES[key].cls.__name__}, {cls.__name__})")
        if "tiny" not in sizes:
            raise ValueError(f"backbone {key!r}: sizes must include 'tiny' (the tests build it)")
        cls.name = key
        _ENTRIES[key] = BackboneEntry(key, cls, dict(sizes), tuple(foreign), derives_vocab)
        return cls

    return wrap


def register_foreign(backbone: str, fmt: ForeignFormat) -> None:
    """Add a foreign format to `backbone` (registered by the module that reads it, so the
    backbone's own file need not import its converters)."""
    _ENTRIES[backbone] = replace(_ENTRIES[backbone], foreign=(*_ENTRIES[backbone].foreign, fmt))


def register_head(backbone: str, task: str, cls: type) -> None:
    """Register `cls` as the `task` model of `backbone` (e.g. ALBEF's VQA answer decoder)."""
    _ENTRIES[backbone] = replace(_ENTRIES[backbone], heads={**_ENTRIES[backbone].heads, task: cls})


def _discover() -> None:
    """Import every module of this package and every entry point, once: each registers itself."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("hist_vlm.models")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"hist_vlm.models.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    for plugin in plugins():
        for module in plugin.backbone_modules:
            importlib.import_module(module)


def backbone_names() -> tuple[str, ...]:
    _discover()
    return tuple(sorted(_ENTRIES))


def get_backbone(name: str) -> BackboneEntry:
    """The entry registered as `name` (case-insensitive); ValueError naming the choices."""
    _discover()
    entry = _ENTRIES.get(str(name).lower())
    if entry is None:
        raise ValueError(f"unknown backbone {name!r} (choose from {', '.join(backbone_names())})")
    return entry


def build_backbone(name: str, config: Mapping[str, Any] | None = None) -> "VisionLanguageBackbone":
    """A randomly initialised backbone from its build config (the backbone's `from_config`
    keys; None = its "tiny" size). Unknown or ill-typed keys are a ValueError / TypeError."""
    entry = get_backbone(name)
    return entry.cls.from_config(dict(entry.sizes["tiny"] if config is None else config))


def build_sized(name: str, size: str, **overrides: Any) -> "VisionLanguageBackbone":
    """`build_backbone` of a named size ("tiny", "base") with some keys overridden."""
    entry = get_backbone(name)
    if size not in entry.sizes:
        raise ValueError(f"backbone {name!r} has no size {size!r} (choose from {', '.join(entry.sizes)})")
    return entry.cls.from_config({**entry.sizes[size], **overrides})


# ----------------------------------------------------------------------------- loading

def expected_formats() -> str:
    """What `load_backbone` accepts, for error messages."""
    foreign = [f.description for e in (get_backbone(n) for n in backbone_names()) for f in e.foreign]
    return ", ".join(["a save_pretrained folder (config.json + model.safetensors)",
                      "a training checkpoint RUN/checkpoints/step-N (with model/)", *foreign])


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` itself when it exists, else the packaged model of that name, else `path`
    (the caller reports it as not found)."""
    path = Path(path)
    if not path.exists():
        return packaged_models().get(str(path), path)
    return path


def model_folder(path: str | Path) -> Path:
    """The folder holding the weights: `path/model` for a training checkpoint, else `path`."""
    path = Path(path)
    return path / "model" if (path / "model" / CONFIG_FILE).is_file() else path


def saved_backbone_name(path: Path) -> str | None:
    """The "backbone" a folder we saved names in its config.json, else None (not ours)."""
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        return None
    try:
        payload = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    name = payload.get("backbone") if isinstance(payload, dict) else None
    return name if isinstance(name, str) else None


def transformers_model_type(path: Path) -> str | None:
    """The `model_type` of a folder that transformers' `save_pretrained` wrote, else None:
    how a backbone built on transformers recognises its foreign format."""
    try:
        payload = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):  # no such file (or not a folder), not JSON / UTF-8
        return None
    value = payload.get("model_type") if isinstance(payload, dict) else None
    return value if isinstance(value, str) else None


def _format_of(path: Path) -> tuple[BackboneEntry, ForeignFormat | None]:
    """Which backbone (and which of its foreign formats, None = our own layout) `path` holds.
    Foreign formats are asked first: one may claim a folder of our layout that an older version
    saved under another backbone's name (the demo's model, saved as "albef")."""
    for name in backbone_names():
        entry = get_backbone(name)
        for fmt in entry.foreign:
            if fmt.claims(path):
                return entry, fmt
    ours = saved_backbone_name(path) if path.is_dir() else None
    if ours is not None:
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path}: {WEIGHTS_FILE} missing; expected {expected_formats()}")
        return get_backbone(ours), None
    raise ValueError(f"{path}: no backbone can read this; expected {expected_formats()}")


def checkpoint_backbone(path: str | Path) -> str:
    """The registered name of the backbone stored at `path` (resolved as `load_backbone` does)."""
    return _format_of(model_folder(resolve_checkpoint(path)))[0].name


def load_backbone(
    checkpoint: str | Path,
    name: str | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    verbose: bool = False,
) -> "VisionLanguageBackbone":
    """The backbone stored at `checkpoint` (see the module docstring for what is accepted).

    `name`: the backbone the caller expects (an error if the checkpoint holds another that is
    not a variant of it: a subclass, as the demo's `albef_demo` is of `albef`).
    `params`: build settings for a foreign format that stores no config of ours; a folder we
    saved describes itself and ignores them. `image_size`: the input size the caller will
    feed; a model built for another size is an error (a foreign format that can adapt, an
    official ALBEF `.pth`, is built at that size instead).
    """
    path = resolve_checkpoint(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    path = model_folder(path)
    entry, fmt = _format_of(path)
    if name is not None and not issubclass(entry.cls, get_backbone(name).cls):
        raise ValueError(f"{path} holds a {entry.name} model, not {get_backbone(name).name}")
    if fmt is None:
        model = entry.cls.from_pretrained(path)
    else:
        model = fmt.load(path, dict(params or {}), image_size, verbose)
    if image_size is not None and model.image_size != image_size:
        raise ValueError(f"{path} holds a model for {model.image_size} px inputs, not {image_size} px")
    return model


def load_head(checkpoint: str | Path, task: str):
    """The `task` model (e.g. "vqa") stored at `checkpoint`: a folder its `save_pretrained`
    wrote, or a training checkpoint of that task."""
    path = resolve_checkpoint(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    folder = model_folder(path)
    heads = [e.heads[task] for e in map(get_backbone, backbone_names()) if task in e.heads]
    stored = saved_backbone_name(folder) if folder.is_dir() else None
    for cls in heads:
        if cls.name == stored:
            return cls.from_pretrained(folder)
    raise ValueError(f"not a {task.upper()} model: {folder} holds {stored or 'no model saved by hist-vlm'} "
                     f"(expected {' or '.join(c.name for c in heads) or 'none registered'}); fine-tune one "
                     f"first with a {task} preset")
