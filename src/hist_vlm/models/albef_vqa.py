"""ALBEF's VQA model on our ALBEF backbone: the question is encoded with the image by the text
and multimodal layers, and a BERT answer decoder (causal self-attention, cross-attention over
the question's multimodal states, LM head) generates the answer.

The decoder is initialised from the pretrained multimodal encoder as ALBEF does: decoder layer
j <- encoder layer fusion_layer + j (self-attention, cross-attention, feed-forward), its
embeddings and LM head <- the encoder's embeddings and MLM head; the encoder itself keeps
every layer and gives its MLM head away. Inference ranks a candidate answer list: the first
answer token's probability keeps the top k candidates, their whole-sequence log-likelihood
decides (docs/vqa.md: how this differs from ALBEF's released scorer).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hist_vlm.models.albef import (
    VOCAB_FILE,
    AlbefConfig,
    AlbefModel,
    AlbefTextEncoder,
    build_vision_encoder,
    stored_config,
    stored_vocab,
    without_retired_keys,
)
from hist_vlm.models.albef_checkpoint import LoadReport
from hist_vlm.models.layout import (CONFIG_FILE, WEIGHTS_FILE, built_from, load_weights, read_model_config,
                                    write_model_folder)
from hist_vlm.models.registry import register_head
from hist_vlm.batch import TextRows
from hist_vlm.models.tokenization import AlbefTokenizer, read_vocab_file, write_vocab_file

_TOWERS = ("visual_encoder", "text_encoder", "text_decoder")
_VOCAB_KEYS = ("word_embeddings.weight", "predictions.bias", "predictions.decoder.weight", "predictions.decoder.bias")
_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.*)")


@dataclass
class VqaModelConfig:
    """The answer decoder's depth (None: as many layers as the backbone's fusion part, 6 for
    ALBEF-base) and whether momentum copies exist for distillation."""

    decoder_layers: int | None = None
    distill: bool = True

    def depth(self, backbone: AlbefConfig) -> int:
        n = self.decoder_layers or backbone.text_layers - backbone.fusion_layer
        if n < 1:
            raise ValueError(f"decoder_layers must be at least 1, got {n}")
        return n


def decoder_config(cfg: AlbefConfig, layers: int) -> AlbefConfig:
    """The decoder's BERT: every layer cross-attends, to question states of the text width."""
    return dataclasses.replace(cfg, text_layers=layers, fusion_layer=0, vision_width=cfg.text_width,
                               vision_heads=cfg.text_heads, momentum=False)


@dataclass
class VqaLoadReport(LoadReport):
    """A LoadReport plus the decoder layers copied from the multimodal encoder (dst <- src)."""

    decoder_from: dict[int, int] = field(default_factory=dict)
    vocabulary_added: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [super().__str__()]
        pairs = ", ".join(f"{d}<-{s}" for d, s in self.decoder_from.items())
        lines.append(f"  answer decoder layers <- encoder layers: {pairs or 'none'}; embeddings and LM head <- "
                     "the encoder's embeddings and MLM head")
        if self.vocabulary_added:
            lines.append(f"  vocabulary: {len(self.vocabulary_added)} word(s) added: {' '.join(self.vocabulary_added)}")
        return "\n".join(lines)


