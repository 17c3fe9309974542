"""BLIP-2's first stage (Hugging Face `Blip2ForImageTextRetrieval`: ViT + Q-Former with its ITC
and ITM heads) behind the backbone protocol. docs/blip2.md has the long version.

What maps to what (Q queries, T text tokens, P patches):
  encode_image    the ViT's tokens [B, 1+P, Dv] after its final LayerNorm (LAVIS' `ln_vision`),
                  image CLS first: `Blip2VisionEmbeddings` puts the class embedding at 0. These
                  are the keys the Q-Former cross-attends to, so a captured probability row is
                  over [CLS + P patches], as GradCAM expects (it drops column 0).
  image_features  ITC: the learned queries through the Q-Former against the image,
                  `vision_projection`, L2-normalised: [B, Q, E]. `losses.itc.similarity`
                  scores an image by its best query, as BLIP-2's ITC (and HF's forward) do.
  encode_text /   the Q-Former's text-only pass (query_length 0, no cross-attention);
  text_features   `text_projection` of token 0 ([CLS]), L2-normalised: [N, E].
  fuse_rows       ITM: [queries ; text] through the Q-Former, the queries cross-attending to
                  image_embeds[rows.image_index]. `text_embeds` is ignored: the fusion re-reads
                  the token ids (as BLIP's does). last_hidden_state is [N, Q+T, D], queries first.
  itm_logits      `itm_head` on every query position, averaged over the queries: [N, 2] (LAVIS, HF).

Cross-attention layers: the Q-Former layers with `layer_idx % cross_attention_frequency == 0`
(0, 2, ..., 10 of the 12 in the released model: 6 layers). `capture_layer` k is the k-th of
THOSE (0-based): Q-Former layer k * cross_attention_frequency.

GradCAM. Only the queries cross-attend to the image, and only the queries feed the ITM head; the
text reaches them through the shared self-attention. The map is therefore defined on the
QUERIES' cross-attention A [N, heads, Q, 1+P] (softmax, pre-dropout) of the captured layer:

    G = mean over heads and queries of ReLU(A_q * d s / d A_q),   s = the match logit.

`fuse_rows` returns A itself as the capture, with `FusionOutput.capture_mask` = ones [N, Q]: the
shared GradCAM (`losses.gradcam`) then averages over the queries instead of the text tokens, so
the map is exactly this definition, its gradient the true one (second order included), and the
"train" and "reference" recipes agree (every query is valid).

Left out: the momentum twin (BLIP-2 has none), MLM (none), and BLIP-2's image-grounded text
generation loss (ITG). ITG runs the Q-Former causally over the text (reading the queries) into
the Q-Former's LM head; transformers has no class with that head (`Blip2QFormerModel` is the bare
encoder with a bidirectional mask; `Blip2ForConditionalGeneration`'s LM is the stage-2 OPT/T5,
not ITG) and a `Blip2ForImageTextRetrieval` folder loads no LM-head weights, so an ITG term
would be a new, untrained head, not BLIP-2's. This backbone is therefore not a
`CaptioningModel`: `loss.mlm_weight > 0` is a start-up error, and `blip2_coco` sets it to 0.

Tokens: LAVIS' Q-Former tokenizer, bert-base-uncased + "[DEC]" as bos (30523 ids), "[CLS] ...
[SEP]", padding to the longest, truncation to 32 tokens (LAVIS `Blip2Qformer.max_txt_len`),
captions cleaned as LAVIS' `blip_caption` processor does.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BertTokenizerFast,
    PreTrainedTokenizerBase,
)

from hist_vlm.batch import TextRows
from hist_vlm.models.base import (ContrastiveModel, FusionOutput, MatchingModel, VisionLanguageBackbone, captured_output,
                                  capture_layers)
from hist_vlm.models.layout import CONFIG_FILE
from hist_vlm.models.registry import EvalMap, ForeignFormat, register, transformers_model_type
from hist_vlm.models.tokenization import default_vocab_file

#: LAVIS `Blip2Qformer.max_txt_len` (pretraining and its COCO retrieval fine-tuning)
DEFAULT_MAX_LENGTH = 32
#: BLIP-2's ITC temperature at initialisation (LAVIS `self.temp = 0.07`); HF's model has none
DEFAULT_TEMP = 0.07
_BUILD_KEYS = ("size", "image_size", "transformers", "tokenizer", "temp")
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def blip2_tokenizer() -> BertTokenizerFast:
    """LAVIS' Q-Former tokenizer rebuilt from the bert-base-uncased vocab: "[DEC]" as bos (30522)."""
    tok = BertTokenizerFast(vocab=default_vocab_file(), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def blip_caption(text: str) -> str:
    """LAVIS' `blip_caption` cleaning: lower-case, `.!"()*#:;~` to spaces, spaces collapsed."""
    return _SPACES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).strip()


