"""A saved model folder (`save_pretrained`): its file names, writing it, and reading it back
with one-line errors naming the file (a damaged config.json or weights file). Shared by the
backbones that write it, the VQA head, and the registry that recognises it."""

CONFIG_FILE = "config.json"        # {"backbone": NAME, "config": {...}}
WEIGHTS_FILE = "model.safetensors"


def write_model_folder(model, directory, payload: dict, tensors: dict | None = None) -> None:
    """`model`'s weights (safetensors, tied tensors stored once), or only `tensors` (name ->
    tensor) when given, and `payload` as config.json into `directory`, each file written
    atomically (`hist_vlm._io`)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file, save_model

    from hist_vlm._io import atomic_path, atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as weights:
        if tensors is None:
            save_model(model, str(weights))
        else:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(weights))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")


def read_model_config(config_path) -> dict:
    """A saved folder's config.json as a dict, or a one-line ValueError naming the file."""
    import json
    from pathlib import Path

    config_path = Path(config_path)
    try:
        payload = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("config", {}), dict):
        raise ValueError(f"{config_path}: expected an object with a \"config\" object, "
                         f"got {type(payload).__name__}")
    return payload


def _config_errors() -> tuple[type[Exception], ...]:
    """The exceptions that building a model from a config's values raises for a bad value: ours
    and Python's, and transformers' strict config validation (huggingface_hub)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:   # an older huggingface_hub: its configs raise TypeError / ValueError
        return (TypeError, KeyError, ValueError)
    return (TypeError, KeyError, ValueError, StrictDataclassError)


def config_error(config_path, error: Exception) -> ValueError | None:
    """The one-line ValueError naming `config_path` for an error about a config's values (a
    field of the wrong type, a missing key); None for any other exception."""
    if not isinstance(error, _config_errors()):
        return None
    message = " ".join(str(error).split()) or type(error).__name__
    return ValueError(f"{config_path}: {message}")


def built_from(config_path, build):
    """`build()` (a model from a folder's config), its errors about the config's values as one
    ValueError line naming config.json (`config_error`)."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - sorted by config_error; others re-raised as they are
        error = config_error(config_path, e)
        if error is None:
            raise
        raise error from None


def weights_error(weights, error: Exception, *, shapes: bool = True) -> ValueError | None:
    """The one-line ValueError for an exception of reading a safetensors file: a damaged,
    truncated or empty `weights` (safetensors' SafetensorError), or (with `shapes`) tensors that
    do not fit the model (the RuntimeError of `load_state_dict`); None for any other exception."""
    from safetensors import SafetensorError

    if isinstance(error, SafetensorError):
        reason = " ".join(str(error).split())
        return ValueError(f"{weights}: not a complete safetensors file ({reason}); the checkpoint is damaged "
                          "or was not fully written or copied")
    if shapes and isinstance(error, RuntimeError) and "state_dict" in str(error):
        lines = [" ".join(line.split()) for line in str(error).splitlines()[1:] if line.strip()]
        detail = lines[0] if lines else " ".join(str(error).split())
        more = f"; {len(lines) - 1} more" if len(lines) > 1 else ""
        return ValueError(f"{weights}: the weights do not fit the model its config.json describes ({detail[:300]}{more})")
    return None


def load_weights(model, weights, saved: set[str] | None = None) -> None:
    """`weights` (a safetensors file) into `model`, every key (strict), or a one-line ValueError
    naming the file (`weights_error`). With `saved` (a model that saves part of its weights,
    `write_model_folder(tensors=...)`): the file holds a subset of the model's tensors that
    includes every name in `saved`, strict both ways."""
    from safetensors.torch import load_file, load_model

    try:
        if saved is None:
            load_model(model, str(weights), strict=True)
        else:
            tensors = load_file(str(weights))
            unknown = sorted(set(tensors) - set(model.state_dict()))
            missing = sorted(saved - set(tensors))
            if unknown:
                raise ValueError(f"{weights}: {len(unknown)} tensors this model does not have (e.g. {unknown[0]})")
            if missing:
                raise ValueError(f"{weights}: {len(missing)} trained tensors missing (e.g. {missing[0]}); "
                                 "not a partial checkpoint of this model")
            model.load_state_dict(tensors, strict=False)
    except Exception as e:  # noqa: BLE001 - sorted by weights_error; others re-raised as they are
        error = weights_error(weights, e)
        if error is None:
            raise
        raise error from None
