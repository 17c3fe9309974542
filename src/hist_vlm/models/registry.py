"""The backbone registry: every backbone module registers its class here, and training,
evaluation, grounding, the benchmarks and the tests look backbones up by name. Nothing outside
a backbone's own file names it.

A backbone is found by importing every module of `hist_vlm.models`, every installed package
that declares a `hist_vlm.backbones` entry point, and the backbone modules of every plugin
(`hist_vlm.plugins`, e.g. the demo's `albef_demo`), so adding one is adding one file:

    @register("mine", sizes={"tiny": {...}}, foreign=(ForeignFormat(...),),
              eval_map=EvalMap(layers=(2,), head=None, combine="mean"))
    class MyBackbone(VisionLanguageBackbone): ...

Each backbone may declare its evaluation map (`EvalMap`: the GradCAM layers, head and layer
combination that `hist-vlm eval pointing`, `eval segment` and `ground` use by default; the
paper's where it has one): `eval_map_of(model)` gives it, fitted to the model's depth.

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

from hist_vlm.models.layout import CONFIG_FILE, WEIGHTS_FILE, config_error, weights_error
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


COMBINES = ("mean", "product")


@dataclass(frozen=True)
class EvalMap:
    """A GradCAM evaluation map: cross-attention `layers` (0-based), one `head` (0-based; None:
    the head mean), and how several layers' maps are combined (`combine`: mean | product)."""

    layers: tuple[int, ...]
    head: int | None = None
    combine: str = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not self.layers or any(x < 0 for x in self.layers):
            raise ValueError(f"evaluation map layers {list(self.layers)}: give one or more layers, 0-based")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"evaluation map layers {list(self.layers)} repeat a layer")
        if self.head is not None and self.head < 0:
            raise ValueError(f"evaluation map head {self.head}: 0-based, or None for the head mean")
        if self.combine not in COMBINES:
            raise ValueError(f"unknown map combination {self.combine!r} (choose from {', '.join(COMBINES)})")

    def fitted(self, n_layers: int, n_heads: int) -> "EvalMap":
        """This map on a model with `n_layers` cross-attention layers of `n_heads` heads: a layer
        past the last becomes the last (as `default_capture_layers` clamps; repeats dropped, so
        BLIP's (7, 8) is (2,) on a 3-layer model), a head past the last becomes the head mean
        (a head index names a head of the weights the map was chosen on; a smaller model has no
        counterpart)."""
        layers = tuple(dict.fromkeys(min(x, n_layers - 1) for x in self.layers))
        head = self.head if self.head is not None and self.head < n_heads else None
        return replace(self, layers=layers, head=head)

    def check(self, n_layers: int, n_heads: int) -> None:
        """ValueError naming the first layer or head that a model with `n_layers` cross-attention
        layers of `n_heads` heads does not have."""
        bad = [x for x in self.layers if x >= n_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} out of range: the model has {n_layers} cross-attention layers")
        if self.head is not None and self.head >= n_heads:
            raise ValueError(f"head {self.head} out of range: the cross-attention has {n_heads} heads")

    def describe(self) -> str:
        """E.g. "layers 7,8 head 9 combine mean" (0-based; "head mean" for the mean)."""
        head = "mean" if self.head is None else self.head
        return f"layers {','.join(map(str, self.layers))} head {head} combine {self.combine}"


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
    #: the GradCAM map evaluation uses by default: an `EvalMap`, or a function of the model
    #: giving one (a map that depends on its depth); None: not declared (`eval_map_of`)
    eval_map: EvalMap | Callable[["VisionLanguageBackbone"], EvalMap] | None = None


_ENTRIES: dict[str, BackboneEntry] = {}
_discovered = False


def register(name: str, *, sizes: Mapping[str, Mapping[str, Any]], foreign: tuple[ForeignFormat, ...] = (),
             derives_vocab: bool = False,
             eval_map: EvalMap | Callable[["VisionLanguageBackbone"], EvalMap] | None = None,
             ) -> Callable[[type], type]:
    """Class decorator: register a `VisionLanguageBackbone` subclass under `name`. `eval_map`:
    its evaluation map (the paper's where there is one; `EvalMap`), or a function of the model
    that gives it; its layers and head are fitted to each model (`EvalMap.fitted`)."""
    key = name.lower()
    if eval_map is not None and not (isinstance(eval_map, EvalMap) or callable(eval_map)):
        raise TypeError(f"backbone {key!r}: eval_map must be an EvalMap or a function of the model giving one")

    def wrap(cls: type) -> type:
        if key in _ENTRIES and _ENTRIES[key].cls is not cls:
            raise ValueError(f"backbone {key!r} is registered twice ({_ENTRIES[key].cls.__name__}, {cls.__name__})")
        if "tiny" not in sizes:
            raise ValueError(f"backbone {key!r}: sizes must include 'tiny' (the tests build it)")
        cls.name = key
        _ENTRIES[key] = BackboneEntry(key, cls, dict(sizes), tuple(foreign), derives_vocab, eval_map=eval_map)
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


def declared_eval_map(model: "VisionLanguageBackbone") -> EvalMap | None:
    """The evaluation map that `model`'s backbone declared (`register(eval_map=...)`), fitted
    to the model's cross-attention layers and heads; None when it declared none."""
    _discover()
    entry = _ENTRIES.get(str(getattr(model, "name", "")).lower())
    if entry is None or entry.eval_map is None:
        return None
    spec = entry.eval_map if isinstance(entry.eval_map, EvalMap) else entry.eval_map(model)
    if not isinstance(spec, EvalMap):
        raise TypeError(f"backbone {entry.name!r}: its eval_map function returned {type(spec).__name__}, not an EvalMap")
    return spec.fitted(model.num_cross_attention_layers, model.num_cross_attention_heads)


def eval_map_of(model: "VisionLanguageBackbone") -> EvalMap:
    """`model`'s evaluation map: the one its backbone declared, else its `default_capture_layers`
    with the head mean."""
    return declared_eval_map(model) or EvalMap(tuple(model.default_capture_layers))


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
    try:
        if fmt is None:
            model = entry.cls.from_pretrained(path)
        else:
            model = fmt.load(path, dict(params or {}), image_size, verbose)
    except Exception as e:  # noqa: BLE001 - a damaged weights file or config, in whatever reader found it
        error = weights_error(_weights_file(path), e, shapes=False)
        if error is None and fmt is not None and path.is_dir() and not isinstance(e, (ValueError, TypeError)):
            error = config_error(path / CONFIG_FILE, e)   # transformers' strict config check of a foreign folder
        if error is None:
            raise
        raise error from None
    if image_size is not None and model.image_size != image_size:
        raise ValueError(f"{path} holds a model for {model.image_size} px inputs, not {image_size} px")
    return model


def _weights_file(path: Path) -> Path:
    """The weights file of a checkpoint, for error messages: a file itself, a folder's
    model.safetensors, its only *.safetensors file, else the folder."""
    if not path.is_dir():
        return path
    if (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    found = sorted(path.glob("*.safetensors"))
    return found[0] if len(found) == 1 else path


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
