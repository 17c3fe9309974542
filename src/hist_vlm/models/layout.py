"""The file names of a saved model folder (`save_pretrained`), shared by the backbones that
write it and the registry that recognises it."""

CONFIG_FILE = "config.json"        # {"backbone": NAME, "config": {...}}
WEIGHTS_FILE = "model.safetensors"


def write_model_folder(model, directory, payload: dict) -> None:
    """`model`'s weights (safetensors, tied tensors stored once) and `payload` as config.json
    into `directory`, each file written atomically (`hist_vlm._io`)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_model

    from hist_vlm._io import atomic_path, atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as weights:
        save_model(model, str(weights))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")
