"""Where do a model's single-phrase pointing misses land: on another object of the scene, or
on background?

Pointing counts a miss the same wherever it lands. A map that finds the wrong object and a map
that finds no object fail differently; this script splits them, from the per-query results
`hist-vlm demo` leaves in each run (RUN/eval_test.jsonl) and the boxes of every single-object
query of the same image (a point strictly inside another object's box, the pointing game's own
rule, is "another object").

    python scripts/probe_miss_locations.py demo_out/world/grounding.jsonl demo_out/runs/*-seed*

Prints one line per variant (runs named VARIANT-seedN are pooled).
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from hist_vlm.data.grounding import read_synthetic
from hist_vlm.eval.pointing import pointing_hit


def miss_locations(results: list[dict], objects: dict[str, list], fmt: str) -> collections.Counter:
    """hit / another object / background counts of the single-phrase rows of `results`;
    `objects`: query id -> the boxes of the image's OTHER objects."""
    out = collections.Counter()
    for row in results:
        if row["kind"] != "single":
            continue
        if row["hit"]:
            out["hit"] += 1
        elif pointing_hit(tuple(row["point"]), objects[row["id"]], fmt):
            out["another object"] += 1
        else:
            out["background"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grounding", type=Path, help="the world's grounding.jsonl")
    ap.add_argument("runs", type=Path, nargs="+", help="run folders holding eval_test.jsonl")
    args = ap.parse_args()
    singles = [r for r in read_synthetic(args.grounding, splits=["test"]) if r.kind == "single"]
    by_image = collections.defaultdict(list)
    for r in singles:
        by_image[r.image].append(r)
    objects = {r.id: [b for o in by_image[r.image] if o.object_ids != r.object_ids for b in o.boxes] for r in singles}
    pooled: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for run in args.runs:
        rows = [json.loads(line) for line in (run / "eval_test.jsonl").read_text().splitlines() if line.strip()]
        pooled[run.name.split("-seed")[0]] += miss_locations(rows, objects, singles[0].box_format)
    for variant, counts in pooled.items():
        n = sum(counts.values())
        print(f"{variant}: " + ", ".join(f"{k} {100 * counts[k] / n:.1f} %" for k in ("hit", "another object", "background"))
              + f" of {n} queries")


if __name__ == "__main__":
    main()
