"""The terms `HistLoss` composes, all reading one step's encoded images and texts (`Step`).

Vision-language terms share one call, `term(step, kinds) -> [loss of each kind]`, and each runs
over EVERY kind of text that needs it at once (captions, phrases, subjects: `HistBatch` fields):
  Itc   one `ItcLoss` (one queue) for every kind
  Itm   every kind's negatives drawn, then one `itm_losses` call fuses each kind at its own length
  Lm    every kind's MLM masks drawn, then the vocabulary head on the masked tokens only
  Rank  every kind's negative images drawn, then each kind's likelihood under both images
HistLoss runs them in that order, so the shared-seed draws come in one fixed order (ITM negatives
of captions, phrases, subjects, then MLM masks of captions, phrases, then rank negatives)
whatever terms are on.

Named terms are what the objective sums and logs, `term(step) -> (loss, {key: value})`; each
sums the parts among the loss's objectives (hist.py), ALBEF's shown:
  CaptionTerm  L_vl       ITC + ITM + l_m LM on captions           itc, itm, mlm
  PhraseTerm   L_phrase   ITC + ITM + l_m LM on noun phrases C_i   phrase_itc, phrase_itm, phrase_mlm
  SubjectTerm  L_subject  ITC + ITM on subjects S_i                subject_itc, subject_itm
  AdditionTerm L_add      GradCAM sum rule on (C_i, C_j, "C_i and C_j")   add
               (the paper's later "composition loss": the same term, logged as `add`)
A text term is a `kind` (a HistBatch field), a key prefix and the vision-language `parts` it
sums: a new one is a three-line subclass of `TextTerm` plus its (name, lambda, term) entry in
`HistLoss.terms`; HistLoss encodes its kind and runs its parts with the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from hist_vlm.batch import HistBatch, TextRows, cat_rows
from hist_vlm.losses.distributed import global_mean
from hist_vlm.losses.gradcam import gradcam_maps, minmax_maps
from hist_vlm.losses.itc import ItcLoss, text_keys
from hist_vlm.losses.itm import ItmBlock, itm_block, itm_losses, outside_group, sample_rows, with_negative_texts
from hist_vlm.losses.mlm import mask_tokens, mlm_loss
from hist_vlm.models.base import (CaptioningModel, ContrastiveModel, MaskedLanguageModel, MomentumTwin,
                                  VisionLanguageBackbone)


@dataclass
class EncodedText:
    """One kind of text rows through the text encoder, with everything the terms read."""

    rows: TextRows
    embeds: Tensor | None   # [N, T, D] unimodal (None: not encoded, no ITC/ITM this step)
    feat: Tensor | None     # [N, E]
    feat_m: Tensor | None   # [N, E] the momentum twin's
    keys: Tensor            # [N] text_keys: token-identical texts are positives

    @classmethod
    def encode(cls, model: VisionLanguageBackbone, twin: MomentumTwin | None, rows: TextRows,
               unimodal: bool = True) -> EncodedText:
        """`unimodal`: run the text encoder (ITC, ITM need it; a `ContrastiveModel` has one)."""
        keys = text_keys(rows.input_ids, rows.attention_mask)
        if not unimodal:
            return cls(rows, None, None, None, keys)
        assert isinstance(model, ContrastiveModel)  # HistLoss checked the objectives against the model
        embeds = model.encode_text(rows.input_ids, rows.attention_mask)
        feat_m = None
        if twin is not None:
            with torch.no_grad():
                feat_m = twin.text_features(twin.encode_text(rows.input_ids, rows.attention_mask))
        return cls(rows, embeds, model.text_features(embeds), feat_m, keys)


@dataclass
class Step:
    """One step's context: the images encoded once, every kind of text encoded once."""

    model: VisionLanguageBackbone
    twin: MomentumTwin | None
    batch: HistBatch
    temp: Tensor | None             # [] the backbone's ITC temperature (clamped); None without ITC
    alpha: float                    # distillation weight now (0 without a twin)
    image_embeds: Tensor            # [B, 1+P, Dv]
    image_embeds_m: Tensor | None   # [B, 1+P, Dv] momentum
    image_feat: Tensor | None       # [B, E] (or [B, K, E]); None without ITC
    image_feat_m: Tensor | None     # [B, E] momentum
    texts: dict[str, EncodedText]   # by HistBatch field
    #: shared-seed uniforms for the local rows, drawn for the global batch (HistLoss._uniform)
    uniform: Callable[..., Tensor]
    #: the vision-language terms' values by (kind, "itc" | "itm" | "mlm" | "rank"), filled by HistLoss
    #: before the named terms read them
    vl_losses: dict[tuple[str, str], Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------- vision-language terms

class Itc:
    """ITC of each kind against the batch's images; one `ItcLoss`, so every kind reads one queue."""

    def __init__(self, loss: ItcLoss) -> None:
        self.loss = loss

    def __call__(self, step: Step, kinds: list[str]) -> list[Tensor]:
        return [
            self.loss(step.image_feat, t.feat, step.batch.image_ids, t.rows.image_index, t.keys, step.temp,
                      image_feat_m=step.image_feat_m, text_feat_m=t.feat_m, alpha=step.alpha)
            for t in (step.texts[k] for k in kinds)
        ]


class Itm:
    """ITM with negatives sampled from the ITC similarities (`losses.itm`). All kinds' negatives
    first (in kind order: the draws), then ONE `itm_losses` call for all their fusion rows. The
    captions' block also holds the batch's subject-swapped captions, if any, as negatives."""

    def __init__(self, hard: bool, group_size: int | None) -> None:
        self.hard, self.group_size = hard, group_size

    def __call__(self, step: Step, kinds: list[str]) -> list[Tensor]:
        blocks = [self.block(step, step.texts[k]) for k in kinds]
        swaps = step.batch.caption_swaps
        if swaps is not None and "captions" in kinds:
            i = kinds.index("captions")
            blocks[i] = with_negative_texts(blocks[i], swaps, step.model.encode_text(swaps.input_ids,
                                                                                     swaps.attention_mask))
        return itm_losses(step.model, step.image_embeds, blocks)

    def block(self, step: Step, texts: EncodedText) -> ItmBlock:
        dev = step.image_embeds.device
        u_text = step.uniform(len(texts.rows), device=dev)                 # [N] then
        u_image = step.uniform(step.image_embeds.shape[0], device=dev)     # [B]: this order
        return itm_block(
            step.image_embeds, texts.rows, text_embeds=texts.embeds, text_feat=texts.feat,
            image_feat=step.image_feat, image_ids=step.batch.image_ids, keys=texts.keys, temp=step.temp,
            u_text=u_text, u_image=u_image, hard=self.hard, group_size=self.group_size,
        )


class Lm:
    """Language modelling per kind: masked LM with momentum distillation for a
    `MaskedLanguageModel` (ALBEF), captioning LM for a `CaptioningModel` (BLIP with its
    decoder); any other backbone has no language term (HistLoss refuses `mlm_weight > 0` for
    it when built, `hist.check_backbone`, and never runs this). Every kind's masks are drawn
    before any head runs (the draw order).
    `subject_ids` [K] (the token ids of the corpus's subject words) are masked with
    `subject_probability` instead of `probability` when both are given."""

    def __init__(self, probability: float, subject_probability: float | None = None,
                 subject_ids: Tensor | None = None) -> None:
        self.probability = probability
        self.subject_probability, self.subject_ids = subject_probability, subject_ids

    def __call__(self, step: Step, kinds: list[str]) -> list[Tensor]:
        model, rows_of = step.model, [step.texts[k].rows for k in kinds]
        if not isinstance(model, MaskedLanguageModel):
            if isinstance(model, CaptioningModel):  # the token mean over every rank's tokens
                return [global_mean(*(x.flatten() for x in model.lm_token_losses(rows, step.image_embeds)))
                        for rows in rows_of]
            raise RuntimeError(f"the {model.name} backbone has no language head (neither a MaskedLanguageModel "
                               "nor a CaptioningModel): the MLM/LM term cannot be computed")
        tok = model.mask_tokens
        masked = []
        for rows in rows_of:
            u = step.uniform(len(rows), 3, rows.input_ids.shape[1], device=step.image_embeds.device).transpose(0, 1)
            masked.append(mask_tokens(
                rows.input_ids, rows.attention_mask, u, mask_id=tok.mask_token_id, vocab_size=tok.vocab_size,
                never_mask=tok.never_mask, probability=self.probability,
                preferred=None if self.subject_ids is None else self.subject_ids.to(rows.input_ids.device),
                preferred_probability=self.subject_probability,
            ))  # (input_ids [N, T], labels [N, T])
        return [self.masked_lm(step, rows, ids, labels) for rows, (ids, labels) in zip(rows_of, masked)]

    @staticmethod
    def masked_lm(step: Step, rows: TextRows, input_ids: Tensor, labels: Tensor) -> Tensor:
        """One kind at its own padded length; the vocabulary-wide head runs on the masked tokens only (~15 %)."""
        chosen = labels != -100  # [N, T]
        args = (input_ids, rows.attention_mask)
        logits = step.model.mlm_logits(*args, step.image_embeds, rows.image_index, positions=chosen)  # [K, V]
        logits_m = None
        if isinstance(step.twin, MaskedLanguageModel) and step.alpha > 0:
            with torch.no_grad():
                logits_m = step.twin.mlm_logits(*args, step.image_embeds_m, rows.image_index, positions=chosen)
        return mlm_loss(logits, labels[chosen], logits_m, step.alpha)


class Rank:
    """Likelihood ranking, the matching term of a model without an ITM head (a decoder): each
    row's text should be likelier given its own image than given another image of the batch,
    softplus(s(T | I-) - s(T | I)) = -log sigmoid(s+ - s-), with s the mean per-token
    log-likelihood (`CaptioningModel.text_log_likelihood`) and I- drawn uniformly among the
    local images with another image id (within groups of `group_size` images, as ITM's
    negatives). Every kind's negatives are drawn first (the draw order), then each kind's rows
    with both images run as one pass."""

    def __init__(self, group_size: int | None = None) -> None:
        self.group_size = group_size

    def __call__(self, step: Step, kinds: list[str]) -> list[Tensor]:
        model, ids = step.model, step.batch.image_ids
        if not isinstance(model, CaptioningModel):
            raise RuntimeError(f"the {model.name} backbone is not a CaptioningModel: the rank term cannot be computed")
        rows_of = [step.texts[k].rows for k in kinds]
        negatives = []
        for r in rows_of:
            other = (ids[r.image_index, None] != ids[None, :]) & ~outside_group(r.image_index, len(ids), self.group_size)
            negatives.append(sample_rows(other.float(), step.uniform(len(r), device=step.image_embeds.device)))
        losses = []
        for rows, negative in zip(rows_of, negatives):
            both = cat_rows(rows, TextRows(rows.input_ids, rows.attention_mask, negative))
            own, other = model.text_log_likelihood(both, step.image_embeds).split(len(rows))  # [N] each
            losses.append(global_mean(F.softplus(other - own)))
        return losses


# ---------------------------------------------------------------------------- named terms

class TextTerm:
    """The sum of the vision-language `parts` among the loss's `objectives` on one `kind` of
    rows; logged as `prefix + part`. The LM part is weighted by l_m (`mlm_weight`); at 0 the LM
    pass is skipped, its key logs 0."""

    kind: ClassVar[str]
    prefix: ClassVar[str]
    parts: ClassVar[tuple[str, ...]]   # of "itc", "itm", "mlm", "rank", summed in this order
    draws: ClassVar[bool] = True       # its kind's ITM/rank negatives and MLM masks come from the shared draws

    def __init__(self, objectives: tuple[str, ...] = ("itc", "itm", "mlm"), lm_weight: float = 1.0) -> None:
        self.lm_weight = lm_weight
        self.parts_on = tuple(p for p in self.parts if p in objectives)
        self.names = tuple(self.prefix + p for p in self.parts_on)

    def needs(self) -> tuple[str, ...]:
        """The parts to compute this step."""
        return tuple(p for p in self.parts_on if p != "mlm" or self.lm_weight > 0)

    def __call__(self, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        values = {p: step.vl_losses[self.kind, p] for p in self.needs()}
        total = None
        for p, v in values.items():
            v = self.lm_weight * v if p == "mlm" else v
            total = v if total is None else total + v
        return total, {self.prefix + p: v for p, v in values.items()}


class CaptionTerm(TextTerm):
    """L_vl on (image, caption): the baseline objective, never scheduled."""
    kind, prefix, parts = "captions", "", ("itc", "itm", "mlm", "rank")


class PhraseTerm(TextTerm):
    """L_phrase on (image, noun phrase C_i)."""
    kind, prefix, parts = "phrases", "phrase_", ("itc", "itm", "mlm", "rank")


class SubjectTerm(TextTerm):
    """L_subject on (image, subject S_i): a subject is a word or two, nothing worth masking
    (nor worth modelling: the phrase's LM already predicts it)."""
    kind, prefix, parts = "subjects", "subject_", ("itc", "itm", "rank")


class AdditionTerm:
    """L_add: GradCAM maps (`train` recipe, create_graph=True) of C_i, C_j and "C_i and C_j",
    all 3n rows in ONE fusion pass and one autograd.grad call, compared by `addition_loss`."""

    names = ("add",)
    draws = False  # no random choice: at weight 0 it can be skipped without changing any other term

    def __init__(self, layers: tuple[int, ...], head: int | None, combine: str, normalize: str) -> None:
        self.layers, self.head, self.combine, self.normalize = layers, head, combine, normalize

    def __call__(self, step: Step) -> tuple[Tensor, dict[str, Tensor]]:
        add = self.loss(step)
        return add, {"add": add}

    def loss(self, step: Step) -> Tensor:
        batch, n = step.batch, len(step.batch.pair_first)
        if n == 0:  # still join global_mean's all-reduce: other ranks may have pairs
            return global_mean(step.image_embeds.new_zeros(0))
        rows = cat_rows(batch.pair_first, batch.pair_second, batch.composites)
        maps = gradcam_maps(
            step.model, step.image_embeds, rows, layers=self.layers, head=self.head,
            combine=self.combine, recipe="train", create_graph=True,
        )  # [3n, gh, gw]
        return addition_loss(*maps.split(n), normalize=self.normalize)


def addition_loss(g_i: Tensor, g_j: Tensor, g_ij: Tensor, normalize: str = "none", eps: float = 1e-12) -> Tensor:
    """sum over patches |G_i + G_j - G_ij|, averaged over pairs (all ranks): [n, gh, gw] x3 -> scalar.
    `normalize` (hist.py's module doc): "none", "minmax" (SelfEQ's min-max of each map first) or
    "distribution" (the parts' sum and the composite each scaled to sum 1). Every map gets
    the term's gradient, as in SelfEQ's loss between its two maps."""
    if normalize == "minmax":
        g_i, g_j, g_ij = (minmax_maps(g) for g in (g_i, g_j, g_ij))
    parts = g_i + g_j
    if normalize == "distribution":
        parts = parts / (parts.sum((1, 2), keepdim=True) + eps)
        g_ij = g_ij / (g_ij.sum((1, 2), keepdim=True) + eps)
    return global_mean((parts - g_ij).abs().sum((1, 2)))
