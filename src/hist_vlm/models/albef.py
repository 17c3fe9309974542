"""ALBEF (Li et al., 2021) as a `VisionLanguageBackbone`, numerically the reference model.

Module and parameter names follow the official checkpoints (`visual_encoder.*`,
`text_encoder.bert.*`, `text_encoder.cls.*`, `*_m` momentum copies), so `ALBEF.pth` loads by
name. The ViT is timm's; BERT reuses transformers' embeddings, feed-forward and MLM head.
The attention is written here because HIST needs the softmax probabilities of one
cross-attention layer, pre-dropout and in the graph, and because the cross-attention keys and
values are projected once per image and then gathered for the text rows that point at it.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import math
import typing
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOnlyMLMHead,
    BertOutput,
    BertSelfOutput,
)

from hist_vlm._io import atomic_write_bytes
from hist_vlm.batch import TextRows
from hist_vlm.models.base import (
    ContrastiveModel,
    FusionOutput,
    ImageMemo,
    MatchingModel,
    MaskedLanguageModel,
    MaskTokens,
    MomentumTwin,
    VisionLanguageBackbone,
    captured_output,
    capture_layers,
)
from hist_vlm.models.registry import EvalMap, register
from hist_vlm.models.tokenization import AlbefTokenizer

# Names that ALBEF's YAML / config_bert.json use for the same sizes.
_ALIASES = {
    "image_res": "image_size",
    "hidden_size": "text_width",
    "num_hidden_layers": "text_layers",
    "num_attention_heads": "text_heads",
    "intermediate_size": "text_intermediate_size",
    "encoder_width": "vision_width",
    "layer_norm_eps": "text_layer_norm_eps",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
}


VOCAB_FILE = "vocab.txt"     # a model's own vocabulary (config.vocab_file set) travels with it
#: config keys of folders saved by earlier versions that AlbefConfig no longer has, and the value
#: at which each describes plain ALBEF (None: any value; it only chose a from-scratch init, which
#: loaded weights replace). docs/experiments.md, "Options removed from the library".
RETIRED_KEYS = {"init": None, "pos_embed_init": None, "patch_embed": "linear", "conv_stem_extra": 0}


def _has_type(value, kind) -> bool:
    """Whether a config value read from JSON or YAML is of a field's type: an int is no bool,
    a float may be written as an int; a type not checked here passes."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is type(None):
        return value is None
    return True


@dataclass
class AlbefConfig:
    """Every size of the model. The defaults are ALBEF-base (ViT-B/16 + BERT-base, fusion at 6)."""

    image_size: int = 256
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate_size: int = 3072
    fusion_layer: int = 6          # layers [0, fusion_layer) are text-only, the rest cross-attend
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    embed_dim: int = 256           # ITC projection size
    temp: float = 0.07             # initial ITC temperature (a learnable parameter)
    momentum: bool = True          # build the momentum (EMA) copies used for distillation
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    text_layer_norm_eps: float = 1e-12
    max_length: int | None = 25    # default tokenizer truncation, counts [CLS]
    vocab_file: str | None = None  # None: bert-base-uncased from the pinned vocab package

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("vision_width/text_width must be multiples of vision_heads/text_heads")
        if not 0 <= self.fusion_layer < self.text_layers:
            raise ValueError(f"fusion_layer must be in [0, {self.text_layers}), got {self.fusion_layer}")

    @classmethod
    def from_dict(cls, d: dict) -> "AlbefConfig":
        """Our field names or ALBEF's (`image_res`, `hidden_size`, `encoder_width`, ...);
        unknown keys are an error, not silently ignored."""
        known = {f.name for f in fields(cls)}
        hints = typing.get_type_hints(cls)
        out: dict = {}
        for key, value in d.items():
            name = _ALIASES.get(key, key)
            if name not in known:
                raise ValueError(f"unknown ALBEF config key {key!r}; known: {', '.join(sorted(known))}")
            allowed = typing.get_args(hints[name]) or (hints[name],)   # `int | None` -> (int, NoneType)
            if not any(_has_type(value, t) for t in allowed):
                names = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
                raise ValueError(f"ALBEF config key {key!r} must be {names}, got {value!r}")
            out[name] = value
        return cls(**out)

    def to_dict(self) -> dict:
        return asdict(self)

    def patch_embedding(self) -> dict:
        """How pixels become patch tokens, as `VisionTransformer` keyword arguments: ViT's
        patchify (one patch_size x patch_size convolution), ALBEF's. A variant with another
        stem overrides this (the demo's `albef_demo`)."""
        return {"patch_size": self.patch_size}

    def bert_config(self) -> BertConfig:
        """The transformers config that its BERT building blocks read."""
        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            intermediate_size=self.text_intermediate_size,
            hidden_act="gelu",
            hidden_dropout_prob=self.hidden_dropout,
            attention_probs_dropout_prob=self.attention_dropout,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.text_layer_norm_eps,
            pad_token_id=0,
        )


