"""LLaVA (transformers' `LlavaForConditionalGeneration`: a CLIP-style vision tower whose patch
features are projected into a decoder-only LM) behind the backbone protocol, with optional LoRA
adapters on the LM. docs/llava.md has the long version and the reasons.

What maps to what (K image tokens, P patches, T text tokens, L = the whole decoder sequence):
  encode_image      the projected image tokens the LM reads, [B, K, D] (K = P, or 1+P with
                    the "full" feature strategy): transformers' own `get_image_features`.
  fuse_rows         the decoder over [prefix ; image ; suffix ; text], the prompt split at its
                    `<image>`: all but the last prompt token once per image (a key/value cache),
                    then each row's last prompt token and text; `text_embeds` is ignored.
  grounding_score   the text's summed log-likelihood given image and prompt (`FusionOutput.score`).
  capture           the decoder self-attention of the row positions [N, heads, 1+T, L] in the
                    captured layers; `capture_block` is the T positions that predict the text x
                    the P patch columns.
  lm_token_losses, text_log_likelihood   next-token LM of the text after the prompt (CaptioningModel).
No ITC, no ITM, no momentum twin.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AttentionInterface,
    AutoTokenizer,
    BertTokenizerFast,
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_layers import GradientCheckpointingLayer

from hist_vlm.batch import TextRows
from hist_vlm.models.base import (CaptioningModel, FusionOutput, ImageMemo, VisionLanguageBackbone, captured_output,
                                  capture_layers)
from hist_vlm.models.layout import CONFIG_FILE, WEIGHTS_FILE, load_weights, write_model_folder
from hist_vlm.models.registry import EvalMap, ForeignFormat, load_backbone, register, transformers_model_type
from hist_vlm.models.tokenization import default_vocab_file

IMAGE_TOKEN = "<image>"
#: LLaVA-1.5's conversation format (llava-hf model cards); the text follows "ASSISTANT:"
DEFAULT_PROMPT = f"USER: {IMAGE_TOKEN}\nWhat is in the image? ASSISTANT:"
#: the LM's attention and MLP projections (Llama, Mistral, Qwen2 names), as LLaVA's LoRA recipe
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(LORA_TARGETS)}
_BUILD_KEYS = ("size", "transformers", "image_size", "tokenizer", "prompt", "lora", "base", "freeze_vision")
_LOAD_KEYS = ("prompt", "lora", "freeze_vision")   # what a transformers folder does not store
#: the attention implementation of a capturing pass (registered below)
CAPTURE_ATTENTION = "hist_vlm_capture"
#: id(attention module) -> where its probabilities go, during a capturing pass only
_CAPTURING: dict[int, list[Tensor]] = {}


def _check_keys(given: Mapping[str, Any], known: Sequence[str], what: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} key {unknown[0]!r}; known: {', '.join(sorted(known))}")


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """Softmax precision: float32 for half precision (as transformers' eager attention), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def llava_tokenizer() -> BertTokenizerFast:
    """The tiny model's tokenizer (nothing is downloaded): bert-base-uncased WordPiece + `<image>`."""
    tok = BertTokenizerFast(vocab=default_vocab_file())
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def llava_config(tokenizer: PreTrainedTokenizerBase, size: str = "tiny", *, image_size: int | None = None) -> LlavaConfig:
    """Random-init configs, LLaVA-1.5's feature choice (second-to-last vision layer, CLS dropped):
    `tiny` (tests, CPU): CLIP vision (width 32, 2 layers, 32 px, patch 8: a 4x4 grid), Llama LM
    (width 32, 4 layers, 4 query heads sharing 2 key/value heads, so GQA's repeat_kv runs);
    `base` (benchmarks): TinyLLaVA's scale, CLIP ViT-L/14 at 336 px (24x24 patches) and a
    TinyLlama-1.1B-shaped decoder (22 layers, width 2048, 32 query heads on 4 key/value heads)."""
    if size == "tiny":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=image_size or 32, patch_size=8)
        text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                           attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id)
    elif size == "base":
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=image_size or 336, patch_size=14,
                                  projection_dim=768)
        text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048,
                           pad_token_id=tokenizer.pad_token_id)
    else:
        raise ValueError(f"unknown LLaVA size {size!r} (choose tiny or base, or load a checkpoint)")
    patches = (vision.image_size // vision.patch_size) ** 2
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                       image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=patches,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def _capturing_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-interface signature. A captured layer (in `_CAPTURING`) computes
    eager attention and keeps its softmax probabilities; every other layer is SDPA, as without
    capture.
    query [N, H, Q, d], key/value [N, H_kv, K, d], Q <= K (Q < K: the queries continue a
    cache); mask: bool [N, 1, Q, K] (True = attend), additive, or None = causal with the
    queries the last Q of the K positions (SDPA's `is_causal` skip; transformers aligns it so)."""
    store = _CAPTURING.get(id(module))
    if store is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError("attention capture supports plain scaled dot-product decoder attention (no softcap, "
                         "no position bias)")
    groups = query.shape[1] // key.shape[1]                      # GQA: query heads per key/value head
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # [N, H, K, d]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)) * scale             # [N, H, Q, K]
    if attention_mask is None and kwargs.get("is_causal", getattr(module, "is_causal", True)):
        l_q, l_k = scores.shape[-2:]
        attention_mask = torch.ones(l_q, l_k, dtype=torch.bool, device=scores.device).tril(l_k - l_q)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min) \
            if attention_mask.dtype == torch.bool else scores + attention_mask
    probs = scores.softmax(-1, dtype=_at_least_float32(scores.dtype)).to(query.dtype)  # [N, H, Q, K]
    store.append(probs)
    out = F.dropout(probs, p=dropout, training=module.training) @ value  # [N, H, Q, d]
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(CAPTURE_ATTENTION, _capturing_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _lora_settings(lora: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The `lora` build setting with its defaults filled in (None: no LoRA)."""
    if lora is None:
        return None
    if not isinstance(lora, Mapping):
        raise ValueError(f"lora must be a mapping of {', '.join(LORA_DEFAULTS)} or null, got {type(lora).__name__}")
    _check_keys(lora, tuple(LORA_DEFAULTS), "LLaVA lora")
    settings = {**LORA_DEFAULTS, **lora}
    settings["target_modules"] = list(settings["target_modules"])
    return settings


def _inject_lora(language_model: nn.Module, settings: dict[str, Any]) -> None:
    """LoRA adapters (peft) on `settings["target_modules"]` of the LM, in place."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'hist-vlm[lora]'") from None
    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                        target_modules=settings["target_modules"])
    inject_adapter_in_model(config, language_model)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _load_transformers(path: Path, params: dict, image_size: int | None, verbose: bool) -> "LlavaBackbone":
    _check_keys(params, _LOAD_KEYS, "LLaVA load")
    return LlavaBackbone.from_transformers(path, **params).eval()


@register(
    "llava",
    sizes={"tiny": {"size": "tiny"}, "base": {"size": "base"}},
    foreign=(ForeignFormat("a transformers LlavaForConditionalGeneration folder",
                           lambda path: transformers_model_type(path) == "llava", _load_transformers),),
    eval_map=lambda model: EvalMap(model.default_capture_layers),
)
class LlavaBackbone(VisionLanguageBackbone, CaptioningModel):
    """LLaVA implementing the protocol (module docstring). `base`: the folder the weights came
    from; with LoRA on, checkpoints then hold only what trains (docs/llava.md)."""

    def __init__(
        self,
        llava: LlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        *,
        prompt: str = DEFAULT_PROMPT,
        lora: Mapping[str, Any] | None = None,
        base: str | None = None,
        freeze_vision: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(prompt, str) or prompt.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"the LLaVA prompt must contain {IMAGE_TOKEN} exactly once, got {prompt!r}")
        config = llava.config
        if len(tokenizer) > config.text_config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LM only {config.text_config.vocab_size}")
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if ids.count(config.image_token_id) != 1:
            raise ValueError(f"the tokenizer does not map {IMAGE_TOKEN} to the model's image token id "
                             f"{config.image_token_id}")
        if tokenizer.pad_token_id is None:  # Llama tokenizers have none; padded tokens are masked anyway
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        self.llava, self.tokenizer = llava, tokenizer
        self.prompt, self.base, self.freeze_vision = prompt, base, bool(freeze_vision)
        self.lora = _lora_settings(lora)
        cut = ids.index(config.image_token_id)
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        # the prompt around the image, as transformers' processor tokenizes it: [N, *] once expanded
        self.register_buffer("prefix_ids", torch.tensor(bos + ids[:cut], dtype=torch.long), persistent=False)
        self.register_buffer("suffix_ids", torch.tensor(ids[cut + 1:], dtype=torch.long), persistent=False)
        if self.lora is not None:
            _inject_lora(self.language_model, self.lora)
        for name, p in self.named_parameters():
            p.requires_grad_(self._trains(name))
        #: what this configuration trains: what an adapter-only checkpoint must hold
        self._trained = frozenset(name for name, p in self.named_parameters() if p.requires_grad)
        #: the shared pass's per-layer keys/values, kept while `reusing_image_projections` is active
        self._shared_memo = ImageMemo()

    def _trains(self, name: str) -> bool:
        """Whether parameter `name` trains: the vision tower unless frozen; with LoRA only the
        adapters and the projector (LLaVA's own fine-tuning recipe), else the whole LM."""
        if name.startswith("llava.model.vision_tower."):
            return not self.freeze_vision
        return self.lora is None or "lora_" in name or name.startswith("llava.model.multi_modal_projector.")

    @property
    def language_model(self) -> nn.Module:
        """The decoder without its head (`LlamaModel` or another transformers decoder)."""
        return self.llava.model.language_model

    # ---------------------------------------------------------------- sizes
    @property
    def image_size(self) -> int:
        return self.llava.config.vision_config.image_size

    @property
    def patch_grid(self) -> tuple[int, int]:
        g = self.image_size // self.llava.config.vision_config.patch_size
        return (g, g)

    @property
    def num_image_tokens(self) -> int:
        """K: the P patch tokens, plus the CLS token with the "full" feature strategy."""
        patches = self.patch_grid[0] * self.patch_grid[1]
        return patches + 1 if self.llava.config.vision_feature_select_strategy == "full" else patches

    @property
    def _text_start(self) -> int:
        """The position of the first text token: after prefix, image and suffix."""
        return len(self.prefix_ids) + self.num_image_tokens + len(self.suffix_ids)

    @property
    def max_text_length(self) -> int:
        return self.llava.config.text_config.max_position_embeddings - self._text_start

    @property
    def num_cross_attention_layers(self) -> int:
        return self.llava.config.text_config.num_hidden_layers

    @property
    def num_cross_attention_heads(self) -> int:
        return self.llava.config.text_config.num_attention_heads

    @property
    def default_capture_layers(self) -> tuple[int, ...]:
        """The middle decoder layer (16 of 32 in LLaVA-1.5-7B, 2 of 4 tiny): mid-depth layers of
        LLaVA-style models carry the most localised text-to-image attention, and the layers
        above it make the score depend on it (docs/llava.md)."""
        return (self.num_cross_attention_layers // 2,)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: dict[str, Any], *, root: Path | None = None) -> "LlavaBackbone":
        """A model from a build config: `size` ("tiny" | "base", random init) or `transformers` (a
        `LlavaConfig` dict, random init), with `tokenizer` (a folder relative to `root`; else the
        tiny one); or `base` (a folder whose weights to start from: a transformers folder or one
        of ours); `image_size` (checked, or the tiny size's), `prompt`, `lora`, `freeze_vision`."""
        _check_keys(config, _BUILD_KEYS, "LLaVA config")
        root = Path(root or ".")
        settings = {k: config[k] for k in _LOAD_KEYS if k in config}
        size = config.get("image_size")
        if config.get("base") is not None:
            clash = sorted({"size", "transformers", "tokenizer"} & set(config))
            if clash:
                raise ValueError(f"LLaVA config: base and {clash[0]} exclude each other (the base folder has both)")
            base = (root / config["base"]).resolve()
            llava, tokenizer = cls._base_weights(base)
            settings["base"] = str(base)
        else:
            tokenizer = llava_tokenizer() if config.get("tokenizer") is None \
                else AutoTokenizer.from_pretrained(root / config["tokenizer"])
            if config.get("transformers") is not None:
                llava = LlavaForConditionalGeneration(LlavaConfig.from_dict(copy.deepcopy(config["transformers"])))
            else:
                llava = LlavaForConditionalGeneration(llava_config(tokenizer, config.get("size", "tiny"),
                                                                   image_size=size))
        if size is not None and size != llava.config.vision_config.image_size:
            raise ValueError(f"image_size={size} but the LLaVA model is for {llava.config.vision_config.image_size} px")
        return cls(llava, tokenizer, **settings)

    @staticmethod
    def _base_weights(path: Path) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase]:
        """The LLaVA model and tokenizer of a base folder, without adapters of its own."""
        if not path.exists():
            raise FileNotFoundError(f"LLaVA base model {path} not found (the checkpoint holds only what trains on it)")
        model = load_backbone(path, "llava")
        if model.lora is not None:
            raise ValueError(f"{path}: a LLaVA base model must have no LoRA adapters of its own")
        return model.llava, model.tokenizer

    @classmethod
    def from_transformers(cls, path: str | Path, **settings: Any) -> "LlavaBackbone":
        """Load a folder `LlavaForConditionalGeneration.save_pretrained` and the tokenizer's
        `save_pretrained` wrote (e.g. a local copy of llava-hf/llava-1.5-7b-hf), in float32.
        `settings`: `prompt`, `lora`, `freeze_vision`. The folder becomes the model's `base`."""
        path = Path(path).resolve()
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"not a LLaVA checkpoint directory (no config.json): {path}")
        if not _has_tokenizer(path):
            raise FileNotFoundError(f"{path} has no tokenizer: save the processor's tokenizer into it")
        llava, info = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(f"{path} is not a complete LlavaForConditionalGeneration checkpoint: {len(missing)} "
                             f"weights missing (e.g. {missing[0]})")
        return cls(llava, AutoTokenizer.from_pretrained(path), base=str(path), **settings)

    @property
    def _adapter_only(self) -> bool:
        """Checkpoints hold only what trains: LoRA on a base folder that holds the rest."""
        return self.base is not None and self.lora is not None

    def config_dict(self, directory: Path | None = None) -> dict[str, Any]:
        """Adapter-only: the base folder and the settings. Else the transformers config; with
        `directory`, the tokenizer is saved there too."""
        settings = {"prompt": self.prompt, "lora": self.lora, "freeze_vision": self.freeze_vision}
        if self._adapter_only:
            return {"base": self.base, **settings}
        config: dict[str, Any] = {"transformers": self.llava.config.to_dict(), **settings}
        if directory is not None:
            self.tokenizer.save_pretrained(directory)
            config["tokenizer"] = "."
        return config

    def _saved_keys(self) -> set[str]:
        """An adapter-only checkpoint's tensors: what the configuration trains and whatever else
        was set to train (a parameter frozen later, `optim.freeze`, is still saved)."""
        return set(self._trained) | {name for name, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory: str | Path) -> None:
        """The common layout; adapter-only (LoRA on a base folder): config.json names the base
        and model.safetensors holds only `_saved_keys`."""
        if not self._adapter_only:
            return super().save_pretrained(directory)
        keys = self._saved_keys()
        write_model_folder(self, directory, {"backbone": self.name, "config": self.config_dict(Path(directory))},
                           tensors={k: v for k, v in self.state_dict().items() if k in keys})

    def load_saved_weights(self, directory: str | Path) -> None:
        """Every key (the common layout), or, adapter-only, exactly the saved tensors: each must
        be a tensor of this model, and each `_saved_keys` tensor must be there (strict both ways)."""
        if not self._adapter_only:
            return super().load_saved_weights(directory)
        load_weights(self, Path(directory) / WEIGHTS_FILE, self._saved_keys())

    # ---------------------------------------------------------------- protocol
    def tokenize(self, texts: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """The text only (the prompt is the pass's own), no special tokens, right-padded."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, padding="longest", padding_side="right",
                             truncation=True, max_length=max_length or self.max_text_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, K, D]: the vision tower's features at the configured layer and
        strategy through the projector (transformers' `get_image_features`)."""
        features = self.llava.model.get_image_features(pixel_values=pixel_values).pooler_output
        return torch.stack(features)

    @contextlib.contextmanager
    def _capture(self, layers: tuple[int, ...]) -> Iterator[list[list[Tensor]]]:
        """Within: decoder `layers` compute eager attention and keep their probabilities in the
        yielded stores (in `layers`' order); the others stay SDPA. A captured layer is not
        gradient-checkpointed: its backward replay would run SDPA, not the recorded eager graph."""
        stores = [[] for _ in layers]
        if not layers:
            yield stores
            return
        config = self.language_model.config
        before = config._attn_implementation
        captured = [self.language_model.layers[x] for x in layers]
        checkpointed = [m for m in captured if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        _CAPTURING.update((id(m.self_attn), store) for m, store in zip(captured, stores))
        config._attn_implementation = CAPTURE_ATTENTION
        for layer in checkpointed:
            layer.gradient_checkpointing = False
        try:
            yield stores
        finally:
            config._attn_implementation = before
            for layer in checkpointed:
                layer.gradient_checkpointing = True
            for layer in captured:
                del _CAPTURING[id(layer.self_attn)]

    @property
    def _checkpointing(self) -> bool:
        """Whether this pass checkpoints decoder layers: transformers then drops their cache
        (`GradientCheckpointingLayer`), so the shared pass cannot run and the full one does."""
        lm = self.language_model
        return lm.training and torch.is_grad_enabled() and any(
            isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing for layer in lm.layers)

    def _shared_cache(self, shared: Tensor, inverse: Tensor, source: Tensor) -> DynamicCache:
        """The decoder's keys/values of the shared positions `shared` [U, S, D], one pass per
        image, in the graph, gathered to the rows by `inverse` [N]: every layer's [N, heads_kv,
        S, d]. A new cache per pass, since the row pass appends its own positions to it; filled
        layer by layer (a generator), so one layer's gathered copy exists at a time. Within
        `reusing_image_projections`, the shared pass of the image embeddings `source` (and
        grad/autocast mode) runs once and later passes on the same tensor reuse its keys/values."""
        def shared_pass() -> list[tuple[Tensor, Tensor]]:  # [U, heads_kv, S, d] each
            cache = self.language_model(inputs_embeds=shared, use_cache=True).cache
            return [(layer.keys, layer.values) for layer in cache.layers]

        layers = self._shared_memo.get(source, shared_pass)
        return DynamicCache(((keys[inverse], values[inverse]) for keys, values in layers),
                            config=self.language_model.config)

    @contextlib.contextmanager
    def reusing_image_projections(self) -> Iterator[None]:
        """Within: the shared positions (prompt and image) of every image in an image-embeddings
        tensor run through the decoder once, and every pass on the same tensor (one HIST step's
        LM, rank and GradCAM passes) reads their keys/values."""
        with self._shared_memo.active():
            yield

    def _decode(self, rows: TextRows, image_embeds: Tensor, layers: tuple[int, ...] = ()
                ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The decoder over [prefix ; image_embeds[rows.image_index] ; suffix ; text], L positions
        per row. Its first L-1-T positions (prefix, image, suffix but its last token: S) depend
        on the image only, so they run once per image and the rows read their keys/values from a
        cache; each row runs its own Q = 1+T query positions (the last prompt token, which
        predicts the first text token and whose attention row is part of the map, and the text).
        Under gradient checkpointing every row runs all of them (Q = L).
        -> (last hidden state [N, Q, D], the logits that predict the text tokens [N, T, V], the
        captured probabilities [N, heads, Q, L] of `layers`)."""
        n, t = rows.input_ids.shape
        embed = self.language_model.get_input_embeddings()
        if not self._shared_memo.on:
            images, inverse = torch.unique(rows.image_index, return_inverse=True)  # [U], [N]: the images the rows use
        else:  # every image, once for all the passes that share them
            images, inverse = torch.arange(len(image_embeds), device=rows.image_index.device), rows.image_index
        u = len(images)
        fixed = torch.cat([embed(self.prefix_ids).expand(u, -1, -1), image_embeds[images].to(embed.weight.dtype),
                           embed(self.suffix_ids).expand(u, -1, -1)], 1)  # [U, L-T, D]
        text = embed(rows.input_ids)  # [N, T, D]
        if self._checkpointing:
            cache, queries = None, torch.cat([fixed[inverse], text], 1)  # [N, L, D]
        else:
            cache = self._shared_cache(fixed[:, :-1], inverse, image_embeds)
            queries = torch.cat([fixed[inverse, -1:], text], 1)  # [N, 1+T, D]
        mask = torch.cat([rows.attention_mask.new_ones(n, self._text_start), rows.attention_mask], 1)  # [N, L]: keys
        with self._capture(layers) as stores:
            hidden = self.language_model(inputs_embeds=queries, attention_mask=mask, cache=cache,
                                         use_cache=cache is not None).last_hidden_state  # [N, Q, D]
        logits = self.llava.lm_head(hidden[:, -1 - t: -1])  # query Q-1-T+j predicts text token j
        return hidden, logits, [store[0] for store in stores]

    @staticmethod
    def _token_log_probs(logits: Tensor, rows: TextRows) -> Tensor:
        """[N, T] log p of each text token (at least float32), 0 at padding."""
        logp = logits.to(_at_least_float32(logits.dtype)).log_softmax(-1)  # [N, T, V]
        logp = logp.gather(-1, rows.input_ids.unsqueeze(-1)).squeeze(-1)
        return logp * rows.attention_mask.to(logp.dtype)

    def fuse_rows(
        self,
        rows: TextRows,
        image_embeds: Tensor,
        *,
        text_embeds: Tensor | None = None,
        capture_layer: int | Sequence[int] | None = None,
    ) -> FusionOutput:
        """The decoder pass (`_decode`) with its score, the summed log-likelihood of each row's
        text. `last_hidden_state` is the row's own last 1+T positions [N, 1+T, D] (the last
        prompt token, the text). A capture is the decoder layer's self-attention of the pass's
        query positions [N, heads, Q, L]; its block is (the T positions predicting the text: row
        j <-> token j <-> mask column j, the P patch columns). The position after the last text
        token predicts nothing scored."""
        layers = capture_layers(capture_layer, self.num_cross_attention_layers)
        hidden, logits, probs = self._decode(rows, image_embeds, layers)
        t = rows.input_ids.shape[1]
        first = hidden.shape[1] - 1 - t  # the query position of the last prompt token: 0, or L-1-T
        image_end = len(self.prefix_ids) + self.num_image_tokens
        patches = self.patch_grid[0] * self.patch_grid[1]
        return captured_output(capture_layer, hidden[:, first:], probs, capture_mask=rows.attention_mask,
                               capture_block=(slice(first, first + t), slice(image_end - patches, image_end)),
                               score=self._token_log_probs(logits, rows).sum(1))

    def grounding_score(self, fused: FusionOutput) -> Tensor:
        return fused.score  # [N] the text's log-likelihood given image and prompt

    def lm_token_losses(self, rows: TextRows, image_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """(-log p of each text token [N, T], the rows' attention_mask): next-token CE after the prompt."""
        return -self._token_log_probs(self._decode(rows, image_embeds)[1], rows), rows.attention_mask

    def text_log_likelihood(self, rows: TextRows, image_embeds: Tensor) -> Tensor:
        """[N] each row's mean log p of its text tokens."""
        logp = self._token_log_probs(self._decode(rows, image_embeds)[1], rows)
        return logp.sum(1) / rows.attention_mask.sum(1).clamp(min=1)
