"""The backbone a run trains: built from `model.params`, or loaded from `model.checkpoint`.

The network's input size is `data.image_size`: it is passed to the backbone as `image_size`
(an official ALBEF checkpoint at another resolution gets its position embeddings interpolated),
and a `model.params.image_size` that disagrees is an error rather than a crash mid-step.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hist_vlm.models import build_backbone, get_backbone, load_backbone
from hist_vlm.models.base import VisionLanguageBackbone
from hist_vlm.models.registry import resolve_checkpoint
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
    file), or from `cfg.checkpoint`: any path the registry loads (`hist_vlm.models.registry`),
    a training checkpoint `RUN/checkpoints/step-N` included (weights only; `--resume`
    continues a run)."""
    try:
        get_backbone(cfg.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
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
    path = resolve_checkpoint(cfg.checkpoint)
    if not path.exists():
        raise ConfigError(f"model.checkpoint not found: {path}")
    params = {k: v for k, v in cfg.params.items() if k != "image_size"}
    try:
        return load_backbone(path, cfg.name, params=params, image_size=image_size, verbose=True)
    except (OSError, ValueError) as e:   # the registry names a damaged weights file in its ValueError
        raise ConfigError(f"model.checkpoint: {e}") from None


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
    if not get_backbone(cfg.name).derives_vocab:
        raise ConfigError(f"model.derive_vocab is for backbones trained from scratch on their own word list; "
                          f"{cfg.name} keeps its own tokenizer")
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
