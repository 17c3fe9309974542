"""REFER (https://github.com/lichengunc/refer: `<root>/<dataset>/refs(<split_by>).p` and
`instances.json`) -> the test lists ALBEF and SelfEQ evaluate on, `<dataset>_<split>.json` =
[{"image", "text", "ref_id", "split"}], one item per referring sentence, which
`hist_vlm.data.grounding.read_refer` / `load_benchmark` read (boxes and sizes come from the
REFER files again at evaluation).

Splits select refs as REFER's `getRefIds(split=...)` does: "test" takes every split containing
"test" (RefCOCO+: testA and testB; refclef: test), "testA" those containing "A", others match
exactly. The item's "split" is the ref's own (testA / testB), which the pointing game reports.

Image paths are relative to `--image-root` at evaluation: COCO-based datasets
`train2014/COCO_train2014_<image id, 12 digits>.jpg` (ALBEF's layout under the COCO images
folder), refclef `saiapr_tc-12/<image id // 1000, 2 digits>/images/<image id>.jpg` (the
SAIAPR TC-12 folder tree REFER's `images/` holds). The text is the sentence's "sent" (REFER's
cleaned, lower-cased form).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from hist_vlm.data.grounding import _get as _field, load_refer
from hist_vlm.data.prepare import PrepareError, PrepareReport, write_set

DATASETS = ("refcoco+", "refcoco", "refcocog", "refclef")
DEFAULT_SPLITS = ("val", "test")


def image_path(dataset: str, image_id: int) -> str:
    """Where the image of `image_id` lies under the image root (see the module docstring)."""
    if dataset == "refclef":
        return f"saiapr_tc-12/{image_id // 1000:02d}/images/{image_id}.jpg"
    return f"train2014/COCO_train2014_{image_id:012d}.jpg"


def in_split(ref_split: str, split: str) -> bool:
    """REFER's split selection (`getRefIds`)."""
    if split == "test":
        return "test" in ref_split
    if split.startswith("test") and len(split) == 5:  # testA, testB, testC
        return ref_split.startswith("test") and split[-1] in ref_split[4:]
    return ref_split == split


def prepare_refer(
    refer_root: str | Path,
    dataset: str,
    out_dir: str | Path,
    splits: Iterable[str] = DEFAULT_SPLITS,
    split_by: str = "unc",
    progress: bool = True,
) -> PrepareReport:
    """Write `<out_dir>/<dataset>_<split>.json` for each of `splits`."""
    if dataset not in DATASETS:
        raise PrepareError(dataset, None, f"unknown REFER dataset (choose {', '.join(DATASETS)})")
    splits = list(splits)
    overlap = [s for s in splits if s != "test" and s.startswith("test")]
    if "test" in splits and overlap:
        raise PrepareError(dataset, None, f"split 'test' already holds {', '.join(overlap)}: the evaluator "
                                          f"would read their sentences twice; ask for one or the other")
    refs_path = Path(refer_root) / dataset / f"refs({split_by}).p"
    index = load_refer(refer_root, dataset, split_by)
    items: dict[str, list[dict]] = {s: [] for s in splits}
    report = PrepareReport()
    for ref_id, ref in tqdm(index.refs.items(), desc=f"{dataset} refs", unit=" refs", disable=not progress, leave=False):
        where = f"ref {ref_id}"
        ref_split = _field(ref, "split", refs_path, where)
        wanted = [s for s in splits if in_split(str(ref_split), s)]
        if not wanted:
            continue
        image_id, ann_id = int(_field(ref, "image_id", refs_path, where)), int(_field(ref, "ann_id", refs_path, where))
        sentences = _field(ref, "sentences", refs_path, where)
        if not isinstance(sentences, list):
            raise PrepareError(refs_path, where, f"'sentences' must be a list, got {type(sentences).__name__}")
        reason = ("refs whose annotation is not in instances.json" if ann_id not in index.anns
                  else "refs whose image is not in instances.json" if image_id not in index.images else None)
        if reason is not None:
            for s in wanted:
                report.skipped[f"{s}: {reason}"] += 1
            continue
        image = image_path(dataset, image_id)
        file_name = index.images[image_id].get("file_name")
        if file_name and Path(str(file_name)).name != Path(image).name:  # the path layout assumed is wrong here
            report.notes["refs whose instances.json file_name differs from the image path written"] += 1
        for n, sent in enumerate(sentences):
            text = " ".join(str(_field(sent, "sent", refs_path, f"{where} sentence {n}")).split())
            for s in wanted:
                if not text:
                    report.skipped[f"{s}: empty sentences"] += 1
                    continue
                items[s].append({"image": image, "text": text, "ref_id": ref_id,
                                 "split": str(ref_split)})
    for s in splits:
        if not items[s]:
            raise PrepareError(refs_path, None, f"no sentence in split {s!r} (splits of {dataset}: "
                                                f"{', '.join(sorted({str(r.get('split')) for r in index.refs.values()}))})")
    write_set([(Path(out_dir) / f"{dataset}_{s}.json", items[s], len(items[s])) for s in items], report)  # as a set
    return report

