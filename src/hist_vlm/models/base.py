"""The backbone protocol: what losses and training may ask of a vision-language model.

Losses and the training loop only ever talk to this interface, so a new backbone is one
file in `models/` and no loss changes. The central idea (DESIGN.md): the vision tower runs
once per image; every text row (caption, phrase, subject, partner, composite, ITM negative)
points at its image through an `image_index` tensor, and image embeddings are gathered.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor, nn


@dataclass
class TextRows:
    """A block of tokenized texts, each pointing at one image of the batch."""

    input_ids: Tensor       # [N, T] int64
    attention_mask: Tensor  # [N, T] int64, 1 = real token
    image_index: Tensor     # [N] int64, row -> image in the batch

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "TextRows":
        return TextRows(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class HistBatch:
    """One training batch. B images; texts point at them through `image_index`.

    captions:   one row per image (the usual caption for ITC/ITM/MLM)
    phrases:    noun phrases C_i (phrase loss)
    subjects:   subject words S_i of the same phrases, row-aligned with `phrases`
    pair_first / pair_second / composites: row-aligned triples (C_i, C_j, "C_i and C_j")
        for the addition loss; may hold zero rows.
    """

    pixel_values: Tensor  # [B, 3, H, W]
    image_ids: Tensor     # [B] int64, dataset-wide image id: same id = same image (ITC positives)
    captions: TextRows
    phrases: TextRows
    subjects: TextRows
    pair_first: TextRows
    pair_second: TextRows
    composites: TextRows

    def to(self, device: torch.device | str) -> "HistBatch":
        return HistBatch(
            *(
                v.to(device) if isinstance(v, (Tensor, TextRows)) else v
                for v in (getattr(self, f.name) for f in fields(self))
            )
        )


@dataclass
class FusionOutput:
    """Output of the image-grounded (fusion) text encoder."""

    last_hidden_state: Tensor        # [N, T, D]
    cross_attention: Tensor | None   # [N, heads, T, 1+P] softmax probabilities of the captured
                                     # layer, pre-dropout, still in the autograd graph
    #: every captured layer's probabilities, in the order `capture_layer` named them (one
    #: fusion pass can capture several layers: GradCAM's layer combinations, the layer sweep)
    cross_attentions: tuple[Tensor, ...] = ()


def capture_layers(capture_layer: int | Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    """`capture_layer` as a tuple of distinct in-range cross-attention layers (() for None)."""
    if capture_layer is None:
        return ()
    layers = (capture_layer,) if isinstance(capture_layer, int) else tuple(capture_layer)
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"capture_layer {bad[0]} out of range: the model has {n_layers} cross-attention layers")
    if len(set(layers)) != len(layers):
        raise ValueError(f"capture_layer {list(layers)} repeats a layer")
    return layers


def captured_output(
    capture_layer: int | Sequence[int] | None, last_hidden_state: Tensor, probs: Sequence[Tensor]
) -> FusionOutput:
    """The FusionOutput of a pass that captured `probs` (in `capture_layer`'s order)."""
    single = probs[0] if isinstance(capture_layer, int) else None
    return FusionOutput(last_hidden_state, single, tuple(probs))


class VisionLanguageBackbone(nn.Module, abc.ABC):
    """The protocol. Shapes: B images, N text rows, T tokens, P patches, D width, E embed dim."""

    #: patch grid (rows, cols) of the image encoder at its configured resolution
    patch_grid: tuple[int, int]
    #: number of cross-attention (fusion) layers; `capture_layer` indexes them from 0
    num_cross_attention_layers: int

    @abc.abstractmethod
    def tokenize(self, texts: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Texts -> (input_ids [N, T], attention_mask [N, T]) in this model's conventions
        (cleaning, special tokens, padding to the longest)."""

    @abc.abstractmethod
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> image token embeddings [B, 1+P, Dv] (CLS first)."""

    @abc.abstractmethod
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unimodal text encoder: [N, T] -> [N, T, D]."""

    @abc.abstractmethod
    def image_features(self, image_embeds: Tensor) -> Tensor:
        """ITC image features, L2-normalised: [B, 1+P, Dv] -> [B, E]."""

    @abc.abstractmethod
    def text_features(self, text_embeds: Tensor) -> Tensor:
        """ITC text features, L2-normalised: [N, T, D] -> [N, E]."""

    @abc.abstractmethod
    def fuse(
        self,
        text_embeds: Tensor,
        attention_mask: Tensor,
        image_embeds: Tensor,
        image_index: Tensor,
        capture_layer: int | Sequence[int] | None = None,
    ) -> FusionOutput:
        """Image-grounded text encoding of N rows against image_embeds[image_index].

        text_embeds [N, T, D] from `encode_text`; image_embeds [B, 1+P, Dv]; image_index [N].
        With `capture_layer` (0-based among cross-attention layers) the softmax
        probabilities of that layer are returned in the graph, for GradCAM; a sequence of
        distinct layers captures each of them in `cross_attentions` (`cross_attention` is None).
        """

    def fuse_rows(
        self,
        rows: TextRows,
        image_embeds: Tensor,
        *,
        text_embeds: Tensor | None = None,
        capture_layer: int | Sequence[int] | None = None,
    ) -> FusionOutput:
        """Fusion of token rows: the entry point losses and GradCAM use. The default reuses
        `text_embeds` from `encode_text` (ALBEF: the fusion layers continue the text layers);
        a backbone whose fusion re-reads the tokens (BLIP: one BERT stack run again with
        cross-attention) overrides this and ignores `text_embeds`."""
        if text_embeds is None:
            text_embeds = self.encode_text(rows.input_ids, rows.attention_mask)
        return self.fuse(text_embeds, rows.attention_mask, image_embeds, rows.image_index, capture_layer)

    @abc.abstractmethod
    def itm_logits(self, fused: FusionOutput) -> Tensor:
        """[N, 2] logits, column 1 = match."""

    def momentum_twin(self) -> "VisionLanguageBackbone | None":
        """The momentum (EMA) copy used for ITC/MLM distillation, or None when the backbone
        has none (BLIP). Its parameters never require grad."""
        return None

    @torch.no_grad()
    def update_momentum(self, momentum: float) -> None:
        """p_m = momentum * p_m + (1 - momentum) * p, for every parameter of the twin
        (one fused `torch._foreach_*` call, not a Python loop of kernels)."""

    def text_generation_loss(
        self, rows: TextRows, image_embeds: Tensor, *, momentum: "VisionLanguageBackbone | None" = None
    ) -> Tensor:
        """The backbone's language-modelling loss on `rows` (BLIP: captioning LM). A scalar;
        backbones without a language head return 0.

        A masked-LM backbone (ALBEF) instead exposes, on the model and on its momentum twin,
        `mlm_logits(input_ids, attention_mask, image_embeds, image_index) -> [N, T, vocab]`
        (a full multimodal pass + MLM head on already-masked ids), and `tokenizer` with
        `mask_token_id`, `pad_token_id`, `cls_token_id`, `vocab_size`: `hist_vlm.losses` does
        the masking and the momentum distillation, and dispatches on `hasattr(model, "mlm_logits")`."""
        return image_embeds.new_zeros(())
