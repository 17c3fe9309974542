"""Readers for image-text retrieval corpora (ALBEF's json layouts and caption JSONL files).

Why: retrieval evaluation ranks every caption of a test set against every image, so it needs
the corpus as ALBEF's `re_eval_dataset` builds it: the images in file order, all captions
flattened image by image, and the two maps between them (`txt2img`, `img2txt`). Layouts:

- test / val files (`coco_test.json`, `flickr30k_test.json`, Karpathy splits): a list of
  {"image": path, "caption": [str, ...]}, one record per image;
- train files (`coco_train.json`, `flickr30k_train.json`): one record per caption,
  {"image": path, "caption": str, "image_id": id}; records with the same `image_id` are one
  image (ALBEF numbers them in order of first appearance);
- a caption JSONL ({"image", "captions": [...]} per line, `hist_vlm.data.captions`), e.g. the
  synthetic world's `captions_<split>.jsonl`.

Image paths are relative to `image_root`, and one that leads outside it (absolute, `..`, a
symbolic link out) is refused unless `allow_absolute_paths=True` (`hist_vlm.data.paths`).
A malformed file raises `CaptionFileError` (the
caption readers' error: these files are caption files too), whose one-line message names the
file and the record. Captions are kept as written: the model's
tokenizer cleans them (ALBEF's `pre_caption`). Never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from hist_vlm.data.captions import CaptionFileError, _field, _image_key, _list, _load_json, read_captions
from hist_vlm.data.paths import Containment

__all__ = ["CaptionFileError", "RetrievalCorpus", "RetrievalPair", "read_caption_corpus",
           "read_retrieval_test", "read_retrieval_train"]


@dataclass(frozen=True)
class RetrievalCorpus:
    """Images and their captions, indexed as ALBEF's retrieval evaluation indexes them."""

    images: list[Path]            # [N_img], file order
    texts: list[str]              # [N_txt], the captions of image 0, then of image 1, ...
    txt2img: list[int]            # [N_txt] text -> its image
    img2txt: list[list[int]]      # [N_img] image -> its texts (the gold captions)

    @classmethod
    def from_items(cls, items: Iterable[tuple[Path, list[str]]]) -> "RetrievalCorpus":
        """(image path, captions) per image -> the flattened corpus."""
        images, texts, txt2img, img2txt = [], [], [], []
        for n, (image, captions) in enumerate(items):
            images.append(image)
            img2txt.append(list(range(len(texts), len(texts) + len(captions))))
            texts.extend(captions)
            txt2img.extend([n] * len(captions))
        return cls(images, texts, txt2img, img2txt)

    def missing_images(self) -> list[Path]:
        return [p for p in dict.fromkeys(self.images) if not p.is_file()]


@dataclass(frozen=True)
class RetrievalPair:
    """One training caption: `image_index` numbers the distinct `image_id`s from 0."""

    image: Path
    caption: str
    image_index: int


def _root(path: Path, image_root: str | Path | None) -> Path:
    return Path(image_root) if image_root is not None else path.parent


def _images(path: Path, image_root: str | Path | None, allow_absolute: bool) -> Callable[[str, str | None], Path]:
    """`image(key, where)`: the key's path under the image root, or a CaptionFileError."""
    check = Containment(_root(path, image_root), allow_absolute=allow_absolute).check
    return lambda key, where: check(key, error=lambda msg: CaptionFileError(path, where, msg))


def _caption(value: Any, path: Path, where: str) -> str:
    if not isinstance(value, str):
        raise CaptionFileError(path, where, f"a caption must be a string, got {type(value).__name__}")
    if not value.strip():
        raise CaptionFileError(path, where, "empty caption")
    return value


def _records(path: Path) -> list:
    return _list(_load_json(path), path, "top level", "the top level")


def read_retrieval_test(path: str | Path, image_root: str | Path | None = None, *,
                        allow_absolute_paths: bool = False) -> RetrievalCorpus:
    """An ALBEF test/val file: [{"image", "caption": [str, ...]}], one record per image.
    `image_root` defaults to the file's folder."""
    path = Path(path)
    image_path = _images(path, image_root, allow_absolute_paths)
    items = []
    for n, rec in enumerate(_records(path)):
        where = f"record {n}"
        image = _image_key(_field(rec, ("image",), path, where), path, where)
        captions = _field(rec, ("caption",), path, where)
        if not isinstance(captions, list):
            raise CaptionFileError(path, where, f"'caption' must be a list of strings in a test file, "
                                                  f"got {type(captions).__name__} (is this a train file?)")
        if not captions:
            raise CaptionFileError(path, where, "no captions")
        items.append((image_path(image, where),
                      [_caption(c, path, f"{where} caption {i}") for i, c in enumerate(captions)]))
    if not items:
        raise CaptionFileError(path, None, "no images")
    return RetrievalCorpus.from_items(items)


def read_retrieval_train(path: str | Path, image_root: str | Path | None = None, *,
                         allow_absolute_paths: bool = False) -> list[RetrievalPair]:
    """An ALBEF train file: [{"image", "caption": str, "image_id"}], one record per caption."""
    path = Path(path)
    image_path = _images(path, image_root, allow_absolute_paths)
    index: dict[str, int] = {}
    pairs = []
    for n, rec in enumerate(_records(path)):
        where = f"record {n}"
        image = _image_key(_field(rec, ("image",), path, where), path, where)
        image_id = _image_key(_field(rec, ("image_id",), path, where), path, where)
        caption = _caption(_field(rec, ("caption",), path, where), path, where)
        pairs.append(RetrievalPair(image_path(image, where), caption, index.setdefault(image_id, len(index))))
    if not pairs:
        raise CaptionFileError(path, None, "no captions")
    return pairs


def read_caption_corpus(path: str | Path, image_root: str | Path | None = None, *,
                        allow_absolute_paths: bool = False) -> RetrievalCorpus:
    """A caption JSONL ({"image", "captions"} per line) as a retrieval corpus; the synthetic
    world's `captions_test.jsonl` is one (its image paths are relative to the world folder,
    the file's folder, the default `image_root`)."""
    path = Path(path)
    image_path = _images(path, image_root, allow_absolute_paths)
    corpus = RetrievalCorpus.from_items((image_path(key, None), caps)
                                        for key, caps in read_captions(path, "jsonl"))
    if not corpus.images:
        raise CaptionFileError(path, None, "no images with captions")
    return corpus
