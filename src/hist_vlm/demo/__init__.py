"""The demo: HIST's effect shown on a laptop CPU in minutes, and everything only it needs.

    run.py           the `hist-vlm demo` job: fine-tune the shipped base with and without HIST
                     on a synthetic world, evaluate, print the table, draw the figure
    synthetic.py     the synthetic world (scenes of coloured shapes, captions, boxes, masks)
    synthetic_vqa.py its VQA set
    model.py         the tiny model's backbone, `albef_demo` (ALBEF with a convolutional stem)
    tags.py          stage 1 of the base's recipe, `task: tags`
    configs/         the demo_* presets; base/ the shipped base
    plugin.py        what the library finds of all this (`hist_vlm.plugins`)

The library never imports this package: it finds the backbone, the task, the world
generators, the presets and the base through the `hist_vlm.plugins` entry point.
"""
