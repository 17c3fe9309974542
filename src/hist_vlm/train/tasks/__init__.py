"""Training tasks by name: what `task:` in a config selects.

A task is what the loop asks of a kind of training (`hist_vlm.train.tasks.base.TrainingTask`):
it reads its data, builds the model, its objective and its batches; checkpoints, resume,
logging and many-process training are the loop's. The library's tasks are `hist` (the HIST /
ALBEF objectives) and `vqa`; a plugin (`hist_vlm.plugins`) adds its own, e.g. the demo's
`tags`. Names map to "module:Class" strings, so this module imports nothing heavy and the
config can check a task name without importing torch.
"""
from __future__ import annotations

from hist_vlm.plugins import load_reference, plugins

BUILTIN = {
    "hist": "hist_vlm.train.tasks.hist:HistTask",
    "vqa": "hist_vlm.train.tasks.vqa:VqaTask",
}


def _tasks() -> dict[str, str]:
    found = dict(BUILTIN)
    for plugin in plugins():
        for name, reference in plugin.tasks.items():
            found.setdefault(name, reference)
    return found


def task_names() -> tuple[str, ...]:
    """Every task a config may name: the library's, then the plugins'."""
    return tuple(_tasks())


def get_task(name: str) -> type:
    """The task class registered as `name`."""
    tasks = _tasks()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r} (choose from {', '.join(tasks)})")
    return load_reference(tasks[name])
