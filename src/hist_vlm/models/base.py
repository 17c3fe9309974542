"""The backbone protocol: what losses and training may ask of a vision-language model.

Losses and the training loop only ever talk to this interface, so a new backbone is one
file in `models/` and no loss changes. The central idea (DESIGN.md): the vision tower runs
once per image; every text row (caption, phrase, subject, partner, composite, ITM negative)
points at its image through an `image_index` tensor, and image embeddings are gathered.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Self, Sequence

import torch
from torch import Tensor, nn

from hist_vlm.batch import TextRows
from hist_vlm.models.layout import (CONFIG_FILE, WEIGHTS_FILE, built_from, load_weights, read_model_config,
                                    write_model_folder)


@dataclass
class FusionOutput:
    """Output of the image-grounded text pass (the fusion encoder, or a decoder reading the image).

    A captured attention tensor's last two axes are (reading tokens, keys). The map is its
    `capture_block`: by default every token row and every column after the image CLS, i.e.
    [N, heads, S, 1+P] with S = the rows' text tokens (ALBEF, BLIP; masked by
    `rows.attention_mask`). A backbone whose image is read by other tokens names them with
    `capture_mask` (BLIP-2: its Q query tokens, all valid); one whose image tokens sit inside
    a longer sequence (LLaVA: [N, heads, 1+T, L] decoder self-attention of its rows) names the rows and the
    P patch columns with `capture_block`. GradCAM differentiates the whole captured tensor and
    reads the block, so the gradient is the true one whatever else the tensor holds."""

    last_hidden_state: Tensor        # [N, T', D] (T' = T, or Q + T for BLIP-2: queries first)
    cross_attention: Tensor | None   # [N, heads, S', K] softmax probabilities of the captured
                                     # layer, pre-dropout, still in the autograd graph
    #: every captured layer's probabilities, in the order `capture_layer` named them (one
    #: fusion pass can capture several layers: GradCAM's layer combinations, the layer sweep)
    cross_attentions: tuple[Tensor, ...] = ()
    #: [N, S] 1 = a token (row of the block) whose attention counts; None: the rows' attention_mask
    capture_mask: Tensor | None = None
    #: (token rows S, patch columns P) of each captured tensor that make the map
    capture_block: tuple[slice, slice] = (slice(None), slice(1, None))
    #: [N] the grounding score, when the pass computes it itself (LLaVA: the text's log-likelihood
    #: given the image); None: `grounding_score` derives it from the hidden states (an ITM head)
    score: Tensor | None = None


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
    capture_layer: int | Sequence[int] | None, last_hidden_state: Tensor, probs: Sequence[Tensor],
    capture_mask: Tensor | None = None, **fields: Any,
) -> FusionOutput:
    """The FusionOutput of a pass that captured `probs` (in `capture_layer`'s order); `fields`:
    FusionOutput's other fields (`capture_block`, `score`)."""
    single = probs[0] if isinstance(capture_layer, int) else None
    return FusionOutput(last_hidden_state, single, tuple(probs), capture_mask, **fields)


class ImageMemo:
    """What a backbone computes from an image-embeddings tensor alone (ALBEF's cross-attention
    keys/values, LLaVA's shared prompt-and-image pass), kept while a scope is `active()` (a
    backbone's `reusing_image_projections`): one entry, keyed on the tensor object, the grad mode
    and autocast, so a no-grad result never serves a pass that trains. Off: computed every time."""

    def __init__(self) -> None:
        self.on = False
        self._key: tuple | None = None
        self._value: Any = None

    def get(self, source: Tensor, compute: Callable[[], Any]) -> Any:
        """`compute()`, or what it gave for `source` before in this scope."""
        if not self.on:
            return compute()
        modes = (torch.is_grad_enabled(), torch.is_autocast_enabled(source.device.type))
        if self._key is None or self._key[0] is not source or self._key[1:] != modes:
            self._key, self._value = (source, *modes), compute()
        return self._value

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.on = True
        try:
            yield
        finally:
            self.on, self._key, self._value = False, None, None


def mean_log_likelihood(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """[N] each row's mean log-probability of its `targets` [N, T] under `logits` [N, T, V]
    (position t predicts targets[:, t]), over the tokens where `mask` [N, T] is 1."""
    logp = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, T]
    mask = mask.to(logp.dtype)
    return (logp * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MomentumTwin(nn.Module, abc.ABC):
    """The momentum (EMA) copy of a backbone's encoders, for ITC (and MLM) distillation. Every
    call runs without autograd; its parameters never require grad. Shapes as the backbone's."""

    @abc.abstractmethod
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, 1+P, Dv]."""

    @abc.abstractmethod
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[N, T] -> [N, T, D]."""

    @abc.abstractmethod
    def image_features(self, image_embeds: Tensor) -> Tensor:
        """[B, 1+P, Dv] -> [B, E], L2-normalised."""

    @abc.abstractmethod
    def text_features(self, text_embeds: Tensor) -> Tensor:
        """[N, T, D] -> [N, E], L2-normalised."""


class VisionLanguageBackbone(nn.Module, abc.ABC):
    """The protocol. Shapes: B images, N text rows, T tokens, P patches, D width, E embed dim.

    Everything a caller may ask is a typed member here or on a capability; nothing is probed
    with `getattr`. The core is what grounding needs: images, text rows, the image-grounded
    text pass with its captured attention, and the score GradCAM differentiates. The training
    objectives are optional capabilities a backbone declares by deriving from them, and callers
    check with `isinstance`:
      ContrastiveModel     ITC (unimodal text encoder, features, temperature)
      MatchingModel        ITM (a match head on the fused rows)
      MaskedLanguageModel  masked LM through the multimodal encoder (ALBEF)
      CaptioningModel      next-token LM of the text given the image (BLIP's decoder, LLaVA)
    A backbone registers itself with `hist_vlm.models.registry.register`.
    """

    #: registry name, stored as "backbone" in a saved folder's config.json (set by `register`)
    name: ClassVar[str]

    # ---------------------------------------------------------------- sizes callers read
    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """The square input resolution the image encoder is built for."""

    @property
    @abc.abstractmethod
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of image patches at `image_size`: the GradCAM map's shape."""

    @property
    @abc.abstractmethod
    def max_text_length(self) -> int:
        """The most tokens a text row may have (the position table), special tokens included."""

    @property
    @abc.abstractmethod
    def num_cross_attention_layers(self) -> int:
        """Layers whose attention reads the image (cross-attention layers of a fusion encoder,
        every layer of a decoder that reads image tokens); `capture_layer` indexes them from 0."""

    @property
    @abc.abstractmethod
    def num_cross_attention_heads(self) -> int:
        """Heads of every such layer (a GradCAM map may use one head)."""

    @property
    @abc.abstractmethod
    def default_capture_layers(self) -> tuple[int, ...]:
        """GradCAM layer(s) when none are configured, for training (and for evaluation when the
        backbone declares no evaluation map: `registry.register(eval_map=...)`). Each should
        have layers above it where the score reads the text (ALBEF, BLIP: at the last
        cross-attention layer only [CLS] reaches the ITM head, so the map ignores the text)."""

    # ---------------------------------------------------------------- towers
    @abc.abstractmethod
    def tokenize(self, texts: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Texts -> (input_ids [N, T], attention_mask [N, T]) in this model's conventions
        (cleaning, special tokens, padding to the longest)."""

    @abc.abstractmethod
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> image token embeddings [B, K, Dv] (ALBEF, BLIP: K = 1+P, CLS first)."""

    @abc.abstractmethod
    def fuse_rows(
        self,
        rows: TextRows,
        image_embeds: Tensor,
        *,
        text_embeds: Tensor | None = None,
        capture_layer: int | Sequence[int] | None = None,
    ) -> FusionOutput:
        """Image-grounded text encoding of the rows against image_embeds[rows.image_index]:
        the entry point of ITM, GradCAM and retrieval re-ranking.

        image_embeds [B, K, Dv]; `text_embeds` [N, T, D] is `encode_text`'s output for the
        rows when the caller has it (ALBEF's fusion layers continue the text layers and reuse
        it; a backbone whose fusion re-reads the tokens, BLIP, ignores it). With
        `capture_layer` (0-based among `num_cross_attention_layers`) the softmax probabilities
        of that layer are returned in the graph, for GradCAM; a sequence of distinct layers
        captures each of them in `cross_attentions` (`cross_attention` is None). Where the map
        lives in them: `capture_block` and `capture_mask` (FusionOutput).
        """

    @abc.abstractmethod
    def grounding_score(self, fused: FusionOutput) -> Tensor:
        """[N] the per-row score GradCAM differentiates, G = ReLU(A * d score / dA): the ITM
        match logit of an encoder (the paper), the text's log-likelihood of a decoder."""

    @contextlib.contextmanager
    def reusing_image_projections(self) -> Iterator[None]:
        """Within: work that depends on an image alone (ALBEF: the cross-attention keys and values
        of its embeddings) may be done once and reused by every pass over the same image
        embeddings tensor, as in one training step's terms. The results are those of passes
        that recompute it. Default: nothing is reused."""
        yield

    # ---------------------------------------------------------------- momentum (optional)
    def momentum_twin(self) -> MomentumTwin | None:
        """The momentum (EMA) copy used for ITC/MLM distillation, or None when the backbone
        has none (BLIP, BLIP-2)."""
        return None

    @torch.no_grad()
    def update_momentum(self, momentum: float) -> None:
        """p_m = momentum * p_m + (1 - momentum) * p for every parameter of the twin (one fused
        `torch._foreach_*` call); nothing to do without a twin."""

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: dict[str, Any], *, root: Path | None = None) -> Self:
        """A randomly initialised model from a JSON-able build config: the `model.params` of a
        training config, or what `config_dict` stored (`root`: the folder it was stored in,
        for files the config names relative to it). Unknown keys are a ValueError."""

    @abc.abstractmethod
    def config_dict(self, directory: Path | None = None) -> dict[str, Any]:
        """The build config that `from_config` turns back into this architecture. With
        `directory`, files the model needs besides its weights (a vocabulary, a tokenizer) are
        written there and named relative to it."""

    def save_pretrained(self, directory: str | Path) -> None:
        """`config.json` ({"backbone": name, "config": config_dict}) + `model.safetensors`
        (tied tensors stored once): the one folder layout every backbone saves and loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_model_folder(self, directory, {"backbone": self.name, "config": self.config_dict(directory)})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Self:
        """The model `save_pretrained` wrote to `directory`, in eval mode (every key loaded).
        A damaged config.json or weights file, or a config value of the wrong type, is one
        ValueError line naming the file."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{directory} is not a saved model (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        payload = read_model_config(config_path)
        if payload.get("backbone") != cls.name:
            raise ValueError(f"{config_path} describes backbone {payload.get('backbone')!r}, not {cls.name!r}")
        model = built_from(config_path, lambda: cls.from_config(dict(payload.get("config") or {}), root=directory))
        model.load_saved_weights(directory)
        return model.eval()

    def load_saved_weights(self, directory: str | Path) -> None:
        """The weights `save_pretrained` wrote to `directory`, into this model in place: every
        key (strict), or a one-line ValueError naming the file. A backbone that saves only part
        of its weights (LLaVA's LoRA adapters) loads that part."""
        load_weights(self, Path(directory) / WEIGHTS_FILE)


class ContrastiveModel(abc.ABC):
    """Optional capability (ALBEF, BLIP, BLIP-2): image-text contrastive learning (ITC)."""

    #: the ITC temperature, learnable (ALBEF clamps it to [0.001, 0.5])
    temp: nn.Parameter

    @property
    @abc.abstractmethod
    def embed_dim(self) -> int:
        """E, the width of the ITC features."""

    @abc.abstractmethod
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unimodal text encoder: [N, T] -> [N, T, D]."""

    @abc.abstractmethod
    def image_features(self, image_embeds: Tensor) -> Tensor:
        """ITC image features, L2-normalised: [B, 1+P, Dv] -> [B, E], or [B, K, E] for a
        backbone that scores an image by the best of K vectors (BLIP-2's query tokens; the
        losses and retrieval compare features with `hist_vlm.losses.itc.similarity`)."""

    @abc.abstractmethod
    def text_features(self, text_embeds: Tensor) -> Tensor:
        """ITC text features, L2-normalised: [N, T, D] -> [N, E]."""


class MatchingModel(abc.ABC):
    """Optional capability (ALBEF, BLIP, BLIP-2): an image-text matching (ITM) head."""

    @abc.abstractmethod
    def itm_logits(self, fused: FusionOutput) -> Tensor:
        """[N, 2] logits of `fuse_rows`' output, column 1 = match."""


@dataclass(frozen=True)
class MaskTokens:
    """The token ids masked language modelling needs."""

    mask_token_id: int
    vocab_size: int
    never_mask: tuple[int, ...]   # special tokens that keep their id ([PAD], [CLS])


class MaskedLanguageModel(abc.ABC):
    """Optional capability (ALBEF): masked LM through the multimodal encoder. `hist_vlm.losses`
    does the masking and the momentum distillation; a twin that can distil derives from it too."""

    @property
    @abc.abstractmethod
    def mask_tokens(self) -> MaskTokens:
        """The ids of [MASK], the vocabulary size and the never-masked specials."""

    @abc.abstractmethod
    def mlm_logits(
        self, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor, image_index: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Full multimodal pass + MLM head on already-masked ids [N, T], image_embeds
        [B, 1+P, Dv] gathered by image_index [N] -> logits [N, T, vocab]; with `positions`
        (bool [N, T]) only those tokens' logits, [K, vocab] in row-major order."""


class CaptioningModel(abc.ABC):
    """Optional capability (BLIP with its text decoder, LLaVA): image-conditioned language modelling."""

    @abc.abstractmethod
    def lm_token_losses(self, rows: TextRows, image_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """(the next-token loss of each text token given its image and the tokens before it,
        [N, T'], in the model's own LM loss (BLIP: with its label smoothing); [N, T'] 1 = a token
        the loss scores). Per token, so that many processes average over the global batch's tokens."""

    def lm_loss(self, rows: TextRows, image_embeds: Tensor) -> Tensor:
        """The rows' LM loss, the mean over their scored tokens (transformers' reduction): a scalar."""
        losses, scored = self.lm_token_losses(rows, image_embeds)
        scored = scored.to(losses.dtype)
        return (losses * scored).sum() / scored.sum().clamp(min=1.0)

    @abc.abstractmethod
    def text_log_likelihood(self, rows: TextRows, image_embeds: Tensor) -> Tensor:
        """[N] each row's mean per-token log-likelihood of its text given image_embeds[rows.image_index]
        (the score the likelihood-ranking term compares across images)."""
