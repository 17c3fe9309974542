"""ALBEF fusion: cross-attention keys/values projected once per image and gathered for the
text rows (what `AlbefModel.fuse` does), against running the fusion layers on
`image_embeds[image_index]` repeated per row, side by side. Forward + backward, with the
cross-attention of one layer captured as the HIST step does.

    python benchmarks/bench_albef_fuse.py                       # small model, CPU
    python benchmarks/bench_albef_fuse.py --size base --device cuda   # ALBEF-base 256 px, bf16 autocast
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hist_vlm.models.albef import AlbefConfig, AlbefModel

SIZES = {
    "small": dict(image_size=128, patch_size=16, vision_width=256, vision_depth=2, vision_heads=4, text_width=256,
                  text_layers=6, text_heads=4, text_intermediate_size=1024, fusion_layer=3, momentum=False),
    "base": dict(image_size=256, momentum=False),
}


class _Repeated(torch.nn.Module):
    """The naive path: every row carries its own copy of its image's embeddings."""

    def __init__(self, model: AlbefModel):
        super().__init__()
        self.model = model

    def fuse(self, text, mask, image_embeds, index, capture_layer):
        return self.model.fuse(text, mask, image_embeds[index], None, capture_layer)


def step(fuse, model, text, mask, image_embeds, index, capture_layer) -> None:
    fused = fuse(text, mask, image_embeds, index, capture_layer)
    loss = model.itm_logits(fused)[:, 1].sum() + fused.cross_attention.float().mean()
    loss.backward()


def timed(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call; the variants alternate so that machine noise hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rows-per-image", type=int, default=6, help="captions, phrases, subjects, pairs, composites")
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = AlbefModel(AlbefConfig(**SIZES[args.size])).to(device).train()
    cfg = model.config
    n = args.images * args.rows_per_image
    ids = torch.randint(1000, 2000, (n, args.tokens), device=device)
    mask = torch.ones_like(ids)
    index = torch.arange(args.images, device=device).repeat_interleave(args.rows_per_image)
    pixels = torch.randn(args.images, 3, cfg.image_size, cfg.image_size, device=device)
    capture = min(2, model.num_cross_attention_layers - 1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    with autocast:
        image_embeds = model.encode_image(pixels).detach().requires_grad_()
        text = model.encode_text(ids, mask).detach().requires_grad_()

    def run(fuse):
        def fn():
            with autocast:
                step(fuse, model, text, mask, image_embeds, index, capture)
            model.zero_grad(set_to_none=True)
        return fn

    t = timed({"gathered": run(model.fuse), "repeated": run(_Repeated(model).fuse)}, args.repeats, device)
    gathered, repeated = t["gathered"], t["repeated"]
    print(f"ALBEF {args.size} on {device}: {args.images} images x {args.rows_per_image} rows, {args.tokens} tokens, "
          f"{cfg.image_size // cfg.patch_size}^2 patches, fusion fwd+bwd with capture")
    print(f"  K/V per image, gathered : {gathered * 1e3:8.1f} ms")
    print(f"  image embeds repeated   : {repeated * 1e3:8.1f} ms")
    print(f"  ratio repeated/gathered : {repeated / gathered:8.2f}x")


if __name__ == "__main__":
    main()
