"""Dev script: parse the captions of a gold phrase JSONL, write predictions, run the scorer.

    python scripts/score_parser.py GOLD.jsonl SCORER.py [--pred OUT.jsonl] [--workers N]

The gold file stays where it is (research-only data: never copy it into the repo).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from hist_vlm.text.spacy_parser import SpacyParser


def write_predictions(gold: Path, pred: Path, parser: SpacyParser) -> int:
    """One prediction line per gold line, same order, so the scorer aligns by line."""
    with gold.open() as f:
        captions = [json.loads(line)["caption"] for line in f if line.strip()]
    with pred.open("w") as out:
        for caption, phrases in zip(captions, tqdm(parser.parse_many(captions), total=len(captions), desc="parse")):
            out.write(json.dumps({"caption": caption, "phrases": [p.to_dict() for p in phrases]}) + "\n")
    return len(captions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gold", type=Path, help="gold JSONL (flickr30k_entities_val_phrases.jsonl)")
    ap.add_argument("scorer", type=Path, help="phrase_eval.py")
    ap.add_argument("--pred", type=Path, help="where to write predictions (default: a temp file)")
    ap.add_argument("--json", type=Path, help="also write the scorer's metrics here")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    for p in (args.gold, args.scorer):
        if not p.is_file():
            sys.exit(f"error: no such file: {p}")
    pred = args.pred or Path(tempfile.mkstemp(suffix=".jsonl", prefix="pred_")[1])
    write_predictions(args.gold, pred, SpacyParser(workers=args.workers))
    cmd = [sys.executable, str(args.scorer), "--gold", str(args.gold), "--pred", str(pred), "--name", "spacy"]
    if args.json:
        cmd += ["--json", str(args.json)]
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