def blip2_config(size: str = "tiny", *, image_size: int | None = None) -> Blip2Config:
    """Random-init configs: `tiny` (tests: 32 px, width 32, 6 Q-Former layers of which 3 cross-
    attend, 4 queries, no dropout) or `base` (the released blip2-itm-vit-g: EVA ViT-g/14 at 224 px,
    a 12-layer BERT-base Q-Former cross-attending every 2nd layer, 32 queries, E = 256). The ViT
    is initialised with std 0.02 (transformers' default of 1e-10 only suits loading weights)."""
    vocab = len(blip2_tokenizer())
    if size == "tiny":  # no dropout: the tests compare batched and per-row passes in train mode
        vision = Blip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=image_size or 32, patch_size=8, initializer_range=0.02)
        qformer = Blip2QFormerConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
            cross_attention_frequency=2, use_qformer_text_input=True,
        )
        return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                           num_query_tokens=4, image_text_hidden_size=16)
    if size == "base":
        vision = Blip2VisionConfig(image_size=image_size or 224, initializer_range=0.02)
        qformer = Blip2QFormerConfig(vocab_size=vocab, use_qformer_text_input=True)
        return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict())
    raise ValueError(f"unknown BLIP-2 size {size!r} (choose tiny or base)")


def _is_transformers_blip2(path: Path) -> bool:
    """A folder that transformers' `save_pretrained` wrote for a BLIP-2 model (any head: loading
    then says when it is not the retrieval model)."""
    return transformers_model_type(path) == "blip-2"


def _load_transformers(path: Path, params: dict, image_size: int | None, verbose: bool) -> "Blip2Backbone":
    return Blip2Backbone.from_transformers(path, **params).eval()


def _capturing_forward(module: nn.Module, store: list[Tensor]):
    """A replacement `forward` for one Q-Former cross-attention (`Blip2QFormerMultiHeadAttention`):
    the eager computation of `transformers`' own (its SDPA path returns no probabilities), the
    softmax probabilities appended to `store` (the first call only)."""

    def forward(hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                **kwargs):
        n, q_len, _ = hidden_states.shape
        heads, width = module.num_attention_heads, module.attention_head_size
        query = module.query(hidden_states).view(n, q_len, heads, width).transpose(1, 2)          # [N, H, Q, d]
        key = module.key(encoder_hidden_states).view(n, -1, heads, width).transpose(1, 2)         # [N, H, K, d]
        value = module.value(encoder_hidden_states).view(n, -1, heads, width).transpose(1, 2)
        scores = query @ key.transpose(-1, -2) * module.scaling                                   # [N, H, Q, K]
        mask = encoder_attention_mask  # None for an all-ones image mask; else bool or additive
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
                else scores + mask
        probs = scores.softmax(-1)  # [N, H, Q, K]
        if not store:  # recomputation (gradient checkpointing) would call again
            store.append(probs)
        used = F.dropout(probs, p=module.attention_dropout, training=module.training)
        out = (used @ value).transpose(1, 2).reshape(n, q_len, heads * width)
        return out, probs

    return forward


