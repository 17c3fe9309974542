"""The backbone a run trains: built from `model.params`, or loaded from `model.checkpoint`.

The network's input size is `data.image_size`: it is passed to the backbone as `image_size`
(an official ALBEF checkpoint at another resolution gets its position embeddings interpolated),
and a `model.params.image_size` that disagrees is an error rather than a crash mid-step.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from hist_vlm.models import build_backbone
from hist_vlm.models.base import VisionLanguageBackbone
from hist_vlm.train.config import ConfigError, ModelConfig


def check_checkpoint_given(cfg: ModelConfig) -> None:
    """A fine-tuning preset (`model.require_checkpoint`) without `model.checkpoint` is an error:
    checked before any data is prepared, never a randomly initialised model."""
    if cfg.checkpoint is None and cfg.require_checkpoint:
        raise ConfigError("model.checkpoint is required: this preset fine-tunes a trained model (give ALBEF.pth, a "
                          "save_pretrained folder or RUN/checkpoints/step-N; model.require_checkpoint=false trains "
                          "from scratch)")


def build_model(cfg: ModelConfig, image_size: int, vocab: list[str] | None = None,
                vocab_file: str | Path | None = None) -> VisionLanguageBackbone:
    """From scratch out of `cfg.params` (with a derived vocabulary when given: its size and
    file), or from `cfg.checkpoint`: any path `hist_vlm.models.loading` reads, a training
    checkpoint `RUN/checkpoints/step-N` included (weights only; `--resume` continues a run)."""
    if cfg.name not in ("albef", "blip"):
        raise ConfigError(f"model.name must be albef or blip, got {cfg.name!r}")
    check_checkpoint_given(cfg)
    given = cfg.params.get("image_size", image_size)
    if given != image_size:
        raise ConfigError(f"model.params.image_size={given} but data.image_size={image_size}: set one of them")
    if cfg.checkpoint is None:
        derived = {"vocab_file": str(vocab_file), "vocab_size": len(vocab)} if vocab is not None else {}
        try:
            return build_backbone(cfg.name, {**cfg.params, "image_size": image_size, **derived})
        except (TypeError, ValueError) as e:  # an unknown or ill-typed model.params key
            raise ConfigError(f"model.params: {e}") from None
    from hist_vlm.models.loading import checkpoint_backbone, load_pretrained, resolve_checkpoint

    path = resolve_checkpoint(cfg.checkpoint)
    if not path.exists():
        raise ConfigError(f"model.checkpoint not found: {path}")
    try:
        stored = checkpoint_backbone(path)
        if stored != cfg.name:
            raise ConfigError(f"model.checkpoint {path} holds a {stored} model but model.name is {cfg.name}")
        params = {**cfg.params, "image_size": image_size} if cfg.name == "albef" else cfg.params
        model = load_pretrained(path, cfg.name, params=params, verbose=True)
    except (OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model.checkpoint: {e}") from None
    _check_input_size(model, image_size, path)
    return model


def _check_input_size(model: VisionLanguageBackbone, image_size: int, path: Path) -> None:
    """A pretrained model is built for its own resolution: try one blank image now."""
    try:
        with torch.no_grad():
            model.encode_image(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ConfigError(f"{path} does not take data.image_size={image_size} inputs ({e})") from None


VOCAB_FILE = "vocab.txt"


def derive_vocabulary(cfg: ModelConfig, records, run_dir: Path, *, resume: bool, is_main: bool,
                      barrier) -> tuple[list[str] | None, Path | None]:
    """`model.derive_vocab`: (vocabulary, RUN/vocab.txt) of every text the run tokenizes
    (captions, phrases, subjects, composites), or (None, None) when not asked for.

    Derived from the data, never from a fixed word list, so any caption corpus works. A resumed
    run must derive the same list: a changed vocabulary would silently re-map the ids the
    checkpoint was trained on.
    """
    if not cfg.derive_vocab:
        return None, None
    if cfg.name != "albef":
        raise ConfigError(f"model.derive_vocab is for ALBEF trained from scratch; {cfg.name} keeps its own tokenizer")
    taken = sorted({"vocab_file", "vocab_size"} & set(cfg.params))
    if taken:
        raise ConfigError(f"model.derive_vocab=true sets model.params.{taken[0]} itself: remove that key")
    if cfg.checkpoint is not None:  # a pretrained model's embeddings belong to its own (saved) vocabulary
        if is_main:
            print("note: model.derive_vocab applies to training from scratch; "
                  "the vocabulary saved with model.checkpoint is used", file=sys.stderr)
        return None, None
    from hist_vlm.models.tokenization import build_vocab, read_vocab_file, write_vocab_file
    from hist_vlm.text.pairs import composite_text

    def texts():
        for rec in records:
            yield from rec.captions
            for phrase, subject in rec.phrases:
                yield phrase
                yield subject
            for i, j in rec.pairs:
                yield composite_text(rec.phrases[i][0], rec.phrases[j][0])

    vocab = build_vocab(texts())
    path = run_dir / VOCAB_FILE
    if resume and path.is_file() and read_vocab_file(path) != vocab:
        raise ConfigError(f"{path} differs from the vocabulary of the current data.phrases: "
                          "the training texts changed since this run started")
    if is_main:
        write_vocab_file(vocab, path)
    barrier()
    return vocab, path
