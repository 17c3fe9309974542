"""Tiny backbones and HIST batches shared by the loss, BLIP and DDP tests."""
from __future__ import annotations

import torch

from hist_vlm.models import backbone_names, build_sized
from hist_vlm.batch import HistBatch, TextRows
from hist_vlm.models.blip import BlipBackbone

#: every registered backbone: the contract tests run on each
BACKBONES = backbone_names()

CAPTIONS = [
    "a man riding a brown horse on the beach",
    "a dog catching a red frisbee",
    "a man holding an umbrella next to a bus",
    "two cats sleeping on a couch",
]
PHRASES = [("a man", "man"), ("a red frisbee", "frisbee"), ("a man", "man"), ("two cats", "cats")]
PAIRS = [("a man", "a brown horse"), ("a dog", "a red frisbee"), ("an umbrella", "a bus"), ("two cats", "a couch")]


def tiny_backbone(name: str, seed: int = 0, *, dtype=torch.float32, **overrides):
    """The registry's "tiny" size of backbone `name` (no dropout), seeded."""
    torch.manual_seed(seed)
    return build_sized(name, "tiny", **overrides).to(dtype)


def tiny_blip(seed: int = 0, *, decoder: bool = True, dtype=torch.float32) -> BlipBackbone:
    return tiny_backbone("blip", seed, dtype=dtype, with_decoder=decoder)


def rows(model, texts: list[str], image_index: list[int], pad_to: int | None = None) -> TextRows:
    ids, mask = model.tokenize(texts)
    if pad_to is not None:  # fixed length: the same padding on every rank (DDP test)
        ids = torch.nn.functional.pad(ids, (0, pad_to - ids.shape[1]))
        mask = torch.nn.functional.pad(mask, (0, pad_to - mask.shape[1]))
    return TextRows(ids, mask, torch.tensor(image_index))


def hist_batch(model, n_images: int = 4, seed: int = 0, pad_to: int | None = None,
               image_ids: list[int] | None = None) -> HistBatch:
    """B images, one caption, phrase, subject and (C_i, C_j, "C_i and C_j") triple each."""
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    idx = list(range(n_images))
    pick = [i % len(CAPTIONS) for i in idx]
    return HistBatch(
        pixel_values=torch.randn(n_images, 3, size, size, generator=g, dtype=next(model.parameters()).dtype),
        image_ids=torch.tensor(image_ids if image_ids is not None else [100 + i for i in idx]),
        captions=rows(model, [CAPTIONS[p] for p in pick], idx, pad_to),
        phrases=rows(model, [PHRASES[p][0] for p in pick], idx, pad_to),
        subjects=rows(model, [PHRASES[p][1] for p in pick], idx, pad_to),
        pair_first=rows(model, [PAIRS[p][0] for p in pick], idx, pad_to),
        pair_second=rows(model, [PAIRS[p][1] for p in pick], idx, pad_to),
        composites=rows(model, [f"{PAIRS[p][0]} and {PAIRS[p][1]}" for p in pick], idx, pad_to),
    )


def tiny_albef(seed: int = 0, *, momentum: bool = True, dtype=torch.float32):
    return tiny_backbone("albef", seed, dtype=dtype, momentum=momentum)


def shard_batch(batch: HistBatch, rank: int, world: int) -> HistBatch:
    """Rank `rank`'s equal share of the images and of their rows (image_index re-based)."""
    b = batch.pixel_values.shape[0] // world
    lo, hi = rank * b, (rank + 1) * b

    def take(r: TextRows) -> TextRows:
        keep = (r.image_index >= lo) & (r.image_index < hi)
        return TextRows(r.input_ids[keep], r.attention_mask[keep], r.image_index[keep] - lo)

    return HistBatch(
        batch.pixel_values[lo:hi], batch.image_ids[lo:hi],
        *(take(getattr(batch, k)) for k in ("captions", "phrases", "subjects", "pair_first", "pair_second",
                                            "composites")),
    )


def build(name: str, dtype=torch.float32):
    return tiny_backbone(name, dtype=dtype)


def check_against_finite_differences(f, param, grad, what: str = "", eps: float = 1e-6) -> None:
    """The entry of `param` with the largest |`grad`| (d f()/d param, analytic): its central
    finite difference of the scalar `f()` agrees to 1e-5 relative, and is not zero."""
    import pytest

    flat, k = param.view(-1), int(grad.abs().argmax())
    with torch.no_grad():
        orig = flat[k].item()
        flat[k] = orig + eps
        up = f().item()
        flat[k] = orig - eps
        down = f().item()
        flat[k] = orig
    fd = (up - down) / (2 * eps)
    assert abs(fd) > 0, f"{what}: finite difference is zero: the test would prove nothing"
    assert grad.view(-1)[k].item() == pytest.approx(fd, rel=1e-5, abs=1e-12), what


def float64_rms_norm(monkeypatch) -> None:
    """transformers' Llama RMSNorm rounds to float32 even in a float64 model (half-precision
    stability), so finite differences on a float64 LLaVA would measure float32 noise: the same
    norm in the input dtype, for the test's duration."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, hidden):
        return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def pairs_only_on(batch: HistBatch, images: list[int]) -> HistBatch:
    """Keep the (C_i, C_j, C_ij) rows of these images only (other images have no partner)."""
    def keep(r: TextRows) -> TextRows:
        sel = torch.isin(r.image_index, torch.tensor(images))
        return TextRows(r.input_ids[sel], r.attention_mask[sel], r.image_index[sel])

    return HistBatch(batch.pixel_values, batch.image_ids, batch.captions, batch.phrases, batch.subjects,
                     keep(batch.pair_first), keep(batch.pair_second), keep(batch.composites))