#: the size the tests build (`build_sized("albef", "tiny")`, no dropout: batched and per-row
#: passes are compared in train mode); "base" is AlbefConfig's defaults, ALBEF-base
TINY = dict(
    image_size=32, patch_size=8, vision_width=32, vision_depth=2, vision_heads=2, text_width=32, text_layers=4,
    text_heads=4, text_intermediate_size=64, fusion_layer=2, embed_dim=16, hidden_dropout=0.0, attention_dropout=0.0,
)
#: the CPU benchmarks' size: big enough for timings to mean something, small enough for 2 cores
SMALL = dict(
    image_size=128, patch_size=16, vision_width=256, vision_depth=4, vision_heads=4, text_width=256, text_layers=6,
    text_heads=4, text_intermediate_size=1024, fusion_layer=3, momentum=False,
)


def build_vision_encoder(cfg: AlbefConfig) -> VisionTransformer:
    """timm ViT with a class token, no head, LayerNorm eps 1e-6, exact GELU: ALBEF's key layout;
    the patch embedding is `cfg.patch_embedding()`."""
    return VisionTransformer(
        img_size=cfg.image_size,
        embed_dim=cfg.vision_width,
        depth=cfg.vision_depth,
        num_heads=cfg.vision_heads,
        mlp_ratio=cfg.vision_mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        global_pool="token",
        class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        **cfg.patch_embedding(),
    )


