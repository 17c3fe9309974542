"""VQA data in ALBEF's json layout: question records, answer weights, the candidate answer list,
and the (seed, epoch, index)-keyed training samples and batches.

Files (ALBEF's `vqa_train.json`, `vqa_val.json`, `vg_qa.json`, `vqa_test.json`): a json list of
`{"image", "question", "answer": [...], "question_id"}`, optionally `"dataset": "vqa" | "vg"` and
`"answer_type"`. A VQA record's answers are its annotators' (10 in VQA v2); a VG record has one.
`answer_list.json` is a json list of the candidate answers inference ranks.

An "image" is relative to its dataset's image root: an absolute one or one with `..` above
the root is refused when the file is read, and one that resolves outside its root (a symbolic
link out) when the training set is built or `image_paths` is called (`hist_vlm.data.paths`),
each unless `allow_absolute_paths=True`.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hist_vlm.data.dataset import _SIDE_WORD, HistDataset
from hist_vlm.data.paths import OPT_IN, Containment, escapes
from hist_vlm.batch import TextRows

#: ALBEF's weight of a Visual Genome answer (a VQA answer weighs its share of the annotators)
VG_ANSWER_WEIGHT = 0.5
KINDS = ("vqa", "vg")


class VqaFileError(ValueError):
    """A malformed VQA file; the message names the file and the record."""


@dataclass(frozen=True)
class VqaRecord:
    question_id: int | str | None
    image: str                        # relative to the image root of its `dataset`
    question: str
    answers: tuple[str, ...]          # every annotator's answer, in file order (empty: test split)
    dataset: str = "vqa"              # "vqa" | "vg"
    answer_type: str | None = None    # "yes/no" | "number" | "other" where the file says

    def weighted_answers(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """ALBEF's training targets: each distinct VQA answer weighted by the fraction of
        annotators who gave it (first-seen order); a VG answer weighs `VG_ANSWER_WEIGHT`."""
        if self.dataset == "vg":
            return self.answers, (VG_ANSWER_WEIGHT,) * len(self.answers)
        weights: dict[str, float] = {}
        for a in self.answers:
            weights[a] = weights.get(a, 0.0) + 1 / len(self.answers)
        return tuple(weights), tuple(weights.values())


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise VqaFileError(f"VQA file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VqaFileError(f"{path}: not valid JSON ({e})") from None


def read_vqa_file(path: str | Path, *, dataset: str | None = None, need_answers: bool = True,
                  allow_absolute_paths: bool = False) -> list[VqaRecord]:
    """Records of one file. `dataset` overrides the records' own "dataset" key (default "vqa").
    `need_answers=False` reads a test split (no "answer"), which then needs question ids. An
    absolute image path or one with `..` above its root is refused unless `allow_absolute_paths`."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise VqaFileError(f"{path}: expected a json list of question records, got {type(data).__name__}")
    records = []
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise VqaFileError(f"{where}: expected an object, got {type(rec).__name__}")
        qid = rec.get("question_id")
        where = f"{where} (question_id {qid})" if qid is not None else where
        for key in ("image", "question"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise VqaFileError(f"{where}: {key!r} must be a non-empty string")
        if not allow_absolute_paths and (why := escapes(rec["image"])):
            raise VqaFileError(f"{where}: image {rec['image']!r} {why}, outside the image root; "
                               f"refused (pass {OPT_IN} to read paths outside the root)")
        kind = dataset or rec.get("dataset", "vqa")
        if kind not in KINDS:
            raise VqaFileError(f"{where}: dataset must be one of {KINDS}, got {kind!r}")
        answers = rec.get("answer")
        if answers is None and not need_answers:
            answers = []
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise VqaFileError(f"{where}: 'answer' must be a list of strings")
        if need_answers and not answers:
            raise VqaFileError(f"{where}: no answer")
        if kind == "vg" and len(answers) > 1:
            raise VqaFileError(f"{where}: a Visual Genome record has one answer, got {len(answers)}")
        if not need_answers and qid is None:
            raise VqaFileError(f"{where}: no question_id (a results file needs one per question)")
        answer_type = rec.get("answer_type")
        records.append(VqaRecord(qid, rec["image"], rec["question"], tuple(answers), kind,
                                 answer_type if isinstance(answer_type, str) else None))
    if not records:
        raise VqaFileError(f"{path}: no question records")
    return records


def read_vqa_files(paths: Sequence[str | Path], *, allow_absolute_paths: bool = False) -> list[VqaRecord]:
    """The training records of several files (ALBEF trains on vqa_train + vqa_val + vg_qa)."""
    return [rec for p in paths for rec in read_vqa_file(p, allow_absolute_paths=allow_absolute_paths)]


def image_paths(records: Sequence[VqaRecord], image_roots: dict[str, str | Path], *,
                allow_absolute_paths: bool = False) -> list[Path]:
    """Each record's image under the root of its dataset (`image_roots["vqa"]` for a dataset
    without its own), resolved: a `VqaFileError` naming the question and the path for one that
    leads outside it (`hist_vlm.data.paths`), unless `allow_absolute_paths`. Call it before
    opening any image of `records`."""
    out: list[Path] = []
    _verify_images(records, image_roots, allow_absolute_paths, out)
    return out


def _verify_images(records, image_roots, allow_absolute: bool, out: list[Path] | None = None) -> None:
    checks = {k: Containment(v, allow_absolute=allow_absolute) for k, v in image_roots.items()}
    for rec in records:
        check = checks.get(rec.dataset, checks["vqa"])
        if check.reason(rec.image) is not None:   # the message is built for the refused one only
            check.verify(rec.image, where=f"question {rec.question_id} ({rec.dataset})", error=VqaFileError)
        if out is not None:
            out.append(check.root / rec.image)


def read_answer_list(path: str | Path) -> list[str]:
    """The candidate answers (ALBEF's answer_list.json), duplicates refused."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list) or not data:
        raise VqaFileError(f"{path}: expected a non-empty json list of answers")
    seen: dict[str, int] = {}
    for i, a in enumerate(data):
        if not isinstance(a, str) or not a.strip():
            raise VqaFileError(f"{path}: answer {i} must be a non-empty string, got {a!r}")
        if a in seen:
            raise VqaFileError(f"{path}: answer {i} {a!r} repeats answer {seen[a]}")
        seen[a] = i
    return list(data)


@dataclass
class VqaSample:
    index: int
    pixel_values: Tensor | None       # [3, H, W] (an unreadable image is skipped: `HistDataset.__getitem__`)
    question: str
    answers: tuple[str, ...]
    weights: tuple[float, ...]
    image_path: str
    skipped: list[str] = field(default_factory=list)


class VqaDataset(HistDataset):
    """Training samples keyed `(epoch, index)`, with HIST's image pipeline (random resized crop,
    a flip only when the question says neither "left" nor "right") and its unreadable-image
    handling. Images resolve against the root of their record's dataset (VQA: COCO, VG)."""

    def __init__(self, records: list[VqaRecord], image_roots: dict[str, str | Path], image_size: int, **kwargs):
        self.roots = {k: Path(v) for k, v in image_roots.items()}
        super().__init__(records, image_roots["vqa"], image_size, **kwargs)

    def _check_images(self) -> None:
        _verify_images(self.records, self.roots, self.allow_absolute_paths)   # no path list kept

    def _draw(self, epoch: int, index: int) -> VqaSample:
        record: VqaRecord = self.records[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        flip = self.hflip and rng.random() < 0.5 and not _SIDE_WORD.search(record.question)
        path = self.roots.get(record.dataset, self.image_root) / record.image
        pixels = self._load(path, int(rng.integers(2**63)), flip)
        answers, weights = record.weighted_answers()
        return VqaSample(index, pixels, record.question, answers, weights, str(path))


@dataclass
class VqaBatch:
    """B questions (one image each) and their M >= B weighted answers; `answers.image_index`
    maps each answer row to its question (ALBEF's per-question answer expansion)."""

    pixel_values: Tensor      # [B, 3, H, W]
    questions: TextRows       # [B, Tq], image_index = arange(B)
    answers: TextRows         # [M, Ta], image_index = answer -> question
    weights: Tensor           # [M] float

    def to(self, device) -> "VqaBatch":
        return VqaBatch(self.pixel_values.to(device), self.questions.to(device), self.answers.to(device),
                        self.weights.to(device))


class VqaCollate:
    """Samples -> (VqaBatch, unreadable images replaced). The model supplies both tokenizers
    (the answers end with its end-of-answer token), so this module knows nothing of models."""

    def __init__(self, tokenize_question: Callable[[list[str], int], tuple[Tensor, Tensor]],
                 tokenize_answer: Callable[[list[str]], tuple[Tensor, Tensor]], max_length: int) -> None:
        self.tokenize_question = tokenize_question
        self.tokenize_answer = tokenize_answer
        self.max_length = max_length

    def __call__(self, samples: list[VqaSample]) -> tuple[VqaBatch, list[str]]:
        q_ids, q_mask = self.tokenize_question([s.question for s in samples], self.max_length)  # [B, Tq]
        a_ids, a_mask = self.tokenize_answer([a for s in samples for a in s.answers])          # [M, Ta]
        owner = torch.tensor([b for b, s in enumerate(samples) for _ in s.answers], dtype=torch.long)
        batch = VqaBatch(
            torch.stack([s.pixel_values for s in samples]),
            TextRows(q_ids, q_mask, torch.arange(len(samples))),
            TextRows(a_ids, a_mask, owner),
            torch.tensor([w for s in samples for w in s.weights], dtype=torch.float32),
        )
        return batch, [p for s in samples for p in s.skipped]
