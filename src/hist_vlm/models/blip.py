"""BLIP (Hugging Face `BlipForImageTextRetrieval`) behind the backbone protocol.

BLIP has ONE BERT stack whose layers all carry a cross-attention block: run without image
states it is the unimodal text encoder (ITC), run with them it is the fusion encoder (ITM).
So fusion re-reads the token ids (`fuse_rows`) instead of continuing `encode_text`'s output.
HF's retrieval forward drops the text cross-attentions, so the forward is decomposed here and
the chosen layer's probabilities are taken with a forward hook (docs/reference_code.md).

Layer/head indices are 0-based. The paper's "9th cross-attention layer" is layer 8; its
evaluation maps "L8H10" and "L9H10" (1-based, Table 7) are (layer 7, head 9) and (layer 8, head 9).

ITM token: original BLIP/LAVIS replace [CLS] by [ENC] for the image-grounded encoder; HF's
forward does not. We follow the original (id of "[ENC]" in the tokenizer, else bos + 1 =
30523 for the released 30524-token vocabularies); `use_enc_token=False` gives HF's behaviour.

Language modelling (the LM term of BLIP's ITC + ITM + LM objective): transformers has no class
with all three heads, so the captioning decoder comes from a second folder. A transformers
`BlipForImageTextRetrieval` folder loads with `model.params.decoder` = a
`BlipForConditionalGeneration` folder of the same family (blip-itm-large-coco with
blip-image-captioning-large: ViT-L/16 + BERT-base, 30524 tokens); its `text_decoder` is kept, its
vision tower dropped (the decoder reads the retrieval model's image tokens), and the model is a
`BlipCaptioner` (a `CaptioningModel`). Without a decoder it is a plain `BlipBackbone`, and
`loss.mlm_weight > 0` is a start-up error (`losses.hist.check_backbone`), never a silent 0.
A `BlipCaptioner` saves its decoder with it (`save_pretrained`) and reloads as a captioner.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipTextConfig,
    BlipVisionConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

from hist_vlm.batch import TextRows
from hist_vlm.models.base import (
    CaptioningModel,
    ContrastiveModel,
    FusionOutput,
    MatchingModel,
    VisionLanguageBackbone,
    mean_log_likelihood,
    captured_output,
    capture_layers,
)
from hist_vlm.models.registry import EvalMap, ForeignFormat, register, transformers_model_type
from hist_vlm.models.tokenization import default_vocab_file

#: BLIP's training text length (blip_retrieval / blip_pretrain)
DEFAULT_MAX_LENGTH = 35
#: the paper's BLIP evaluation map: mean of L8H10 and L9H10 (1-based) =
#: gradcam_maps(..., layers=PAPER_EVAL_LAYERS, head=PAPER_EVAL_HEAD, combine="mean"); declared as
#: the backbone's evaluation map (`register(eval_map=...)`, fitted to smaller models)
PAPER_EVAL_LAYERS = (7, 8)
PAPER_EVAL_HEAD = 9


def blip_tokenizer() -> BertTokenizerFast:
    """BLIP's tokenizer rebuilt from the bert-base-uncased vocab: [DEC] as bos (30522), [ENC] (30523)."""
    tok = BertTokenizerFast(vocab=default_vocab_file(), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def blip_config(size: str = "tiny", *, image_size: int | None = None) -> BlipConfig:
    """Random-init configs: `tiny` (tests, width 32, 3 text layers) or `base` (ViT-B/16, BERT-base)."""
    if size == "tiny":  # no dropout: the tests compare batched and per-row passes in train mode
        text = BlipTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        vision = BlipVisionConfig(
            hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size or 32, patch_size=8,
        )
        return BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_text_hidden_size=16)
    if size == "base":
        vision = BlipVisionConfig(image_size=image_size or 384, patch_size=16)
        return BlipConfig(text_config=BlipTextConfig().to_dict(), vision_config=vision.to_dict())
    raise ValueError(f"unknown BLIP size {size!r} (choose tiny or base)")


def _is_transformers_blip(path: Path) -> bool:
    """A folder that transformers' `BlipForImageTextRetrieval.save_pretrained` wrote."""
    return transformers_model_type(path) == "blip"