class AlbefSelfAttention(nn.Module):
    """Multi-head attention with BERT's parameter names (`query`, `key`, `value`).

    Keys/values may come from image embeddings `[B, S, Dv]` that are projected once and then
    gathered with `kv_index` for the N text rows. When the probabilities are asked for they are
    computed explicitly (pre-dropout, in the graph); otherwise the fused SDPA kernel runs.
    """

    def __init__(self, width: int, heads: int, kv_width: int, dropout: float):
        super().__init__()
        self.num_heads = heads
        self.head_dim = width // heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.dropout = nn.Dropout(dropout)
        #: the keys/values of the image embeddings last projected, kept while
        #: `AlbefModel.reusing_image_projections` is active
        self.kv_memo = ImageMemo()

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)  # [*, H, L, d]

    def _image_keys(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """[B, S, Dv] -> keys, values [B, H, S, d]; within `reusing_image_projections`, projected
        once per image-embeddings tensor and reused by every later pass that reads it."""
        return self.kv_memo.get(kv, lambda: (self._heads(self.key(kv)), self._heads(self.value(kv))))

    def forward(
        self,
        hidden: Tensor,                    # [N, T, D]
        mask: Tensor | None = None,        # [N, 1, 1, S] additive
        kv: Tensor | None = None,          # [B, S, Dv]; None = self-attention
        kv_index: Tensor | None = None,    # [N] row -> kv row
        need_probs: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        q = self._heads(self.query(hidden))  # [N, H, T, d]
        if kv is None:
            k, v = self._heads(self.key(hidden)), self._heads(self.value(hidden))  # [N, H, T, d]
        else:
            k, v = self._image_keys(kv)  # [B, H, S, d]
        if kv_index is not None:
            k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)  # [N, H, S, d]
        probs = None
        if need_probs:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # [N, H, T, S]
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            context = self.dropout(probs) @ v
        else:
            drop = self.dropout.p if self.training else 0.0
            mask = None if mask is None else mask.to(q.dtype)  # CUDA kernels want the query's dtype (autocast)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        context = context.transpose(1, 2).reshape(*hidden.shape[:2], -1)  # [N, T, D]
        return context, probs


class AlbefAttention(nn.Module):
    """Attention + post-norm residual (`.self`, `.output` as in BERT)."""

    def __init__(self, bert: BertConfig, kv_width: int):
        super().__init__()
        self.self = AlbefSelfAttention(
            bert.hidden_size, bert.num_attention_heads, kv_width, bert.attention_probs_dropout_prob
        )
        self.output = BertSelfOutput(bert)

    def forward(self, hidden: Tensor, mask=None, kv=None, kv_index=None, need_probs=False):
        context, probs = self.self(hidden, mask, kv, kv_index, need_probs)
        return self.output(context, hidden), probs


class AlbefLayer(nn.Module):
    """One BERT layer; from `fusion_layer` on it cross-attends to the image between
    self-attention and the feed-forward block."""

    def __init__(self, bert: BertConfig, vision_width: int, cross: bool):
        super().__init__()
        self.attention = AlbefAttention(bert, bert.hidden_size)
        if cross:
            self.crossattention = AlbefAttention(bert, vision_width)
        self.has_cross_attention = cross
        self.intermediate = BertIntermediate(bert)
        self.output = BertOutput(bert)

    def forward(self, hidden, mask, image_embeds=None, image_index=None, capture=False):
        hidden, _ = self.attention(hidden, mask)
        probs = None
        if self.has_cross_attention:
            if image_embeds is None:
                raise ValueError("a cross-attention layer needs image embeddings")
            hidden, probs = self.crossattention(hidden, None, image_embeds, image_index, capture)
        return self.output(self.intermediate(hidden), hidden), probs


class AlbefEncoder(nn.Module):
    def __init__(self, bert: BertConfig, vision_width: int, fusion_layer: int):
        super().__init__()
        self.layer = nn.ModuleList(
            AlbefLayer(bert, vision_width, cross=i >= fusion_layer) for i in range(bert.num_hidden_layers)
        )


class AlbefBert(nn.Module):
    """`BertModel(add_pooling_layer=False)` with ALBEF's text / fusion / multimodal modes."""

    def __init__(self, bert: BertConfig, vision_width: int, fusion_layer: int):
        super().__init__()
        self.embeddings = BertEmbeddings(bert)
        self.encoder = AlbefEncoder(bert, vision_width, fusion_layer)

    def run(
        self,
        hidden: Tensor,                   # [N, T, D]
        attention_mask: Tensor,           # [N, T], 1 = token
        layers: range,
        image_embeds: Tensor | None = None,
        image_index: Tensor | None = None,
        capture_blocks: tuple[int, ...] = (),  # absolute layer indices whose cross-attention to return
    ) -> tuple[Tensor, list[Tensor]]:
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0  # [N, 1, 1, T]
        captured: dict[int, Tensor] = {}
        for i in layers:
            hidden, probs = self.encoder.layer[i](hidden, mask, image_embeds, image_index, i in capture_blocks)
            if i in capture_blocks:
                captured[i] = probs
        return hidden, [captured[i] for i in capture_blocks]


class AlbefTextEncoder(nn.Module):
    """`BertForMaskedLM` layout: `.bert` plus the MLM head `.cls`, decoder tied to the word embeddings."""

    def __init__(self, cfg: AlbefConfig):
        super().__init__()
        bert = cfg.bert_config()
        self.num_layers = cfg.text_layers
        self.fusion_layer = cfg.fusion_layer
        self.bert = AlbefBert(bert, cfg.vision_width, cfg.fusion_layer)
        self.cls = BertOnlyMLMHead(bert)
        self.apply(partial(_init_bert, std=bert.initializer_range))
        predictions = self.cls.predictions
        predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        predictions.decoder.bias = predictions.bias

    def text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Text mode, layers [0, fusion_layer): [N, T] -> [N, T, D]."""
        hidden = self.bert.embeddings(input_ids=input_ids)
        return self.bert.run(hidden, attention_mask, range(self.fusion_layer))[0]

    def fusion(
        self,
        text_embeds: Tensor,
        attention_mask: Tensor,
        image_embeds: Tensor,
        image_index: Tensor | None,
        capture_layer: int | Sequence[int] | None = None,
    ) -> FusionOutput:
        """Fusion mode, layers [fusion_layer, L), on the output of `text`."""
        layers = capture_layers(capture_layer, self.num_layers - self.fusion_layer)
        hidden, probs = self.bert.run(
            text_embeds, attention_mask, range(self.fusion_layer, self.num_layers),
            image_embeds, image_index, tuple(self.fusion_layer + x for x in layers),
        )
        return captured_output(capture_layer, hidden, probs)

    def mlm_logits(self, input_ids, attention_mask, image_embeds, image_index, positions=None) -> Tensor:
        """Multimodal pass over all layers + MLM head: [N, T] -> [N, T, vocab], or [K, vocab] for
        the K True entries of `positions` [N, T] (row-major): the head is per token, so only the
        masked tokens need its vocab-wide matmul."""
        hidden = self.bert.embeddings(input_ids=input_ids)
        hidden = self.bert.run(hidden, attention_mask, range(self.num_layers), image_embeds, image_index)[0]
        return self.cls(hidden if positions is None else hidden[positions])


def _init_bert(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, 0.02), LayerNorm 1/0) for a model trained from scratch."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _Towers(NamedTuple):
    visual: VisionTransformer
    text: AlbefTextEncoder
    vision_proj: nn.Linear
    text_proj: nn.Linear


def _check_pairing(image_index: Tensor | None, n_rows: int, image_embeds: Tensor) -> None:
    if image_index is None and n_rows != image_embeds.shape[0]:
        raise ValueError(f"{n_rows} text rows and {image_embeds.shape[0]} images: pass image_index to pair them")


class _AlbefTowers(abc.ABC):
    """The protocol over one set of towers; the online model and its momentum twin share it."""

    config: AlbefConfig
    _tokenizer: AlbefTokenizer | None = None

    @abc.abstractmethod
    def _towers(self) -> _Towers:
        """The online towers, or the momentum copies."""

    @property
    def tokenizer(self) -> AlbefTokenizer:
        """Built on first use, so that a model can be built and loaded without a vocabulary."""
        if self._tokenizer is None:
            self._tokenizer = AlbefTokenizer(self.config.vocab_file)
        return self._tokenizer

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def patch_grid(self) -> tuple[int, int]:
        g = self.config.image_size // self.config.patch_size
        return (g, g)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def max_text_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def num_cross_attention_layers(self) -> int:
        return self.config.text_layers - self.config.fusion_layer

    @property
    def num_cross_attention_heads(self) -> int:
        return self.config.text_heads

    @property
    def default_capture_layers(self) -> tuple[int, ...]:
        """The 3rd cross-attention layer (BERT block 8 of ALBEF-base), which ALBEF's
        Grounding.py, SelfEQ and the HIST paper use; the last one for models with fewer
        cross-attention layers."""
        return (min(2, self.num_cross_attention_layers - 1),)

    @property
    def mask_tokens(self) -> MaskTokens:
        tok = self.tokenizer
        return MaskTokens(tok.mask_token_id, tok.vocab_size, (tok.pad_token_id, tok.cls_token_id))

    def tokenize(self, texts: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """`[CLS] wordpieces` (no [SEP]) after `pre_caption`; `max_length` defaults to the config's."""
        return self.tokenizer(texts, max_length if max_length is not None else self.config.max_length)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, 1+P, Dv]."""
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"ALBEF is configured for {size}x{size} images, got {tuple(pixel_values.shape[-2:])}")
        return self._towers().visual.forward_features(pixel_values)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._towers().text.text(input_ids, attention_mask)

    def image_features(self, image_embeds: Tensor) -> Tensor:
        return F.normalize(self._towers().vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, text_embeds: Tensor) -> Tensor:
        return F.normalize(self._towers().text_proj(text_embeds[:, 0]), dim=-1)

    def fuse(
        self,
        text_embeds: Tensor,
        attention_mask: Tensor,
        image_embeds: Tensor,
        image_index: Tensor | None = None,
        capture_layer: int | Sequence[int] | None = None,
    ) -> FusionOutput:
        """See the protocol. `image_index=None` pairs row i with image i. The captured
        probabilities are `[N, heads, T, 1+P]`; index 2 with fusion_layer 6 is ALBEF's block 8."""
        _check_pairing(image_index, text_embeds.shape[0], image_embeds)
        return self._towers().text.fusion(text_embeds, attention_mask, image_embeds, image_index, capture_layer)

    def fuse_rows(
        self,
        rows: TextRows,
        image_embeds: Tensor,
        *,
        text_embeds: Tensor | None = None,
        capture_layer: int | Sequence[int] | None = None,
    ) -> FusionOutput:
        """See the protocol: the fusion layers continue `text_embeds` (encoded here if not given)."""
        if text_embeds is None:
            text_embeds = self.encode_text(rows.input_ids, rows.attention_mask)
        return self.fuse(text_embeds, rows.attention_mask, image_embeds, rows.image_index, capture_layer)

    def mlm_logits(
        self, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor, image_index: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Full multimodal pass + MLM head: input_ids [N, T] (already masked by the caller),
        image_embeds [B, 1+P, Dv] gathered by image_index [N] -> logits [N, T, vocab]; with
        `positions` (bool [N, T]) only those tokens' logits, [K, vocab] in row-major order."""
        _check_pairing(image_index, input_ids.shape[0], image_embeds)
        return self._towers().text.mlm_logits(input_ids, attention_mask, image_embeds, image_index, positions)


#: the paper's ALBEF evaluation map (ALBEF's Grounding.py, SelfEQ): the 3rd cross-attention layer
#: (BERT block 8 of ALBEF-base), head mean; the last layer on a model with fewer (`EvalMap.fitted`)
PAPER_EVAL_MAP = EvalMap(layers=(2,), head=None, combine="mean")


@register("albef", sizes={"tiny": TINY, "small": SMALL, "base": {}}, derives_vocab=True, eval_map=PAPER_EVAL_MAP)
class AlbefModel(_AlbefTowers, VisionLanguageBackbone, ContrastiveModel, MatchingModel, MaskedLanguageModel):
    """ALBEF with ITC projections, ITM head, learnable `temp` and (optionally) momentum copies.

    Beyond the protocol: `fuse` (fusion of encoded text), `itm_logits_from` and
    `itc_similarity` (ALBEF's evaluation entry points). Official `.pth` files load through
    `albef_checkpoint`.
    """

    config_class: type[AlbefConfig] = AlbefConfig

    def __init__(self, config: AlbefConfig | None = None, tokenizer: AlbefTokenizer | None = None):
        super().__init__()
        self.config = cfg = config or self.config_class()
        self._tokenizer = tokenizer
        self.visual_encoder = build_vision_encoder(cfg)
        self.text_encoder = AlbefTextEncoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        if cfg.momentum:
            for name in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
                twin = copy.deepcopy(getattr(self, name)).requires_grad_(False)
                setattr(self, f"{name}_m", twin)

    def _towers(self) -> _Towers:
        return _Towers(self.visual_encoder, self.text_encoder, self.vision_proj, self.text_proj)

    def itm_logits(self, fused: FusionOutput) -> Tensor:
        return self.itm_head(fused.last_hidden_state[:, 0])  # [N, 2]

    def grounding_score(self, fused: FusionOutput) -> Tensor:
        return self.itm_logits(fused)[:, 1]  # [N] the match logit (the paper's GradCAM score)

    def momentum_twin(self) -> "AlbefMomentumTwin | None":
        return AlbefMomentumTwin(self) if self.config.momentum else None

    def _momentum_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        if not self.config.momentum:
            raise RuntimeError("this ALBEF model was built with momentum=False")
        online, ema = [], []
        for name in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
            online += list(getattr(self, name).parameters())
            ema += list(getattr(self, f"{name}_m").parameters())
        return online, ema

    @torch.no_grad()
    def update_momentum(self, momentum: float) -> None:
        online, ema = self._momentum_pairs()
        torch._foreach_mul_(ema, momentum)
        torch._foreach_add_(ema, online, alpha=1.0 - momentum)

    @torch.no_grad()
    def copy_params_to_momentum(self) -> None:
        """Momentum copies := online weights (ALBEF's `copy_params`)."""
        online, ema = self._momentum_pairs()
        torch._foreach_copy_(ema, online)

    @contextlib.contextmanager
    def reusing_image_projections(self) -> Iterator[None]:
        """Within: each cross-attention layer (online and momentum) projects an image-embeddings
        tensor to keys/values once and every later pass on the same tensor reuses them: one HIST
        step fuses the same images for ITM (every text kind), MLM and GradCAM."""
        with contextlib.ExitStack() as scopes:
            for m in self.modules():
                if isinstance(m, AlbefSelfAttention):
                    scopes.enter_context(m.kv_memo.active())
            yield

    # --- reference-parity entry points (ALBEF's evaluation code, as functions) ---

    def itm_logits_from(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM logits of text i against image i: [B, 3, H, W], [B, T], [B, T] -> [B, 2]."""
        text = self.encode_text(input_ids, attention_mask)
        return self.itm_logits(self.fuse(text, attention_mask, self.encode_image(pixel_values), None))

    def itc_similarity(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, *, divide_by_temp: bool = False
    ) -> Tensor:
        """[B_img, B_txt] cosine similarity of the normalised ITC features, as ALBEF's retrieval
        evaluation ranks with (`image_feat @ text_feat.t()`); `divide_by_temp=True` gives the
        training logits `sim_i2t = image_feat @ text_feat.t() / temp`."""
        image = self.image_features(self.encode_image(pixel_values))
        text = self.text_features(self.encode_text(input_ids, attention_mask))
        sim = image @ text.t()
        return sim / self.temp if divide_by_temp else sim

    # --- checkpoints (the folder layout is the protocol's save_pretrained / from_pretrained) ---

    @classmethod
    def from_config(cls, config: dict, *, root: Path | None = None) -> "AlbefModel":
        """`AlbefConfig` fields or ALBEF's names; a `vocab_file` is looked up in `root` first
        (where `config_dict` copied it), else taken as the path it is."""
        config = dict(config)
        if root is not None:
            config = without_retired_keys(config, cls.config_class, Path(root))
            if config.get("vocab_file") is not None:
                config["vocab_file"] = stored_vocab(Path(root), config["vocab_file"])
        return cls(cls.config_class.from_dict(config))

    def config_dict(self, directory: Path | None = None) -> dict:
        return stored_config(self.config, directory)


class AlbefMomentumTwin(_AlbefTowers, MomentumTwin, MaskedLanguageModel):
    """The towers' methods on the momentum copies (`*_m`). Every call runs without autograd.
    ALBEF has no momentum ITM head."""

    def __init__(self, model: AlbefModel):
        super().__init__()
        self.config = model.config
        self._tokenizer = model._tokenizer
        self.visual_encoder_m = model.visual_encoder_m
        self.text_encoder_m = model.text_encoder_m
        self.vision_proj_m = model.vision_proj_m
        self.text_proj_m = model.text_proj_m

    def _towers(self) -> _Towers:
        return _Towers(self.visual_encoder_m, self.text_encoder_m, self.vision_proj_m, self.text_proj_m)


for _name in ("encode_image", "encode_text", "image_features", "text_features", "fuse", "mlm_logits"):
    setattr(AlbefMomentumTwin, _name, torch.no_grad()(getattr(_AlbefTowers, _name)))


def stored_config(config: AlbefConfig, directory: Path | None) -> dict:
    """`config` as a dict; with `directory`, the model's own vocabulary is copied there and
    named relative to it, so a copied or moved folder tokenizes exactly as the original did."""
    out = config.to_dict()
    if directory is not None and config.vocab_file is not None:
        source = Path(config.vocab_file)
        if not source.is_file():
            raise FileNotFoundError(f"the model's vocabulary file is gone: {source}")
        atomic_write_bytes(Path(directory) / VOCAB_FILE, source.read_bytes())
        out["vocab_file"] = VOCAB_FILE
    return out


def without_retired_keys(config: dict, config_class: type[AlbefConfig], directory: Path) -> dict:
    """A saved folder's config without the `RETIRED_KEYS` that `config_class` lacks; a retired
    key at a value other than plain ALBEF's is an error naming it."""
    known = {f.name for f in fields(config_class)}
    out = dict(config)
    for key, plain in RETIRED_KEYS.items():
        if key in out and key not in known:
            value = out.pop(key)
            if plain is not None and value != plain:
                raise ValueError(f"{directory}: saved with {key}={value!r}, which ALBEF does not have (a model with "
                                 "the demo's convolutional stem loads as the albef_demo backbone of hist_vlm.demo)")
    return out


def stored_vocab(directory: Path, stored: str) -> str:
    """The vocabulary a saved model names: inside its folder (what config_dict writes), else
    the path as stored (folders written before vocabularies were copied)."""
    for candidate in (directory / stored, Path(stored)):
        if candidate.is_file():
            return str(candidate.resolve())
    raise FileNotFoundError(f"{directory}: its vocabulary {stored!r} is neither in the folder nor at that path")

