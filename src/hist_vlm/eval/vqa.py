"""VQA v2 accuracy, computed exactly as the official evaluation code computes it.

The reference is GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` at commit
458a8b2 (2016-10-08), the scorer behind the published VQA v2 numbers (LAVIS's `vqa_eval.py` is the
same code). Its history matters because the versions score differently:

- 07aecec (2015-07-29, "Beta v0.9"): punctuation list with `:` and `'`, without `{ } - !`, and a
  contraction table with typographic apostrophes. 3b6ef32 (the same day) changed the list to the
  one below; 458a8b2 made the contraction table ASCII. This module followed the beta until it
  was found to score "3:00", "yes!", "t-shirt", "dont know" wrongly against published numbers.
- a013f00 (2021-03-11, "Fixed processing answers bug"): annotator answers are whitespace-cleaned,
  and answers are normalised only when the annotators disagree, then both sides fully. Available
  as `unanimous_unprocessed=True`, not the default (published numbers use 458a8b2).

Why a re-implementation: the official tool is Python-2 code built around the COCO-style
annotation files; this one scores our json layout (`answer` lists of 10 annotator answers)
directly, with the same arithmetic (Python 2's `\\d`, summation and rounding included), so a
synthetic or a held-out split is scored exactly as the evaluation server scores test-dev.
docs/vqa.md lists the official code's quirks kept here.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from hist_vlm._io import atomic_write_text

# The official contraction table (458a8b2: ASCII apostrophes throughout; the 2015 beta had U+2019 in
# most targets): an answer word written without its apostrophe -> with it. Kept verbatim, including
# its own slips ("somebody'd" -> "somebodyd" maps the wrong way; "Id've"/"Im"/"Ive" never match
# a lower-cased word).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# 458a8b2's list, in its order (the order does not change the result). Not in it: ":" and "'"
# (so "3:00" and "don't" survive), "." (handled by the period rule), "*", "#", "$", "%", "&", "~", "|".
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
# As written in the official code: "(?!<=\d)" is a look-AHEAD for the text "<=" + digit (a mistyped
# look-behind), so in effect a period is removed unless a digit follows it ("2.5" keeps its period).
# re.ASCII: the official patterns are byte strings without re.UNICODE applied to unicode answers
# under Python 2, where `\d` is [0-9] only.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)", re.ASCII)
# the official call passes re.UNICODE as sub()'s third positional argument, i.e. count=32
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """`processPunctuation`: each mark of PUNCTUATION is deleted when the text has it next to a
    space (or when the text has a digit-comma-digit group, for every mark), otherwise it becomes
    a space; then (at most 32) periods not followed by a digit are deleted."""
    out = text
    digit_comma = _DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """`processDigitArticle`: lower case, split on whitespace, number words to digits, articles
    dropped, then the contraction table applied word by word; joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_prediction(answer: str) -> str:
    """What 458a8b2 compares for a predicted answer: newlines/tabs to spaces, stripped,
    `process_punctuation`, then `process_digit_article`."""
    return process_digit_article(process_punctuation(_clean_whitespace(answer)))


def _naive_sum(values: Iterable[float]) -> float:
    # left to right, as Python 2's sum() (Python >= 3.12's sum() compensates float rounding)
    total = 0.0
    for v in values:
        total += v
    return total


def question_accuracy(prediction: str, gt_answers: Sequence[str], *,
                      unanimous_unprocessed: bool = False) -> float:
    """Mean over leaving each annotator out of min(#other annotators who gave the answer / 3, 1).

    Default (458a8b2, the published numbers): the prediction is always fully normalised
    (`normalize_prediction`); the annotators' answers are only punctuation-processed (no
    whitespace cleaning, no lower case, number words or articles), and only when they are not
    all identical.

    `unanimous_unprocessed=True` (a013f00, 2021): annotators' answers and the prediction are
    whitespace-cleaned; when the cleaned annotators' answers are all identical nothing else is
    done to either side (exact match), otherwise both sides get punctuation, then digit/article
    processing."""
    if not gt_answers:
        raise ValueError("a question needs at least one annotator answer to be scored")
    gts = list(gt_answers)
    if unanimous_unprocessed:
        gts = [_clean_whitespace(a) for a in gts]
        pred = _clean_whitespace(prediction)
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(a)) for a in gts]
            pred = process_digit_article(process_punctuation(pred))
    else:
        pred = normalize_prediction(prediction)
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    # every annotator is a distinct record (its own answer_id), so "the others" are the other
    # positions, duplicates of the same answer included
    matches = [a == pred for a in gts]
    total = sum(matches)
    return _naive_sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