class AlbefVqaModel(nn.Module):
    """Towers named as ALBEF's VQA model (`visual_encoder`, `text_encoder`, `text_decoder`, `*_m`)."""

    #: "backbone" in a saved folder's config.json: a VQA model, not a backbone
    name: ClassVar[str] = "albef_vqa"
    config_class: ClassVar[type[AlbefConfig]] = AlbefConfig

    def __init__(self, config: AlbefConfig, vqa: VqaModelConfig | None = None):
        super().__init__()
        self.config = config
        self.vqa_config = vqa = vqa or VqaModelConfig()
        self._tokenizer: AlbefTokenizer | None = None
        self.visual_encoder = build_vision_encoder(config)
        self.text_encoder = AlbefTextEncoder(config)
        del self.text_encoder.cls          # the encoder has no LM head; the decoder takes it over
        self.text_decoder = AlbefTextEncoder(decoder_config(config, vqa.depth(config)))
        if vqa.distill:
            for name in _TOWERS:
                setattr(self, f"{name}_m", copy.deepcopy(getattr(self, name)).requires_grad_(False))

    # --- text conventions ---

    @property
    def tokenizer(self) -> AlbefTokenizer:
        if self._tokenizer is None:
            self._tokenizer = AlbefTokenizer(self.config.vocab_file)
        return self._tokenizer

    def tokenize_question(self, texts: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """`[CLS] words` as the backbone was trained (no [SEP])."""
        return self.tokenizer(texts, max_length if max_length is not None else self.config.max_length)

    def tokenize_answers(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """`[CLS] words [SEP]`: the decoder starts from [CLS] and ends an answer with [SEP]
        (ALBEF's `eos`), so that ranking scores where an answer stops. [M, Ta]."""
        ids, mask = self.tokenizer(texts, None)
        ids, mask = F.pad(ids, (0, 1)), F.pad(mask, (0, 1))
        ends = mask.sum(1)                                   # first free slot of each row
        rows = torch.arange(ids.shape[0])
        ids[rows, ends], mask[rows, ends] = self.tokenizer.sep_token_id, 1
        return ids, mask

    # --- passes ---

    def _towers(self, momentum: bool) -> tuple[nn.Module, AlbefTextEncoder, AlbefTextEncoder]:
        suffix = "_m" if momentum else ""
        return tuple(getattr(self, f"{name}{suffix}") for name in _TOWERS)

    def question_states(self, pixel_values: Tensor, questions: TextRows, momentum: bool = False) -> Tensor:
        """[B, 3, H, W] + question rows [B, Tq] -> multimodal states [B, Tq, D] (all text layers)."""
        visual, encoder, _ = self._towers(momentum)
        image_embeds = visual.forward_features(pixel_values)                 # [B, 1+P, Dv]
        hidden = encoder.bert.embeddings(input_ids=questions.input_ids)
        return encoder.bert.run(hidden, questions.attention_mask, range(encoder.num_layers),
                                image_embeds, questions.image_index)[0]

    def decoder_logits(self, answers: TextRows, states: Tensor, state_mask: Tensor, momentum: bool = False) -> Tensor:
        """Answer rows [M, Ta] over question states [B, Tq, D] (row m reads question
        answers.image_index[m]) -> next-token logits [M, Ta, vocab]."""
        decoder = self._towers(momentum)[2]
        ids, mask = answers.input_ids, answers.attention_mask
        t = ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()        # [Ta, Ta]
        visible = causal[None] & mask[:, None, :].bool()                             # [M, Ta, Ta]
        dtype = decoder.bert.embeddings.word_embeddings.weight.dtype
        self_mask = (~visible)[:, None].to(dtype) * -10000.0                         # [M, 1, Ta, Ta]
        q_mask = state_mask.index_select(0, answers.image_index)                     # [M, Tq]
        cross_mask = (1.0 - q_mask[:, None, None, :].to(dtype)) * -10000.0           # [M, 1, 1, Tq]
        hidden = decoder.bert.embeddings(input_ids=ids)
        for layer in decoder.bert.encoder.layer:
            hidden, _ = layer.attention(hidden, self_mask)
            hidden, _ = layer.crossattention(hidden, cross_mask, states, answers.image_index)
            hidden = layer.output(layer.intermediate(hidden), hidden)
        return decoder.cls(hidden)

    @staticmethod
    def token_nll(logits: Tensor, answers: TextRows) -> Tensor:
        """Per-token negative log-likelihood of tokens 1.. (the [CLS] is given), pad = 0: [M, Ta-1]."""
        targets = answers.input_ids[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        return nll * answers.attention_mask[:, 1:]

    def answer_loss(self, pixel_values: Tensor, questions: TextRows, answers: TextRows, weights: Tensor,
                    alpha: float = 0.0) -> Tensor:
        """ALBEF's VQA loss: each answer's summed token NLL, mixed (alpha) with the cross-entropy
        against the momentum decoder's soft targets, weighted, summed, divided by B."""
        states = self.question_states(pixel_values, questions)
        logits = self.decoder_logits(answers, states, questions.attention_mask)          # [M, Ta, V]
        loss = self.token_nll(logits, answers).sum(1)                                    # [M]
        if alpha > 0:
            if not self.vqa_config.distill:
                raise RuntimeError("distillation needs the momentum copies (vqa distill=true)")
            with torch.no_grad():
                states_m = self.question_states(pixel_values, questions, momentum=True)
                soft = self.decoder_logits(answers, states_m, questions.attention_mask, momentum=True).softmax(-1)
            soft_ce = -(soft[:, :-1] * logits[:, :-1].log_softmax(-1)).sum(-1)           # [M, Ta-1]
            loss = (1 - alpha) * loss + alpha * (soft_ce * answers.attention_mask[:, 1:]).sum(1)
        return (weights * loss).sum() / pixel_values.shape[0]

    @torch.no_grad()
    def rank_answers(self, pixel_values: Tensor, questions: TextRows, candidates: TextRows, k: int = 128
                     ) -> tuple[Tensor, Tensor]:
        """Candidate indices [B, k'] best first, and their sequence log-likelihoods [B, k']
        (k' = min(k, #candidates)). `candidates` are `tokenize_answers` rows [C, Ta]."""
        states = self.question_states(pixel_values, questions)                           # [B, Tq, D]
        b, dev = states.shape[0], states.device
        start = TextRows(candidates.input_ids[:1, :1].expand(b, 1), torch.ones(b, 1, dtype=torch.long, device=dev),
                         torch.arange(b, device=dev))
        first = self.decoder_logits(start, states, questions.attention_mask)[:, 0].softmax(-1)   # [B, V]
        first = first.index_select(1, candidates.input_ids[:, 1])                        # [B, C]
        k = min(k, candidates.input_ids.shape[0])
        top = first.topk(k, dim=1).indices                                               # [B, k]
        flat = top.reshape(-1)
        rows = TextRows(candidates.input_ids.index_select(0, flat), candidates.attention_mask.index_select(0, flat),
                        torch.arange(b, device=dev).repeat_interleave(k))                # [B*k, Ta]
        logits = self.decoder_logits(rows, states, questions.attention_mask)
        loglik = -self.token_nll(logits, rows).sum(1).view(b, k)                         # [B, k]
        order = loglik.argsort(dim=1, descending=True)
        return top.gather(1, order), loglik.gather(1, order)

    # --- momentum ---

    def _momentum_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """(online, momentum) parameters, in the same order: what the EMA updates pair up."""
        if not self.vqa_config.distill:
            raise RuntimeError("this VQA model was built with distill=False (no momentum copies)")
        online = [p for n in _TOWERS for p in getattr(self, n).parameters()]
        ema = [p for n in _TOWERS for p in getattr(self, f"{n}_m").parameters()]
        return online, ema

    # the backbone's fused EMA / copy over these pairs
    update_momentum = AlbefModel.update_momentum
    copy_params_to_momentum = AlbefModel.copy_params_to_momentum

    @property
    def image_size(self) -> int:
        """The square input resolution (what the evaluation transform resizes to)."""
        return self.config.image_size

    # --- weights ---

    @classmethod
    def from_backbone(cls, backbone: AlbefModel, *, decoder_layers: int | None = None, distill: bool = True,
                      extra_words: list[str] = (), vocab_dir: str | Path | None = None,
                      source: str = "backbone") -> tuple["AlbefVqaModel", VqaLoadReport]:
        """The VQA model initialised from a pretrained backbone (ours or an official .pth, as
        `hist_vlm.models.registry` loaded it). `extra_words` missing from a whole-word vocabulary
        (a derived one, `model.derive_vocab`) are appended with new embedding rows, and the
        extended vocab.txt is written to `vocab_dir`."""
        if not isinstance(backbone, AlbefModel):
            raise ValueError(f"the ALBEF VQA model is built on an ALBEF backbone, not {type(backbone).__name__}")
        vqa = VqaModelConfig(decoder_layers, distill)
        cfg, state = backbone.config, dict(backbone.state_dict())
        added: list[str] = []
        if extra_words:
            cfg, state, added = _extend_vocabulary(cfg, state, extra_words, vocab_dir)
        model = cls(cfg, vqa)
        n_dec, fusion = vqa.depth(cfg), cfg.fusion_layer
        own = model.state_dict()
        placed: dict[str, Tensor] = {}
        dropped, decoder_from = [], {}
        for key, tensor in state.items():
            targets = [t for t in _targets(key, fusion, n_dec) if t in own and own[t].shape == tensor.shape]
            if not targets:
                dropped.append(key)    # no place in the VQA model, or another shape
            for target in targets:
                placed[target] = tensor
                m = re.match(r"text_decoder\.bert\.encoder\.layer\.(\d+)\.", target)
                if m:
                    decoder_from[int(m.group(1))] = int(m.group(1)) + fusion
        model.load_state_dict(placed, strict=False)
        from_online = vqa.distill and not any(_is_momentum(k) for k in placed)
        if from_online:
            model.copy_params_to_momentum()
        missing = sorted(k for k in own if k not in placed and not (from_online and _is_momentum(k)))
        report = VqaLoadReport(source, "vqa", dropped, missing, {}, from_online,
                               dict(sorted(decoder_from.items())), added)
        model.load_report = report
        return model, report

    def save_pretrained(self, directory: str | Path) -> None:
        """`model.safetensors` + `config.json` ("backbone": "albef_vqa") + its vocab.txt."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = stored_config(self.config, directory)
        write_model_folder(self, directory, {"backbone": self.name, "config": config,
                                             "vqa": dataclasses.asdict(self.vqa_config)})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "AlbefVqaModel":
        """What `save_pretrained` wrote (or a training checkpoint's `model/`), in eval mode."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{directory} is not a saved VQA model (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        payload = read_model_config(config_path)
        if payload.get("backbone") != cls.name:
            name = payload.get("backbone") if isinstance(payload, dict) else None
            raise ValueError(f"{config_path} describes {name!r}, not a VQA model ({cls.name!r}): "
                             "fine-tune it first with a VQA preset (hist-vlm train albef_vqa)")
        def build() -> "AlbefVqaModel":
            config = without_retired_keys(dict(payload["config"]), cls.config_class, directory)
            if config.get("vocab_file") is not None:
                config["vocab_file"] = stored_vocab(directory, config["vocab_file"])
            return cls(cls.config_class.from_dict(config), VqaModelConfig(**payload.get("vqa", {})))

        model = built_from(config_path, build)
        load_weights(model, directory / WEIGHTS_FILE)
        return model.eval()


def _is_momentum(key: str) -> bool:
    return key.split(".", 1)[0].endswith("_m")


def _targets(key: str, fusion: int, n_dec: int) -> list[str]:
    """Where a backbone key goes in the VQA model (ALBEF's VQA.py mapping); [] = dropped."""
    tower, _, rest = key.partition(".")
    suffix = "_m" if tower.endswith("_m") else ""
    if tower == f"visual_encoder{suffix}":
        return [key]
    if tower != f"text_encoder{suffix}":
        return []                     # ITC projections, ITM head, temperature, queues
    decoder = f"text_decoder{suffix}"
    if rest.startswith("cls."):
        return [f"{decoder}.{rest}"]  # the MLM head becomes the decoder's LM head
    out = [key]
    inner = rest.removeprefix("bert.")
    if inner.startswith("embeddings."):
        out.append(f"{decoder}.bert.{inner}")
    m = _LAYER.match(inner)
    if m and 0 <= int(m.group(1)) - fusion < n_dec:
        out.append(f"{decoder}.bert.encoder.layer.{int(m.group(1)) - fusion}.{m.group(2)}")
    return out


def _extend_vocabulary(cfg: AlbefConfig, state: dict[str, Tensor], words: list[str], vocab_dir
                       ) -> tuple[AlbefConfig, dict[str, Tensor], list[str]]:
    """Append `words` the vocabulary lacks: new embedding rows drawn at the scale of the old
    ones (torch's global RNG: seeded by the trainer), new LM-head biases at the old mean."""
    if cfg.vocab_file is None:
        raise ValueError("only a model with its own whole-word vocabulary (model.derive_vocab) can be extended; "
                         "bert-base's wordpieces already spell any word")
    vocab = read_vocab_file(cfg.vocab_file)
    known = set(vocab)
    added = sorted({w for w in words if w not in known})
    if not added:
        return cfg, state, []
    if vocab_dir is None:
        raise ValueError("extending the vocabulary needs a folder for the new vocab.txt")
    path = write_vocab_file([*vocab, *added], Path(vocab_dir) / VOCAB_FILE)
    n = len(added)
    fresh: dict[int, Tensor] = {}     # one new block per source tensor, so tied weights stay tied
    out = {}
    for key, t in state.items():
        if key.endswith(_VOCAB_KEYS) and t.shape[0] == cfg.vocab_size:
            if t.data_ptr() not in fresh:
                rows = torch.randn(n, *t.shape[1:]) * t.std() if t.ndim > 1 else t.mean().expand(n)
                fresh[t.data_ptr()] = torch.cat([t, rows.to(t.dtype)])
            t = fresh[t.data_ptr()]
        out[key] = t
    return dataclasses.replace(cfg, vocab_file=str(path), vocab_size=len(vocab) + n), out, added


register_head("albef", "vqa", AlbefVqaModel)
