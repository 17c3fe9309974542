"""Flickr30k Entities (https://github.com/BryanPlummer/flickr30k_entities) -> the info-ground
layout that `hist_vlm.data.grounding.read_flickr30k` reads.

Input, as `annotations.zip` unpacks plus the split lists of the repository:
- `Sentences/<id>.txt`: five lines, phrases marked `[/EN#18/people A man]` (id 18, types
  "people"; id 0 marks a phrase without an entity);
- `Annotations/<id>.xml`: `<size>` (width, height, depth) and one `<object>` per box or
  entity: one or more `<name>` (entity ids) with a `<bndbox>` (1-based VOC corners), or with
  `<nobndbox>`/`<scene>` flags when the entity has no box;
- `train.txt`, `val.txt`, `test.txt`: image ids.

Output per split, the fields of the dataset's own parsing utilities (as info-ground dumps them):
`<split>.txt` (the ids converted), `bounding_boxes_<split>.json` = {id: {"boxes": {entity id:
[[x1, y1, x2, y2], ...]}, "scene": [ids], "nobox": [ids], "width", "height", "depth"}} with the
VOC corners minus 1 (0-based, as those utilities give them), and `sentences_<split>.json` =
{id: [{"sentence", "phrases": [{"first_word_index", "phrase", "phrase_id", "phrase_type"}]}]}.

Checked while converting: a split list or sentence file that is not UTF-8, phrase markup that
would corrupt a phrase (a stray `]`, a `[` inside a phrase or a word, `]]`, a tag without
words, an unclosed phrase) and a box with reversed corners or no part inside its image stop
the conversion with one line naming the file and the line or object; a box partly outside its
image is clipped to it (0 .. width-1, 0 .. height-1) and counted in a note; an id of a split
list that is not a plain file name (`../x`, `a/b`) is skipped and counted, never opened.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from hist_vlm.data.prepare import PrepareError, PrepareReport, read_text, write_set

SPLITS = ("train", "val", "test")


def parse_sentences(path: Path) -> list[dict]:
    """One Sentences/<id>.txt -> [{"sentence", "phrases": [...]}], one per non-empty line."""
    lines = read_text(path).split("\n")
    out = []
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            out.append(_sentence(line, path, f"line {lineno}"))
    return out


def _sentence(line: str, path: Path, where: str) -> dict:
    words: list[str] = []
    phrases: list[dict] = []
    current: dict | None = None  # the open phrase
    for token in line.split():
        if current is None and token.startswith("["):
            parts = token.split("/")
            if len(parts) < 2 or not parts[1].startswith("EN#") or not parts[1][3:]:
                raise PrepareError(path, where, f"bad phrase tag {token!r} (expected [/EN#<id>/<type>...)")
            if "]" in token or "[" in token[1:]:
                raise PrepareError(path, where, f"phrase tag {token!r} holds a bracket (a phrase without words?)")
            current = {"first_word_index": len(words), "words": [], "phrase_id": parts[1][3:], "phrase_type": parts[2:]}
            continue
        if current is None:
            if "]" in token or "[" in token:
                bracket = "]" if "]" in token else "["
                raise PrepareError(path, where, f"stray '{bracket}' in {token!r} (no phrase is open)")
            words.append(token)
            continue
        if token.startswith("[/EN#"):
            raise PrepareError(path, where, f"phrase {current['phrase_id']} is not closed before {token!r}")
        if "[" in token:
            raise PrepareError(path, where, f"'[' in {token!r} inside phrase {current['phrase_id']} "
                                            f"(phrases do not nest)")
        if "]" in token[:-1]:
            raise PrepareError(path, where, f"{token!r} in phrase {current['phrase_id']}: a ']' that is not "
                                            f"the phrase's one closing bracket ({']]' if token.endswith(']]') else 'inside a word'})")
        closes = token.endswith("]")
        token = token[:-1] if closes else token
        words.append(token)
        current["words"].append(token)
        if closes:
            phrases.append({"first_word_index": current["first_word_index"], "phrase": " ".join(current["words"]),
                            "phrase_id": current["phrase_id"], "phrase_type": current["phrase_type"]})
            current = None
    if current is not None:
        raise PrepareError(path, where, f"phrase {current['phrase_id']} is not closed (no ']')")
    return {"sentence": " ".join(words), "phrases": phrases}


def parse_annotation(path: Path, report: PrepareReport | None = None, split: str = "") -> dict:
    """One Annotations/<id>.xml -> {"boxes", "scene", "nobox", "width", "height", "depth"}.
    Boxes partly outside the image are clipped to it and counted in `report.notes`."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise PrepareError(path, None, f"not valid XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise PrepareError(path, None, "no <size> element")
    info: dict = {"boxes": {}, "scene": [], "nobox": []}
    for tag in ("width", "height", "depth"):
        info[tag] = _int(size, tag, path, "size")
    for n, obj in enumerate(root.findall("object")):
        where = f"object {n}"
        names = [(e.text or "").strip() for e in obj.findall("name")]
        if not names or not all(names):
            raise PrepareError(path, where, "missing or empty <name>")
        box = obj.find("bndbox")
        if box is not None:
            corners = [_int(box, tag, path, where) - 1 for tag in ("xmin", "ymin", "xmax", "ymax")]
            corners = _checked_box(corners, info["width"], info["height"], path, where, report, split)
            for name in names:
                info["boxes"].setdefault(name, []).append(corners)
            continue
        for tag, key in (("nobndbox", "nobox"), ("scene", "scene")):
            if obj.find(tag) is not None and _int(obj, tag, path, where) > 0:
                info[key].extend(names)
    return info