def _percent(values: Sequence[float]) -> float:
    """round(100 * sum / n, 2) as Python 2 rounds: the float's exact value, ties away from zero
    (Python 3's round() sends ties to even: 0.125 -> 0.12, not the official 0.13)."""
    x = 100 * _naive_sum(values) / len(values)
    return float(Decimal(x).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


@dataclass
class VqaScore:
    """Accuracies in percent, rounded to 2 decimals as the official tool reports them."""

    overall: float
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question: dict[int | str, float] = field(default_factory=dict)   # unrounded, in [0, 1]
    n_questions: int = 0

    def lines(self) -> list[str]:
        out = [f"VQA accuracy: {self.overall:.2f} ({self.n_questions} questions)"]
        out += [f"  {kind}: {acc:.2f}" for kind, acc in sorted(self.per_answer_type.items())]
        return out


def score_answers(
    predictions: Mapping[int | str, str],
    annotations: Iterable[tuple[int | str, Sequence[str], str | None]],
    *,
    unanimous_unprocessed: bool = False,
) -> VqaScore:
    """Score `predictions` (question_id -> answer) against (question_id, annotator answers,
    answer type or None) triples. Every annotated question must have a prediction.

    Overall and per answer type: the mean of the per-question accuracies in percent, rounded to
    2 decimals, as 458a8b2's `setAccuracy`. `unanimous_unprocessed`: see `question_accuracy`."""
    per_question: dict[int | str, float] = {}
    by_type: dict[str, list[float]] = defaultdict(list)
    for qid, answers, answer_type in annotations:
        if qid not in predictions:
            raise ValueError(f"no predicted answer for question_id {qid!r}")
        acc = question_accuracy(predictions[qid], answers, unanimous_unprocessed=unanimous_unprocessed)
        per_question[qid] = acc
        if answer_type:
            by_type[answer_type].append(acc)
    if not per_question:
        raise ValueError("no annotated question to score")
    return VqaScore(_percent(list(per_question.values())), {k: _percent(v) for k, v in by_type.items()},
                    per_question, len(per_question))


def write_results(path: str | Path, answers: Iterable[tuple[int | str, str]]) -> Path:
    """The official results file `[{"question_id", "answer"}, ...]`, written atomically."""
    rows = [{"question_id": qid, "answer": answer} for qid, answer in answers]
    atomic_write_text(path, json.dumps(rows))
    return Path(path)


class _Questions:
    """Map-style dataset of (index, image tensor) for the questions, images loaded in workers."""

    def __init__(self, records, roots: dict[str, Path], transform) -> None:
        self.records, self.roots, self.transform = records, roots, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from hist_vlm.data.images import ImageError, open_rgb

        rec = self.records[i]
        path = self.roots.get(rec.dataset, self.roots["vqa"]) / rec.image
        try:
            image = open_rgb(path)   # 16-bit scaled, not clipped white
        except ImageError as e:
            raise ImageError(f"question {rec.question_id}: {e}") from None
        return i, self.transform(image)


def answer_questions(model, records, candidates: Sequence[str], roots: dict[str, Path], *, k: int = 128,
                     batch_size: int = 32, max_length: int = 25, num_workers: int = 0, device: str = "cpu",
                     progress: bool = True) -> list[tuple[int | str | None, str]]:
    """(question_id, best candidate) for every record, by the model's ranking inference:
    questions in batches, all candidates tokenized once and kept on the device."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from hist_vlm.eval.grounding import eval_transform
    from hist_vlm.batch import TextRows

    model = model.to(device).eval()
    ids, mask = model.tokenize_answers(list(candidates))                              # [C, Ta]
    cands = TextRows(ids, mask, torch.zeros(len(ids), dtype=torch.long)).to(device)
    loader = DataLoader(_Questions(records, roots, eval_transform(model)), batch_size=batch_size,
                        num_workers=num_workers)
    out: list[tuple[int | str | None, str]] = []
    with tqdm(total=len(records), desc="vqa", unit="q", disable=not progress) as bar:
        for index, pixels in loader:
            questions = [records[i].question for i in index.tolist()]
            q_ids, q_mask = model.tokenize_question(questions, max_length)
            rows = TextRows(q_ids, q_mask, torch.arange(len(questions))).to(device)
            best = model.rank_answers(pixels.to(device), rows, cands, k)[0][:, 0].tolist()
            out += [(records[i].question_id, candidates[c]) for i, c in zip(index.tolist(), best)]
            bar.update(len(questions))
    return out
