"""Algorithm 1 of the paper: pair each noun phrase of an image with a phrase of a different
subject from the same image (any of its captions), giving the composite text "C_i and C_j".

Randomness is per image: the RNG is derived from (seed, image key) alone, so the pairs of an
image do not depend on which worker parsed it or in which order images arrive.
"""
from __future__ import annotations

import hashlib
import random
from typing import Sequence

from hist_vlm.text.types import Phrase

__all__ = ["composite_text", "image_rng", "make_pairs", "pairs_for_image"]


def image_rng(seed: int, image_key: str) -> random.Random:
    """A private RNG for one image; stable across processes (no use of `hash()`)."""
    digest = hashlib.sha256(f"{seed}\x00{image_key}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def composite_text(ci: str, cj: str) -> str:
    """The composite phrase C_ij whose GradCAM map should equal the sum of C_i's and C_j's."""
    return f"{ci} and {cj}"


def _subject_key(p: Phrase) -> str:
    return p.subject_lemma.strip().lower()


def _text_key(p: Phrase) -> str:
    return " ".join(p.text.lower().split())


def make_pairs(phrases: Sequence[Phrase], rng: random.Random) -> list[tuple[int, int]]:
    """Algorithm 1 for one image: `phrases` are those of ALL its captions.

    For each phrase i, the candidates are the phrases whose subject lemma differs from i's.
    The candidate set holds each distinct phrase text once (the paper's Candidates is a set:
    "a frisbee" written in four captions is one candidate, not four), represented by its
    first occurrence. A phrase with no candidate gets no pair. Returns (i, j) index pairs.
    """
    # distinct phrase texts in first-seen order, with the index of their first occurrence
    first: dict[str, int] = {}
    for idx, p in enumerate(phrases):
        first.setdefault(_text_key(p), idx)
    distinct = [(phrases[j], j) for j in first.values()]

    pairs = []
    for i, p in enumerate(phrases):
        subject = _subject_key(p)
        candidates = [j for q, j in distinct if _subject_key(q) != subject]
        if candidates:
            pairs.append((i, rng.choice(candidates)))
    return pairs


def pairs_for_image(phrases: Sequence[Phrase], seed: int, image_key: str) -> list[tuple[int, int]]:
    """`make_pairs` with the image's own seeded RNG: the reproducible entry point."""
    return make_pairs(phrases, image_rng(seed, image_key))
