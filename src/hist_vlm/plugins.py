"""Extensions of the library found through the `hist_vlm.plugins` entry point.

A plugin is a package that adds backbones, training tasks, data generators, presets or shipped
models without the library importing it: it declares a `Plugin` in its metadata,

    [project.entry-points."hist_vlm.plugins"]
    demo = "hist_vlm.demo.plugin:PLUGIN"

and each registry of the library (backbones, tasks, presets, generators) reads every plugin's
declaration when it is first asked. Declarations name code as "module:attribute" strings, so
reading them imports nothing heavy; the code is imported when it is used. The demo
(`hist_vlm.demo`) is one such plugin, so the library never depends on it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Mapping

ENTRY_POINT_GROUP = "hist_vlm.plugins"


@dataclass(frozen=True)
class Plugin:
    """What one plugin adds; every field is optional."""

    name: str
    #: modules that register backbones (`hist_vlm.models.registry.register`) when imported
    backbone_modules: tuple[str, ...] = ()
    #: training tasks (`task:` in a config) -> "module:Class" (see `hist_vlm.train.tasks`)
    tasks: Mapping[str, str] = field(default_factory=dict)
    #: data generators -> "module:function" (e.g. the synthetic world behind `data.synthetic`)
    generators: Mapping[str, str] = field(default_factory=dict)
    #: a folder of `*.yaml` presets, found by name like the library's own
    presets: Path | None = None
    #: models shipped as package data, loadable by name (`model.checkpoint=NAME`)
    packaged_models: Mapping[str, Path] = field(default_factory=dict)


@cache
def plugins() -> tuple[Plugin, ...]:
    """Every installed plugin's declaration (read once per process)."""
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        plugin = ep.load()
        if not isinstance(plugin, Plugin):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a hist_vlm.plugins.Plugin")
        found.append(plugin)
    return tuple(found)


def load_reference(reference: str) -> Any:
    """The object a "module:attribute" string names."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def generator(name: str, needed_for: str) -> Any:
    """The data generator a plugin registered as `name`; `needed_for` names the setting that
    asked for it, for the error when no installed plugin provides it."""
    for plugin in plugins():
        if name in plugin.generators:
            return load_reference(plugin.generators[name])
    raise LookupError(f"{needed_for} needs the {name!r} data generator, which no installed plugin provides "
                      "(the demo package hist_vlm.demo provides it: reinstall hist-vlm)")


def packaged_models() -> dict[str, Path]:
    """Every plugin's shipped models by name."""
    return {name: Path(path) for plugin in plugins() for name, path in plugin.packaged_models.items()}


def preset_folders() -> list[Path]:
    """Every plugin's preset folder."""
    return [Path(plugin.presets) for plugin in plugins() if plugin.presets is not None]
