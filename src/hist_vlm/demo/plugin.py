"""The demo's declaration for the library (`hist_vlm.plugins`): read without importing torch."""
from __future__ import annotations

from pathlib import Path

from hist_vlm.plugins import Plugin

_HERE = Path(__file__).resolve().parent

PLUGIN = Plugin(
    name="demo",
    backbone_modules=("hist_vlm.demo.model",),
    tasks={"tags": "hist_vlm.demo.tags:TagsTask"},
    generators={
        "captions_world": "hist_vlm.demo.synthetic:generate_parsed_world",
        "vqa_world": "hist_vlm.demo.synthetic_vqa:generate_vqa_world",
    },
    presets=_HERE / "configs",
    packaged_models={"demo_base": _HERE / "base"},
)