def _checked_box(corners: list[int], width: int, height: int, path: Path, where: str,
                 report: PrepareReport | None, split: str) -> list[int]:
    """0-based corners, well ordered and clipped to the image's pixels (0 .. width-1, 0 .. height-1)."""
    x1, y1, x2, y2 = corners
    shown = f"<bndbox> {x1 + 1} {y1 + 1} {x2 + 1} {y2 + 1} (xmin ymin xmax ymax)"
    if x2 < x1 or y2 < y1:
        raise PrepareError(path, where, f"{shown} is reversed (xmax < xmin or ymax < ymin)")
    if width <= 0 or height <= 0:  # no size to check against: kept as written
        if report is not None:
            report.notes[f"{split}: boxes of images whose <size> is 0 (not checked against it)"] += 1
        return corners
    if x2 < 0 or y2 < 0 or x1 > width - 1 or y1 > height - 1:
        raise PrepareError(path, where, f"{shown} lies outside the {width} x {height} image")
    clipped = [max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)]
    if clipped != corners and report is not None:
        report.notes[f"{split}: boxes partly outside their image, clipped to it"] += 1
    return clipped


def _int(parent: ET.Element, tag: str, path: Path, where: str) -> int:
    element = parent.find(tag)
    if element is None:
        raise PrepareError(path, where, f"missing <{tag}>")
    try:
        return int((element.text or "").strip())
    except ValueError:
        raise PrepareError(path, where, f"<{tag}> must be an integer, got {element.text!r}") from None


def prepare_flickr30k_entities(
    root: str | Path,
    out_dir: str | Path,
    splits: Iterable[str] = (),
    split_dir: str | Path | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Convert the `splits` (default: those of train/val/test whose id list exists) of the
    dataset under `root` (`Annotations/`, `Sentences/`) into `out_dir`; id lists are read from
    `split_dir` (default `root`). An id without both files is skipped and counted."""
    root, out_dir = Path(root), Path(out_dir)
    split_dir = Path(split_dir) if split_dir is not None else root
    splits = list(dict.fromkeys(splits)) or [s for s in SPLITS if (split_dir / f"{s}.txt").is_file()]
    if not splits:
        raise PrepareError(split_dir, None, "no train.txt, val.txt or test.txt image-id list")
    for folder in ("Annotations", "Sentences"):
        if not (root / folder).is_dir():
            raise PrepareError(root / folder, None, "folder not found (unzip annotations.zip here)")
    report = PrepareReport()
    converted = []  # every split is parsed before anything is written: a bad file leaves no output
    for split in splits:
        ids_path = split_dir / f"{split}.txt"
        if not ids_path.is_file():
            raise PrepareError(ids_path, None, "image-id list not found")
        kept, boxes, sentences = [], {}, {}
        ids = read_text(ids_path).split()
        for image_id in tqdm(ids, desc=f"flickr30k {split}", unit=" images", disable=not progress, leave=False):
            if Path(image_id).name != image_id or image_id in (".", "..") or "\\" in image_id:
                report.skipped[f"{split}: ids that are not a plain file name (a path: not read, not written)"] += 1
                continue
            xml, txt = root / "Annotations" / f"{image_id}.xml", root / "Sentences" / f"{image_id}.txt"
            missing = "Annotations/<id>.xml" if not xml.is_file() else "Sentences/<id>.txt" if not txt.is_file() else None
            if missing:
                report.skipped[f"{split}: images without {missing}"] += 1
                continue
            boxes[image_id], sentences[image_id] = parse_annotation(xml, report, split), parse_sentences(txt)
            kept.append(image_id)
            _count_phrases(boxes[image_id], sentences[image_id], split, report)
        converted.append((split, kept, boxes, sentences))
    write_set([out for split, kept, boxes, sentences in converted for out in (  # every file of every split, as a set
        (out_dir / f"bounding_boxes_{split}.json", boxes, len(kept)),
        (out_dir / f"sentences_{split}.json", sentences, len(kept)),
        (out_dir / f"{split}.txt", "".join(f"{i}\n" for i in kept), len(kept)),
    )], report)
    return report


def _count_phrases(info: dict, sentences: list[dict], split: str, report: PrepareReport) -> None:
    """The phrases the pointing game will not score (no box), by why: kept in the files."""
    for sent in sentences:
        for p in sent["phrases"]:
            pid = p["phrase_id"]
            if pid in info["boxes"]:
                report.notes[f"{split}: phrases with a box (scored)"] += 1
            elif pid in info["scene"]:
                report.notes[f"{split}: phrases of the whole scene (no box, not scored)"] += 1
            elif pid in info["nobox"]:
                report.notes[f"{split}: phrases not visible (no box, not scored)"] += 1
            else:  # id 0 (no entity), or an entity the xml does not list
                report.notes[f"{split}: phrases without an annotated entity (not scored)"] += 1
