"""HIST training data: `hist-vlm parse` output + an image folder -> `HistBatch`es.

Every random choice of a sample (caption, phrase/pair, crop, flip) is a function of
(seed, epoch, index) only, and the sampler's order a function of (seed, epoch). So a run
resumed mid-epoch, or split over any number of processes and loader workers, sees exactly
the same data as an uninterrupted single-process run.

Every record's image must lie under the image root (`hist_vlm.data.paths`: an absolute path,
`..` above the root or a symbolic link out of it is refused with one line unless
`allow_absolute_paths=True`), checked when the records are read and again, resolved, when the
dataset is built. Images are read with `hist_vlm.data.images.open_rgb`; an unreadable one is
skipped, its `ImageError` line recorded (`Sample.skipped`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from hist_vlm.batch import HistBatch, TextRows
from hist_vlm.data.images import ImageError, open_rgb
from hist_vlm.data.paths import OPT_IN, Containment, escapes
from hist_vlm.text.corpus import ImageRecord as ParsedImage
from hist_vlm.text.pairs import composite_text

# ALBEF and BLIP both normalise with the OpenAI-CLIP statistics.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# A horizontal flip would turn a true "left of" into a false one.
_SIDE_WORD = re.compile(r"\b(left|right)", re.IGNORECASE)

Tokenize = Callable[[list[str], int], tuple[Tensor, Tensor]]


class DatasetError(ValueError):
    """A malformed parse file; the message names the file and line."""


@dataclass(frozen=True)
class ImageRecord:
    """One line of `hist-vlm parse` output, reduced to what training uses."""

    image: str                          # path relative to the image root
    captions: tuple[str, ...]
    phrases: tuple[tuple[str, str], ...]  # (phrase C_i, its subject S_i)
    pairs: tuple[tuple[int, int], ...]    # (i, j) indices into `phrases`
    #: row-aligned with `phrases`: (caption index, subject start, subject end, subject lemma),
    #: offsets into that caption (what a subject swap replaces)
    subject_spans: tuple[tuple[int, int, int, str], ...] = ()


@dataclass
class Sample:
    """One image and the texts drawn for it (an unreadable image raises `ImageError` in `_draw`:
    `__getitem__` skips it, so a returned sample always has its `pixel_values`)."""

    index: int
    pixel_values: Tensor | None         # [3, H, W]
    caption: str
    phrase: str
    subject: str
    pair: tuple[str, str] | None        # (C_i, C_j); the composite is "C_i and C_j"
    flipped: bool
    image_path: str
    caption_swap: str | None = None     # the caption with one subject swapped (an ITM negative)
    skipped: list[str] = field(default_factory=list)  # unreadable images this sample replaced (one line each)


def read_parse_output(path: str | Path, image_root: str | Path | None = None, *,
                      allow_absolute_paths: bool = False) -> tuple[list[ImageRecord], int]:
    """Records of a `hist-vlm parse` JSONL file, and how many images were dropped for having
    no phrase (they cannot give a phrase row). An image path outside `image_root` (without a
    root: an absolute one or one with `..` above it) is refused, naming the file and line,
    unless `allow_absolute_paths`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"phrase file not found: {path}")
    images = Containment(image_root, allow_absolute=allow_absolute_paths) if image_root is not None else None
    records, dropped = [], 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            if not line.strip():
                continue
            try:
                parsed = ParsedImage.from_json(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{path}:{lineno}: not a `hist-vlm parse` record ({e!r})") from None
            if images is not None:
                images.verify(str(parsed.image), where=f"{path}:{lineno}", error=DatasetError)
            elif not allow_absolute_paths and (why := escapes(str(parsed.image))):
                raise DatasetError(f"{path}:{lineno}: image {str(parsed.image)!r} {why}, outside any image root; "
                                   f"refused (pass {OPT_IN} to read paths outside the root)")
            phrases = tuple((p.text, p.subject) for _, p in parsed.phrases)
            spans = tuple((ci, p.subject_start, p.subject_end, p.subject_lemma) for ci, p in parsed.phrases)
            record = ImageRecord(str(parsed.image), tuple(parsed.captions), phrases, tuple(parsed.pairs), spans)
            if any(not (0 <= i < len(phrases) and 0 <= j < len(phrases)) for i, j in record.pairs):
                raise DatasetError(f"{path}:{lineno}: a pair indexes a phrase that does not exist")
            if not record.captions or not record.phrases:
                dropped += 1
                continue
            records.append(record)
    if not records:
        raise DatasetError(f"{path}: no image with at least one caption and one phrase")
    return records, dropped


class HistDataset(Dataset):
    """Indexed by `(epoch, index)` keys (see `GlobalBatchSampler`), so draws depend on the epoch."""

    def __init__(
        self,
        records: list[ImageRecord],
        image_root: str | Path,
        image_size: int,
        *,
        seed: int = 0,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        swap_negatives: float = 0.0,
        allow_absolute_paths: bool = False,
    ) -> None:
        self.records = records
        self.image_root = Path(image_root)
        self.allow_absolute_paths = allow_absolute_paths
        self._check_images()
        self.seed = seed
        self.hflip = hflip
        self.swap_negatives = swap_negatives
        #: every subject the corpus names, as (surface form, lemma), sorted: the swap draws
        self.subject_words = sorted({
            (rec.captions[ci][start:end], lemma) for rec in records for ci, start, end, lemma in rec.subject_spans
        }) if swap_negatives > 0 else []
        self.crop = v2.RandomResizedCrop(
            image_size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGE_MEAN, IMAGE_STD)])

    def _check_images(self) -> None:
        """Every record's image under the image root, resolved (symbolic links followed): a
        record leading out of it is refused here, before any image is opened."""
        images = Containment(self.image_root, allow_absolute=self.allow_absolute_paths)
        for n, record in enumerate(self.records):
            if images.reason(record.image) is not None:  # the message is built for the refused one only
                images.verify(record.image, where=f"record {n}", error=DatasetError)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        """The sample of `key`; an unreadable image is skipped (its `ImageError` line, which
        names the file, recorded in `Sample.skipped`) and the next readable one takes its slot,
        so batch shapes stay equal on every rank."""
        epoch, index = key
        skipped: list[str] = []
        for offset in range(len(self.records)):
            try:
                sample = self._draw(epoch, (index + offset) % len(self.records))
            except ImageError as e:
                skipped.append(str(e))
                continue
            sample.skipped = skipped
            return sample
        raise DatasetError(f"no image under {self.image_root} could be read (the first: {skipped[0]})")

    def _draw(self, epoch: int, index: int) -> Sample:
        record = self.records[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        caption_index = int(rng.integers(len(record.captions)))
        caption = record.captions[caption_index]
        if record.pairs:
            i, j = record.pairs[rng.integers(len(record.pairs))]
            pair = (record.phrases[i][0], record.phrases[j][0])
        else:
            i, pair = int(rng.integers(len(record.phrases))), None
        phrase, subject = record.phrases[i]
        texts = (caption, phrase, subject, *(pair or ()))
        flip = self.hflip and rng.random() < 0.5 and not any(_SIDE_WORD.search(t) for t in texts)
        path = self.image_root / record.image
        pixels = self._load(path, int(rng.integers(2**63)), flip)
        swap = None
        if self.swap_negatives > 0 and rng.random() < self.swap_negatives:  # drawn last: off, no draw changes
            swap = self._swap(record, caption_index, rng)
        return Sample(index, pixels, caption, phrase, subject, pair, flip, str(path), caption_swap=swap)

    def _swap(self, record: ImageRecord, caption_index: int, rng: np.random.Generator) -> str | None:
        """The caption with one of its subjects replaced by a subject the corpus names elsewhere
        and none of this image's captions names (by lemma): a negative text for this image that
        differs from a positive only in WHAT it names, so colour or layout cannot tell them
        apart. None where the caption has no parsed subject or every subject is this image's."""
        spans = [(s, e) for ci, s, e, _ in record.subject_spans if ci == caption_index]
        own = {lemma for *_, lemma in record.subject_spans}
        others = [word for word, lemma in self.subject_words if lemma not in own]
        if not spans or not others:
            return None
        start, end = spans[rng.integers(len(spans))]
        caption = record.captions[caption_index]
        return caption[:start] + others[rng.integers(len(others))] + caption[end:]

    def _load(self, path: Path, crop_seed: int, flip: bool) -> Tensor:
        """The image at `path`, cropped, flipped and normalised; `ImageError` if unreadable."""
        image = v2.functional.to_image(open_rgb(path))  # [3, H, W] uint8
        # The crop draws from the global CPU generator: seed it alone and restore it after.
        # (`torch.manual_seed` would also queue a CUDA seed with a captured stack trace on a
        # CUDA build, which cost about a third of the demo's data loading.)
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(crop_seed)
        try:
            image = self.crop(image)
        finally:
            torch.set_rng_state(state)
        if flip:
            image = v2.functional.horizontal_flip(image)
        return self.finish(image)


class HistCollate:
    """Samples -> (HistBatch, paths of the unreadable images the samples replaced).
    Text rows point at their image through `image_index`; pair rows exist only for the
    images that have a pair. Rows are padded to the longest text of their kind, or with
    `pad_to_max_length` to `max_length` (pad id 0): equal shapes on every rank, so draws made
    per token position (MLM masks) line up between one process and many."""

    def __init__(self, tokenize: Tokenize, max_length: int, pad_to_max_length: bool = False) -> None:
        self.tokenize = tokenize
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length

    def __call__(self, samples: list[Sample]) -> tuple[HistBatch, list[str]]:
        every = torch.arange(len(samples))
        paired = [(b, s.pair) for b, s in enumerate(samples) if s.pair is not None]
        pair_index = torch.tensor([b for b, _ in paired], dtype=torch.long)
        swapped = [(b, s.caption_swap) for b, s in enumerate(samples) if s.caption_swap is not None]
        captions = self._rows([s.caption for s in samples] + [t for _, t in swapped], every)
        swaps = None
        if swapped:  # one padded length for both: the ITM fuses them in one block
            b = len(samples)
            swaps = TextRows(captions.input_ids[b:], captions.attention_mask[b:],
                             torch.tensor([i for i, _ in swapped], dtype=torch.long))
            captions = TextRows(captions.input_ids[:b], captions.attention_mask[:b], every)
        batch = HistBatch(
            pixel_values=torch.stack([s.pixel_values for s in samples]),  # [B, 3, H, W]
            image_ids=torch.tensor([s.index for s in samples], dtype=torch.long),
            captions=captions,
            phrases=self._rows([s.phrase for s in samples], every),
            subjects=self._rows([s.subject for s in samples], every),
            pair_first=self._rows([p[0] for _, p in paired], pair_index),
            pair_second=self._rows([p[1] for _, p in paired], pair_index),
            composites=self._rows([composite_text(*p) for _, p in paired], pair_index),
            caption_swaps=swaps,
        )
        return batch, [path for s in samples for path in s.skipped]

    def _rows(self, texts: list[str], image_index: Tensor) -> TextRows:
        if not texts:
            empty = torch.zeros(0, self.max_length if self.pad_to_max_length else 1, dtype=torch.long)
            return TextRows(empty, empty.clone(), image_index)
        ids, mask = self.tokenize(texts, self.max_length)  # [N, T]
        if self.pad_to_max_length:
            extra = self.max_length - ids.shape[1]
            ids, mask = F.pad(ids, (0, extra)), F.pad(mask, (0, extra))
        return TextRows(ids, mask, image_index)


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's micro-batches of `(epoch, index)` keys.

    One permutation per epoch (seeded by (seed, epoch)) is cut into global batches of
    `micro_batch * world_size * grad_accum` images; optimizer step s, micro-step a, rank r
    gets the slice `[(a * world_size + r) * micro_batch, +micro_batch)` of global batch s.
    The incomplete last global batch is dropped, so every rank runs the same step count.
    """

    def __init__(
        self, num_items: int, micro_batch: int, *, world_size: int = 1, rank: int = 0,
        grad_accum: int = 1, seed: int = 0,
    ) -> None:
        self.num_items = num_items
        self.micro_batch = micro_batch
        self.world_size = world_size
        self.rank = rank
        self.grad_accum = grad_accum
        self.seed = seed
        self.global_batch = micro_batch * world_size * grad_accum
        if num_items < self.global_batch:
            raise DatasetError(
                f"{num_items} images are fewer than one global batch ({micro_batch} per process x "
                f"{world_size} processes x {grad_accum} accumulation steps)"
            )
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """Iterate `epoch` from optimizer step `start_step` on (resume mid-epoch)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        for step in range(self.start_step, self.steps_per_epoch):
            chunk = order[step * self.global_batch:(step + 1) * self.global_batch]
            for a in range(self.grad_accum):
                start = (a * self.world_size + self.rank) * self.micro_batch
                yield [(self.epoch, int(i)) for i in chunk[start:start + self.micro_batch]]
