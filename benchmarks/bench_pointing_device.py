"""Pointing game on the GPU against the CPU, side by side: 3000 raw 24x24 maps (many with ties,
some all-zero) upsampled to 40 image sizes, timed, and checked against SelfEQ's own lines
(`(m == m.max()).nonzero()[0]` after bicubic upsampling) run on the GPU.

    python benchmarks/bench_pointing_device.py        # needs CUDA
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from hist_vlm.eval.pointing import pointing_points


def selfeq_point(m: torch.Tensor, h: int, w: int) -> tuple[int, int]:
    up = F.interpolate(m.view(1, 1, *m.shape), size=(h, w), mode="bicubic").squeeze()
    y, x = (up == torch.max(up)).nonzero()[0]
    return int(x), int(y)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_pointing_device.py needs a CUDA device")
    g = torch.Generator().manual_seed(0)
    n = 3000
    maps = torch.rand(n, 24, 24, generator=g)
    maps[:500] = torch.randint(0, 3, (500, 24, 24), generator=g).float()  # many ties
    maps[500:600] = 0  # all-zero maps
    distinct = [(int(h), int(w)) for h, w in torch.randint(200, 640, (40, 2), generator=g)]
    sizes = [distinct[i % 40] for i in range(n)]
    t = time.perf_counter()
    cpu = pointing_points(maps, sizes)
    t_cpu = time.perf_counter() - t
    gpu_maps = maps.cuda()
    pointing_points(gpu_maps[:10], sizes[:10])  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    gpu = pointing_points(gpu_maps, sizes)
    torch.cuda.synchronize()
    t_gpu = time.perf_counter() - t
    ref = [selfeq_point(m, h, w) for m, (h, w) in zip(gpu_maps, sizes)]
    agree = lambda a, b: sum(x == y for x, y in zip(a, b))  # noqa: E731
    print(f"{n} maps: gpu == SelfEQ(gpu) {agree(gpu, ref)}/{n}, cpu == gpu {agree(cpu, gpu)}/{n} "
          f"(bicubic rounding differs across devices); zero maps at (0, 0): {all(p == (0, 0) for p in gpu[500:600])}")
    print(f"pointing_points: cpu {t_cpu:.3f} s, gpu {t_gpu:.3f} s ({t_cpu / t_gpu:.1f}x)")


if __name__ == "__main__":
    main()