@register(
    "blip2",
    sizes={"tiny": {"size": "tiny"}, "base": {"size": "base"}},
    foreign=(ForeignFormat("a transformers Blip2ForImageTextRetrieval folder", _is_transformers_blip2,
                           _load_transformers),),
    # the paper has no BLIP-2 map: evaluate where it trains (the middle cross-attention layer), head mean
    eval_map=lambda model: EvalMap(model.default_capture_layers),
)
class Blip2Backbone(VisionLanguageBackbone, ContrastiveModel, MatchingModel):
    """BLIP-2 Q-Former ITC/ITM implementing the protocol (module docstring)."""

    def __init__(
        self,
        retrieval: Blip2ForImageTextRetrieval,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        temp: float = DEFAULT_TEMP,
    ) -> None:
        super().__init__()
        self.retrieval = retrieval
        self.tokenizer = tokenizer if tokenizer is not None else blip2_tokenizer()
        qcfg = retrieval.config.qformer_config
        if not qcfg.use_qformer_text_input:
            raise ValueError("BLIP-2 Q-Former config has use_qformer_text_input=False: it has no text layers "
                             "(ITC text side, ITM); load a Blip2ForImageTextRetrieval checkpoint")
        if len(self.tokenizer) > qcfg.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but the Q-Former only {qcfg.vocab_size}")
        #: Q-Former layer index of each cross-attention layer (what `capture_layer` counts)
        self.cross_layers = tuple(i for i, layer in enumerate(retrieval.qformer.encoder.layer)
                                  if layer.has_cross_attention)
        # BLIP-2 learns its ITC temperature (LAVIS, init 0.07); HF's retrieval model drops it
        self.temp = nn.Parameter(torch.tensor(float(temp)))

    # ---------------------------------------------------------------- sizes
    @property
    def image_size(self) -> int:
        return self.retrieval.config.vision_config.image_size

    @property
    def patch_grid(self) -> tuple[int, int]:
        g = self.image_size // self.retrieval.config.vision_config.patch_size
        return (g, g)

    @property
    def embed_dim(self) -> int:
        return self.retrieval.config.image_text_hidden_size

    @property
    def max_text_length(self) -> int:
        return self.retrieval.config.qformer_config.max_position_embeddings  # queries take no positions

    @property
    def num_query_tokens(self) -> int:
        return self.retrieval.query_tokens.shape[1]

    @property
    def num_cross_attention_layers(self) -> int:
        return len(self.cross_layers)

    @property
    def num_cross_attention_heads(self) -> int:
        return self.retrieval.config.qformer_config.num_attention_heads

    @property
    def default_capture_layers(self) -> tuple[int, ...]:
        """The middle cross-attention layer: 3 of 6 (Q-Former layer 6) in the released model,
        1 of 3 in the tiny one. A guess (the paper has no BLIP-2 setting): ALBEF's paper layer is
        the middle one of its fusion stack, BLIP's three quarters up; mid-depth queries have
        read the text through several self-attention layers and still see a spatially sharp
        image. Every query feeds the ITM head, so even the last layer would get gradient; the
        middle one has layers above it as the protocol asks."""
        return (self.num_cross_attention_layers // 2,)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: dict[str, Any], *, root: Path | None = None) -> "Blip2Backbone":
        """Random init from a build config: `size` ("tiny" | "base", with optional `image_size`)
        or `transformers` (a `Blip2Config` dict); `temp` (initial ITC temperature); `tokenizer`:
        a folder relative to `root` holding the tokenizer (else LAVIS' own). The queries are
        drawn from N(0, initializer_range) as LAVIS does (HF zeroes them: identical queries)."""
        unknown = sorted(set(config) - set(_BUILD_KEYS))
        if unknown:
            raise ValueError(f"unknown BLIP-2 config key {unknown[0]!r}; known: {', '.join(sorted(_BUILD_KEYS))}")
        if config.get("transformers") is not None:
            hf = Blip2Config.from_dict(copy.deepcopy(config["transformers"]))
            size = config.get("image_size")
            if size is not None and size != hf.vision_config.image_size:
                raise ValueError(f"image_size={size} but the transformers config is for "
                                 f"{hf.vision_config.image_size} px")
        else:
            hf = blip2_config(config.get("size", "tiny"), image_size=config.get("image_size"))
        retrieval = Blip2ForImageTextRetrieval(hf)
        with torch.no_grad():
            retrieval.query_tokens.normal_(0.0, hf.qformer_config.initializer_range)
        tokenizer = None
        if config.get("tokenizer") is not None:
            tokenizer = BertTokenizerFast.from_pretrained(Path(root or ".") / config["tokenizer"])
        return cls(retrieval, tokenizer, temp=config.get("temp", DEFAULT_TEMP))

    def config_dict(self, directory: Path | None = None) -> dict[str, Any]:
        """The transformers config; with `directory`, the tokenizer is saved there too."""
        config: dict[str, Any] = {"transformers": self.retrieval.config.to_dict()}
        if directory is not None:
            self.tokenizer.save_pretrained(directory)
            config["tokenizer"] = "."
        return config

    @classmethod
    def from_transformers(cls, path: str | Path, **kwargs) -> "Blip2Backbone":
        """Load a `Blip2ForImageTextRetrieval` folder (transformers' save_pretrained format, e.g.
        a local copy of Salesforce/blip2-itm-vit-g) in float32. Its tokenizer is used when the
        folder has one. The folder stores no ITC temperature: `temp` (default 0.07) starts it.
        A BLIP-2 folder without the ITC/ITM heads (Blip2ForConditionalGeneration) is an error."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"not a BLIP-2 checkpoint directory (no config.json): {path}")
        retrieval, info = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=torch.float32,
                                                                     output_loading_info=True)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(f"{path} is not a Blip2ForImageTextRetrieval checkpoint: {len(missing)} weights "
                             f"missing (e.g. {missing[0]}); HIST needs the Q-Former's ITC and ITM heads")
        has_tok = any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt"))
        tokenizer = BertTokenizerFast.from_pretrained(path) if has_tok else None
        return cls(retrieval, tokenizer, **kwargs)

    # ---------------------------------------------------------------- protocol
    def tokenize(self, texts: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(
            [blip_caption(t) for t in texts],
            padding="longest",
            truncation=True,
            max_length=max_length or DEFAULT_MAX_LENGTH,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return self.retrieval.vision_model(pixel_values=pixel_values).last_hidden_state  # [B, 1+P, Dv]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        embeds = self.retrieval.embeddings(input_ids=input_ids)
        # query_length 0: text-only, no cross-attention (the Q-Former's unimodal text encoder)
        return self.retrieval.qformer(query_embeds=embeds, query_length=0,
                                      attention_mask=attention_mask).last_hidden_state  # [N, T, D]

    def _image_mask(self, image: Tensor) -> Tensor:
        return torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)

    def image_features(self, image_embeds: Tensor) -> Tensor:
        queries = self.retrieval.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.retrieval.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=self._image_mask(image_embeds)).last_hidden_state
        proj = self.retrieval.vision_projection
        return F.normalize(proj(out.to(proj.weight.dtype)), dim=-1)  # [B, Q, E]

    def text_features(self, text_embeds: Tensor) -> Tensor:
        proj = self.retrieval.text_projection
        return F.normalize(proj(text_embeds[:, 0].to(proj.weight.dtype)), dim=-1)  # [N, E]

    def fuse_rows(
        self,
        rows: TextRows,
        image_embeds: Tensor,
        *,
        text_embeds: Tensor | None = None,
        capture_layer: int | Sequence[int] | None = None,
    ) -> FusionOutput:
        """ITM pass of [queries ; text] against image_embeds[rows.image_index]; `text_embeds` is
        not needed. A captured layer gives the queries' cross-attention [N, heads, Q, 1+P], with
        `capture_mask` naming the Q queries (module docstring)."""
        n, q_len = len(rows), self.num_query_tokens
        queries = self.retrieval.query_tokens.expand(n, -1, -1)
        embeds = self.retrieval.embeddings(input_ids=rows.input_ids, query_embeds=queries)  # [N, Q+T, D]
        mask = torch.cat([rows.attention_mask.new_ones(n, q_len), rows.attention_mask], 1)
        image = image_embeds[rows.image_index]  # [N, 1+P, Dv]
        layers = capture_layers(capture_layer, self.num_cross_attention_layers)
        stores: list[list[Tensor]] = [[] for _ in layers]
        patched = []  # (module, the instance `forward` it had, if any)
        try:
            for layer, store in zip(layers, stores):
                attn = self.retrieval.qformer.encoder.layer[self.cross_layers[layer]].crossattention.attention
                patched.append((attn, attn.__dict__.get("forward")))
                attn.forward = _capturing_forward(attn, store)
            out = self.retrieval.qformer(query_embeds=embeds, query_length=q_len, attention_mask=mask,
                                         encoder_hidden_states=image, encoder_attention_mask=self._image_mask(image))
        finally:
            for attn, before in patched:
                if before is None:
                    del attn.forward  # back to the class's forward
                else:
                    attn.forward = before
        return captured_output(capture_layer, out.last_hidden_state, [store[0] for store in stores],
                               capture_mask=rows.attention_mask.new_ones(n, q_len))

    def itm_logits(self, fused: FusionOutput) -> Tensor:
        head = self.retrieval.itm_head
        queries = fused.last_hidden_state[:, : self.num_query_tokens]
        return head(queries.to(head.weight.dtype)).mean(1)  # [N, 2], mean over the queries

    def grounding_score(self, fused: FusionOutput) -> Tensor:
        return self.itm_logits(fused)[:, 1]  # [N] the match logit
