"""Visual Genome region file: the streaming reader (`read_captions(path, "vg")`, ijson, what
`hist-vlm parse --format vg` and `hist-vlm data vg` use) against `json.load` of the whole file,
side by side on the same generated file in the real layout. Each runs in a fresh process;
the script prints peak memory (max RSS) and time of both and their ratios, and checks that
both count the same captions.

    python benchmarks/bench_vg_stream.py                  # about 100 MB of regions
    python benchmarks/bench_vg_stream.py --images 100000  # about the size of VG's 700 MB file
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import json, resource, sys, time
from hist_vlm.data.captions import read_captions
t = time.perf_counter()
if sys.argv[2] == "stream":
    n = sum(len(c) for _, c in read_captions(sys.argv[1], "vg"))
else:
    with open(sys.argv[1], "rb") as f:
        n = sum(len(rec["regions"]) for rec in json.load(f))
print(json.dumps({"captions": n, "seconds": time.perf_counter() - t,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_regions(path: Path, images: int, regions: int) -> None:
    """`images` records of `regions` regions each, with the fields of VG v1.2."""
    with path.open("w") as f:
        f.write("[")
        for i in range(1, images + 1):
            recs = [{"region_id": i * 1000 + r, "width": 40 + r, "height": 30 + r, "image_id": i,
                     "phrase": f"a small red object number {r} near the window", "y": r, "x": 2 * r}
                    for r in range(regions)]
            f.write(("," if i > 1 else "") + json.dumps({"regions": recs, "id": i}))
        f.write("]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=15000)
    ap.add_argument("--regions", type=int, default=50, help="regions per image (VG: about 50)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "region_descriptions.json"
        write_regions(path, args.images, args.regions)
        print(f"{path.stat().st_size / 2**20:.0f} MB, {args.images} images x {args.regions} regions")
        runs = {}
        for mode in ("stream", "json.load"):
            out = subprocess.run([sys.executable, "-c", MEASURE, str(path), mode], capture_output=True, text=True, check=True)
            runs[mode] = json.loads(out.stdout)
            print(f"{mode:>9}: peak {runs[mode]['max_rss_mb']:7.0f} MB, {runs[mode]['seconds']:6.2f} s")
        assert runs["stream"]["captions"] == runs["json.load"]["captions"] == args.images * args.regions
        print(f"memory json.load / stream: {runs['json.load']['max_rss_mb'] / runs['stream']['max_rss_mb']:.1f}x; "
              f"time stream / json.load: {runs['stream']['seconds'] / runs['json.load']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