#: the `model.params` a transformers BLIP folder takes (the folder stores none of them)
_FOREIGN_KEYS = ("decoder", "use_enc_token", "temp")


def decoder_folder(value: Any, checkpoint: Path) -> Path:
    """The folder `model.params.decoder` names: an absolute path as is; a relative one from the
    working directory (as `model.checkpoint` is read), else beside `checkpoint` (a sibling
    folder). A ValueError, one line, when it is not a path or names no folder."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError(f"model.params.decoder={value!r}: give the path of a transformers "
                         "BlipForConditionalGeneration folder (its text decoder is the LM head)")
    given = Path(value).expanduser()
    tried = [given] if given.is_absolute() else [given, Path(checkpoint).parent / given]
    for folder in tried:
        if folder.is_dir():
            return folder
    raise ValueError(f"model.params.decoder: no folder {' or '.join(map(str, dict.fromkeys(tried)))} "
                     "(a transformers BlipForConditionalGeneration folder, e.g. blip-image-captioning-large)")


def _load_transformers(path: Path, params: dict, image_size: int | None, verbose: bool) -> "BlipBackbone":
    """`model.params`: `decoder` (the BlipForConditionalGeneration folder whose text decoder
    gives the LM term; without it no language term), `use_enc_token`, `temp`."""
    unknown = sorted(set(params) - set(_FOREIGN_KEYS))
    if unknown:
        raise ValueError(f"model.params.{unknown[0]} is not a setting of a transformers BLIP folder "
                         f"(known: {', '.join(_FOREIGN_KEYS)})")
    params = dict(params)
    decoder = params.pop("decoder", None)
    decoder_path = decoder_folder(decoder, path) if decoder is not None else None
    model = BlipBackbone.from_transformers(path, decoder_path=decoder_path, **params).eval()
    if verbose:
        print(f"loaded BLIP {path}" + (f" with the captioning decoder of {decoder_path}" if decoder_path else
                                       " without a captioning decoder (no LM term; model.params.decoder adds one)"),
              file=sys.stderr)
    return model


_BUILD_KEYS = ("size", "image_size", "transformers", "with_decoder", "decoder", "use_enc_token", "temp", "tokenizer")


def check_decoder(retrieval: BlipForImageTextRetrieval, decoder: BlipTextLMHeadModel) -> None:
    """ValueError (one line) when `decoder` cannot serve `retrieval`: it must share the
    vocabulary (one tokenizer feeds both) and cross-attend to image tokens of the retrieval
    model's vision width (it reads the retrieval model's `encode_image`)."""
    text, vision, dec = retrieval.config.text_config, retrieval.config.vision_config, decoder.config
    if not dec.is_decoder or not getattr(dec, "encoder_hidden_size", None):
        raise ValueError("the BLIP captioning decoder has no cross-attention (is_decoder=False)")
    if dec.vocab_size != text.vocab_size:
        raise ValueError(f"the BLIP captioning decoder has a {dec.vocab_size}-token vocabulary, the retrieval "
                         f"model {text.vocab_size}: give the decoder of the same BLIP release")
    if dec.encoder_hidden_size != vision.hidden_size:
        raise ValueError(f"the BLIP captioning decoder reads {dec.encoder_hidden_size}-wide image tokens, the "
                         f"retrieval model's ViT gives {vision.hidden_size}: pair ViT sizes (large with large, "
                         "e.g. blip-itm-large-coco with blip-image-captioning-large; base with base)")


@register(
    "blip",
    sizes={"tiny": {"size": "tiny", "with_decoder": True}, "base": {"size": "base", "with_decoder": True}},
    foreign=(ForeignFormat("a transformers BlipForImageTextRetrieval folder (LM: model.params.decoder)",
                           _is_transformers_blip, _load_transformers),),
    eval_map=EvalMap(layers=PAPER_EVAL_LAYERS, head=PAPER_EVAL_HEAD, combine="mean"),
)
class BlipBackbone(VisionLanguageBackbone, ContrastiveModel, MatchingModel):
    """BLIP ITC/ITM implementing the protocol; with a captioning decoder it is a `BlipCaptioner`."""

    def __new__(cls, retrieval=None, tokenizer=None, decoder=None, **kwargs):
        # the class says whether there is a language head: isinstance(model, CaptioningModel)
        if cls is BlipBackbone and decoder is not None:
            cls = BlipCaptioner
        return super().__new__(cls)

    def __init__(
        self,
        retrieval: BlipForImageTextRetrieval,
        tokenizer: PreTrainedTokenizerBase | None = None,
        decoder: BlipTextLMHeadModel | None = None,
        *,
        use_enc_token: bool = True,
        temp: float = 0.07,
    ) -> None:
        super().__init__()
        self.retrieval = retrieval
        self.decoder = decoder
        self.tokenizer = tokenizer if tokenizer is not None else blip_tokenizer()
        text_cfg = retrieval.config.text_config
        if not text_cfg.is_decoder:
            raise ValueError("BLIP text config has is_decoder=False: its layers have no cross-attention")
        if len(self.tokenizer) > text_cfg.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the BLIP text model only {text_cfg.vocab_size}"
            )
        if decoder is not None:
            check_decoder(retrieval, decoder)
        self.enc_token_id = self._enc_token_id(text_cfg) if use_enc_token else None
        # BLIP keeps its ITC temperature in the model (learnable, like ALBEF); HF drops it.
        self.temp = nn.Parameter(torch.tensor(float(temp)))

    def _enc_token_id(self, text_cfg: BlipTextConfig) -> int | None:
        tok_id = self.tokenizer.convert_tokens_to_ids("[ENC]")
        if isinstance(tok_id, int) and tok_id != self.tokenizer.unk_token_id:
            return tok_id
        return text_cfg.bos_token_id + 1 if text_cfg.bos_token_id + 1 < text_cfg.vocab_size else None

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
        return self.retrieval.config.text_config.max_position_embeddings

    @property
    def num_cross_attention_layers(self) -> int:
        return self.retrieval.config.text_config.num_hidden_layers

    @property
    def num_cross_attention_heads(self) -> int:
        return self.retrieval.config.text_config.num_attention_heads

    @property
    def default_capture_layers(self) -> tuple[int, ...]:
        """The paper's addition-loss layer: the 9th cross-attention layer (0-based 8)."""
        return (min(8, self.num_cross_attention_layers - 1),)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: dict[str, Any], *, root: Path | None = None) -> "BlipBackbone":
        """Random init from a build config: `size` ("tiny" | "base", with optional `image_size`)
        or `transformers` (a `BlipConfig` dict); `with_decoder` (a captioning decoder for the LM
        loss, `decoder` = its `BlipTextConfig` dict, default the text config), `use_enc_token`,
        `temp`; `tokenizer`: a folder relative to `root` holding the tokenizer (else BLIP's own)."""
        unknown = sorted(set(config) - set(_BUILD_KEYS))
        if unknown:
            raise ValueError(f"unknown BLIP config key {unknown[0]!r}; known: {', '.join(sorted(_BUILD_KEYS))}")
        if isinstance(config.get("decoder"), (str, Path)):
            raise ValueError(f"decoder={config['decoder']!r} is a folder: it is read with a transformers BLIP "
                             "model.checkpoint; a model built from scratch takes with_decoder: true")
        if config.get("transformers") is not None:
            hf = BlipConfig.from_dict(config["transformers"])
        else:
            hf = blip_config(config.get("size", "tiny"), image_size=config.get("image_size"))
        retrieval = BlipForImageTextRetrieval(copy.deepcopy(hf))  # first: the random init order of old runs
        decoder = None
        if config.get("decoder") is not None:
            decoder = BlipTextLMHeadModel(BlipTextConfig.from_dict(config["decoder"]))
        elif config.get("with_decoder", False):
            # HF mutates the config it is given (docs/reference_code.md): build from a copy
            decoder = BlipForConditionalGeneration(copy.deepcopy(hf)).text_decoder
        tokenizer = None
        if config.get("tokenizer") is not None:
            tokenizer = BertTokenizerFast.from_pretrained(Path(root or ".") / config["tokenizer"])
        return cls(retrieval, tokenizer, decoder,
                   use_enc_token=config.get("use_enc_token", True), temp=config.get("temp", 0.07))

    def config_dict(self, directory: Path | None = None) -> dict[str, Any]:
        """The transformers configs; with `directory`, the tokenizer is saved there too."""
        config: dict[str, Any] = {
            "transformers": self.retrieval.config.to_dict(),
            "decoder": self.decoder.config.to_dict() if self.decoder is not None else None,
            "use_enc_token": self.enc_token_id is not None,
        }
        if directory is not None:
            self.tokenizer.save_pretrained(directory)
            config["tokenizer"] = "."
        return config

    @classmethod
    def from_transformers(
        cls, path: str | Path, *, decoder_path: str | Path | None = None, **kwargs
    ) -> "BlipBackbone":
        """Load a `BlipForImageTextRetrieval` folder (transformers' save_pretrained format) in
        float32 and, for the LM loss, the text decoder of a `BlipForConditionalGeneration` folder
        (then a `BlipCaptioner`). The captioning checkpoint's vision tower is dropped: the decoder
        reads the retrieval model's image tokens, so it must be of the same size (`check_decoder`).
        The retrieval folder's tokenizer is used when present. A folder lacking the weights it
        is named for (a captioning folder as the retrieval model, or the reverse) is an error,
        never a model with randomly initialised heads."""
        path = Path(path)
        for p in (path, decoder_path):
            if p is not None and not (Path(p) / "config.json").is_file():
                raise FileNotFoundError(f"not a BLIP checkpoint directory (no config.json): {p}")
        _check_architecture(path, "BlipForImageTextRetrieval", "model.checkpoint")
        if decoder_path is not None:  # checked before any weights are read
            if transformers_model_type(Path(decoder_path)) != "blip":
                raise ValueError(f"{decoder_path} is not a transformers BLIP folder (config.json model_type "
                                 f"{transformers_model_type(Path(decoder_path))!r}, not 'blip')")
            _check_architecture(Path(decoder_path), "BlipForConditionalGeneration", "model.params.decoder")
        retrieval, info = BlipForImageTextRetrieval.from_pretrained(path, dtype=torch.float32,
                                                                    output_loading_info=True)
        _require_weights(path, "BlipForImageTextRetrieval", info["missing_keys"], "", "ITC/ITM")
        decoder = None
        if decoder_path is not None:
            captioner, info = BlipForConditionalGeneration.from_pretrained(decoder_path, dtype=torch.float32,
                                                                           output_loading_info=True)
            _require_weights(Path(decoder_path), "BlipForConditionalGeneration", info["missing_keys"],
                             "text_decoder.", "text decoder")
            decoder = captioner.text_decoder
            del captioner  # its ViT is not used
        has_tok = any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt"))
        tokenizer = BertTokenizerFast.from_pretrained(path) if has_tok else None
        return cls(retrieval, tokenizer, decoder, **kwargs)

    # ---------------------------------------------------------------- protocol
    def tokenize(self, texts: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(
            [t.lower().strip() for t in texts],
            padding="longest",
            truncation=True,
            max_length=max_length or DEFAULT_MAX_LENGTH,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return self.retrieval.vision_model(pixel_values=pixel_values).last_hidden_state  # [B, 1+P, Dv]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # without encoder_hidden_states every cross-attention block is skipped: unimodal BERT
        return self.retrieval.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def image_features(self, image_embeds: Tensor) -> Tensor:
        return F.normalize(self.retrieval.vision_proj(image_embeds[:, 0]), dim=-1)  # [B, E]

    def text_features(self, text_embeds: Tensor) -> Tensor:
        return F.normalize(self.retrieval.text_proj(text_embeds[:, 0]), dim=-1)  # [N, E]

    def fuse_rows(
        self,
        rows: TextRows,
        image_embeds: Tensor,
        *,
        text_embeds: Tensor | None = None,
        capture_layer: int | Sequence[int] | None = None,
    ) -> FusionOutput:
        """Image-grounded encoding of the rows; `text_embeds` is not needed (see module doc)."""
        ids = rows.input_ids
        if self.enc_token_id is not None:
            ids = ids.clone()
            ids[:, 0] = self.enc_token_id
        layers = capture_layers(capture_layer, self.num_cross_attention_layers)
        captured: dict[int, Tensor] = {}
        handles = []
        for layer in layers:
            attn = self.retrieval.text_encoder.encoder.layer[layer].crossattention.self

            def keep_first(_mod, _inp, out, layer=layer) -> None:  # must return None (docs/reference_code.md)
                captured.setdefault(layer, out[1])  # [N, heads, T, 1+P] softmax, pre-dropout; the
                # first call only: checkpoint recomputation fires the hook again

            handles.append(attn.register_forward_hook(keep_first))
        try:
            out = self.retrieval.text_encoder(
                input_ids=ids,
                attention_mask=rows.attention_mask,
                encoder_hidden_states=image_embeds[rows.image_index],  # [N, 1+P, Dv]
            )
        finally:
            for handle in handles:
                handle.remove()
        return captured_output(capture_layer, out.last_hidden_state, [captured[x] for x in layers])

    def itm_logits(self, fused: FusionOutput) -> Tensor:
        return self.retrieval.itm_head(fused.last_hidden_state[:, 0])  # [N, 2]

    def grounding_score(self, fused: FusionOutput) -> Tensor:
        return self.itm_logits(fused)[:, 1]  # [N] the match logit (the paper's GradCAM score)



def _check_architecture(path: Path, expected: str, role: str) -> None:
    """A ValueError when the folder's config.json names its architectures and `expected` is not
    among them (cheap: before any weights are read; folders without the field pass)."""
    try:
        names = json.loads((path / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(names, list) and names and expected not in names:
        raise ValueError(f"{role}: {path} holds a {', '.join(map(str, names))}, not a {expected} (the retrieval "
                         "folder is model.checkpoint, the captioning folder model.params.decoder)")


def _require_weights(path: Path, kind: str, missing: Sequence[str], prefix: str, what: str) -> None:
    """A ValueError naming one of the `missing` weights under `prefix` that a `kind` folder has."""
    lacking = sorted(k for k in missing if k.startswith(prefix))
    if lacking:
        raise ValueError(f"{path} is not a {kind} checkpoint: {len(lacking)} {what} weights missing "
                         f"(e.g. {lacking[0]})")


class BlipCaptioner(BlipBackbone, CaptioningModel):
    """BLIP with its captioning decoder: the LM loss of BLIP's pretraining (ITC + ITM + LM).
    Built with `with_decoder: true`, or loaded from a retrieval folder with `decoder_path`
    (`model.params.decoder`); `save_pretrained` stores the decoder, `from_pretrained` restores it."""

    def _decoder_ids(self, rows: TextRows) -> Tensor:
        """[N, T] the rows' ids with [CLS] replaced by [DEC] (BLIP's decoder prompt)."""
        ids = rows.input_ids.clone()
        ids[:, 0] = self.decoder.config.bos_token_id
        return ids

    def _decoder_logits(self, rows: TextRows, image_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """(the decoder's ids [N, T], the logits that predict tokens 1.. [N, T-1, V])."""
        ids = self._decoder_ids(rows)
        logits = self.decoder(input_ids=ids, attention_mask=rows.attention_mask,
                              encoder_hidden_states=image_embeds[rows.image_index]).logits  # [N, T, V]
        return ids, logits[:, :-1]

    def lm_token_losses(self, rows: TextRows, image_embeds: Tensor) -> tuple[Tensor, Tensor]:
        """Next-token CE of the tokens after [DEC] with the decoder's label smoothing, as
        transformers' own decoder loss: ([N, T-1], [N, T-1] the real tokens)."""
        ids, logits = self._decoder_logits(rows, image_embeds)
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none",
                                 label_smoothing=self.decoder.label_smoothing)
        return losses, rows.attention_mask[:, 1:]

    def text_log_likelihood(self, rows: TextRows, image_embeds: Tensor) -> Tensor:
        """[N] mean log p of each row's tokens after [DEC] (no label smoothing)."""
        ids, logits = self._decoder_logits(rows, image_embeds)
        return mean_log_likelihood(logits, ids[:, 1:], rows.attention_mask[:, 1:])
