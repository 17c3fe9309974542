"""The HIST objective: L = L_vl + w(t) * (l_p L_phrase + l_s L_subject + l_a L_add).

L_vl      ITC + ITM + l_m MLM (ALBEF) / LM (BLIP) on (image, caption)
L_phrase  ITC + ITM + l_m MLM/LM on (image, noun phrase C_i)
          l_m = `mlm_weight` (1; 0 skips the MLM/LM pass: ALBEF's retrieval fine-tuning is ITC + ITM)
L_subject ITC + ITM on (image, subject S_i)
L_add     sum over patches |G_i + G_j - G_ij|, mean over pairs; G = GradCAM (`train` recipe,
          create_graph=True) of C_i, C_j and "C_i and C_j" from ONE autograd.grad call.
          `add_normalize` says what G is (the paper's formula says nothing about scale):
            none          raw maps, the paper's formula as written. Raw maps are small (their
                          sum over patches ~1e-2..1e-1 on the tiny demo model, ~1e-3 on ALBEF-base
                          scale): the term is orders of magnitude below ITC, and G = 0 is a
                          trivial minimum; with the token-mean recipe a composite's map is
                          a mean over twice the tokens, so it is NOT naturally G_i + G_j
            minmax        each map min-max scaled to [0, 1] first (SelfEQ's normalisation)
            distribution  each side scaled to sum 1: |(G_i + G_j) / sum(G_i + G_j) - G_ij / sum(G_ij)|,
                          the L1 distance (in [0, 2]) between where the composite looks and where
                          its parts look together; free of the map scale and of the token count,
                          and shrinking the maps cannot lower it

Schedules w(t), t = epochs elapsed (float):
  paper     the paper's L = a L_vl + (1-a)(L_vl + L_HIST), a rising 0 -> 1 over the first two
            epochs, i.e. w = 1 - a: HIST fades out (SelfEQ applies its loss in epoch 0 only)
  constant  w = 1
  off       the baseline: HIST terms are not computed at all

The vision tower runs once per image; each text kind (captions, phrases, subjects) runs the text
encoder, the ITM fusion and the MLM at its own padded length. All random
choices (ITM negatives, MLM masks) come from a generator seeded identically on every rank and
drawn for the GLOBAL batch, each rank taking its slice: a step gives the same result on one
process as on many (tests/test_ddp_hist.py). The ITC queue is a buffer of the `ItcLoss`
module (`itc.queue.*`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hist_vlm.losses.distributed import global_mean, local_shard, world
from hist_vlm.losses.gradcam import gradcam_maps, minmax_maps
from hist_vlm.losses.itc import ItcLoss, text_keys
from hist_vlm.losses.itm import ItmBlock, itm_block, itm_losses
from hist_vlm.losses.mlm import mask_tokens, mlm_loss
from hist_vlm.losses.rows import cat_rows
from hist_vlm.batch import HistBatch, TextRows
from hist_vlm.models.base import CaptioningModel, MaskedLanguageModel, VisionLanguageBackbone

SCHEDULES = ("paper", "constant", "off")
ADD_NORMALIZES = ("none", "minmax", "distribution")


@dataclass
class HistLossConfig:
    schedule: str = "paper"
    lambda_phrase: float = 1.0
    lambda_subject: float = 1.0
    lambda_add: float = 1.0
    add_normalize: str = "none"            # what the addition loss compares (module doc)
    #: cross-attention layers (0-based) for the addition-loss GradCAM; None = the backbone's
    #: `default_capture_layers` (ALBEF: 2 = BERT layer 8; BLIP: 8 = the paper's 9th layer)
    capture_layers: tuple[int, ...] | None = None
    capture_head: int | None = None        # None = mean over heads (the paper)
    capture_combine: str = "mean"          # or "product" (Table 7)
    queue_size: int = 65536                # ITC queue (only with a momentum twin)
    momentum: float = 0.995
    alpha: float = 0.4                     # distillation weight, ramped over epoch 0 (ALBEF)
    mlm_probability: float = 0.15
    mlm_weight: float = 1.0                # 0: no MLM/LM pass at all (ALBEF's Retrieval.py trains ITC + ITM)
    itm_hard_negatives: bool = True       # False: uniform over the non-positives
    itm_group_size: int | None = None      # negatives among groups of this many images (None: local batch)
    paper_ramp_epochs: float = 2.0
    seed: int = 0                          # shared by all ranks: negatives and masks

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown HIST schedule {self.schedule!r} (choose from {SCHEDULES})")
        if self.capture_combine not in ("mean", "product"):
            raise ValueError(f"unknown capture_combine {self.capture_combine!r} (mean or product)")
        if self.mlm_weight < 0:
            raise ValueError(f"mlm_weight must be >= 0, got {self.mlm_weight}")
        if self.add_normalize not in ADD_NORMALIZES:
            raise ValueError(f"unknown add_normalize {self.add_normalize!r} (choose from {ADD_NORMALIZES})")


def hist_weight(schedule: str, progress: float, ramp_epochs: float = 2.0) -> float:
    """w(t) of the named schedule at `progress` epochs (module doc)."""
    if schedule == "off":
        return 0.0
    if schedule == "constant":
        return 1.0
    return 1.0 - min(1.0, max(0.0, progress) / ramp_epochs)


def addition_loss(g_i: Tensor, g_j: Tensor, g_ij: Tensor, normalize: str = "none", eps: float = 1e-12) -> Tensor:
    """sum over patches |G_i + G_j - G_ij|, averaged over pairs (all ranks): [n, gh, gw] x3 -> scalar.
    `normalize` (module doc): "none", "minmax" (each map to [0, 1] first) or "distribution"
    (the parts' sum and the composite each scaled to sum 1)."""
    if normalize == "minmax":
        g_i, g_j, g_ij = (minmax_maps(g) for g in (g_i, g_j, g_ij))
    parts = g_i + g_j
    if normalize == "distribution":
        parts = parts / (parts.sum((1, 2), keepdim=True) + eps)
        g_ij = g_ij / (g_ij.sum((1, 2), keepdim=True) + eps)
    return global_mean((parts - g_ij).abs().sum((1, 2)))


@dataclass
class _Encoded:
    """One kind of text rows with everything the losses read."""

    rows: TextRows
    embeds: Tensor       # [N, T, D]
    feat: Tensor         # [N, E]
    feat_m: Tensor | None
    keys: Tensor         # [N]


class HistLoss(nn.Module):
    """`HistLoss(config, model)(model, batch, progress) -> {'loss', 'itc', ..., 'add', 'hist_weight'}`.

    Holds the `ItcLoss` (its queue with a momentum twin); the temperature is the backbone's."""

    def __init__(self, config: HistLossConfig, model: VisionLanguageBackbone) -> None:
        super().__init__()
        self.config = config
        self.capture_layers = tuple(int(x) for x in (config.capture_layers or model.default_capture_layers))
        self.itc = ItcLoss(model.embed_dim, config.queue_size if model.momentum_twin() is not None else 0)
        self._gen: torch.Generator | None = None

    # ---------------------------------------------------------------- randomness
    def _uniform(self, *shape: int, device: torch.device) -> Tensor:
        """Uniforms for the local rows, drawn for the global batch ([world * n, ...]) from the
        shared-seed generator, then sliced: identical choices on 1 or many processes."""
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.config.seed)
        size = world()[1]
        return local_shard(torch.rand(shape[0] * size, *shape[1:], generator=self._gen, device=device))

    def _temperature(self, model: VisionLanguageBackbone) -> Tensor:
        temp = model.temp
        with torch.no_grad():
            temp.clamp_(0.001, 0.5)  # ALBEF clamps at every forward
        return temp

    # ---------------------------------------------------------------- pieces
    def _encode(self, model, twin, rows: TextRows) -> _Encoded:
        embeds = model.encode_text(rows.input_ids, rows.attention_mask)  # [N, T, D]
        feat_m = None
        if twin is not None:
            with torch.no_grad():
                feat_m = twin.text_features(twin.encode_text(rows.input_ids, rows.attention_mask))
        return _Encoded(rows, embeds, model.text_features(embeds), feat_m,
                        text_keys(rows.input_ids, rows.attention_mask))

    def _itc(self, img, texts: _Encoded, image_ids, temp, alpha) -> Tensor:
        image_feat, image_feat_m = img
        return self.itc(image_feat, texts.feat, image_ids, texts.rows.image_index, texts.keys, temp,
                        image_feat_m=image_feat_m, text_feat_m=texts.feat_m, alpha=alpha)

    def _itm_block(self, image_embeds, image_feat, texts: _Encoded, image_ids, temp) -> ItmBlock:
        dev = image_embeds.device
        return itm_block(
            image_embeds, texts.rows,
            text_embeds=texts.embeds, text_feat=texts.feat, image_feat=image_feat, image_ids=image_ids,
            keys=texts.keys, temp=temp,
            u_text=self._uniform(len(texts.rows), device=dev),
            u_image=self._uniform(image_embeds.shape[0], device=dev),
            hard=self.config.itm_hard_negatives, group_size=self.config.itm_group_size,
        )

    def _language(self, model, twin, kinds: list[TextRows], image_embeds, image_embeds_m, alpha) -> list[Tensor]:
        """One term per kind: masked LM with distillation for a `MaskedLanguageModel` (ALBEF;
        one pass per kind), captioning LM for a `CaptioningModel` (BLIP with its decoder), else 0."""
        if not isinstance(model, MaskedLanguageModel):
            if isinstance(model, CaptioningModel):
                return [model.lm_loss(rows, image_embeds) for rows in kinds]
            return [image_embeds.new_zeros(()) for _ in kinds]
        tok = model.mask_tokens
        masked, labels = [], []
        for rows in kinds:
            u = self._uniform(len(rows), 3, rows.input_ids.shape[1], device=image_embeds.device).transpose(0, 1)
            ids, lab = mask_tokens(
                rows.input_ids, rows.attention_mask, u, mask_id=tok.mask_token_id, vocab_size=tok.vocab_size,
                never_mask=tok.never_mask, probability=self.config.mlm_probability,
            )
            masked.append(TextRows(ids, rows.attention_mask, rows.image_index))
            labels.append(lab)
        out = []
        for rows, lab in zip(masked, labels):  # each kind at its own padded length
            chosen = lab != -100  # [n, T]: the vocab-wide head runs on these tokens only (~15 %)
            args = (rows.input_ids, rows.attention_mask)
            logits = model.mlm_logits(*args, image_embeds, rows.image_index, positions=chosen)  # [K, V]
            logits_m = None
            if isinstance(twin, MaskedLanguageModel) and alpha > 0:
                with torch.no_grad():
                    logits_m = twin.mlm_logits(*args, image_embeds_m, rows.image_index, positions=chosen)
            out.append(mlm_loss(logits, lab[chosen], logits_m, alpha))
        return out

    def _addition(self, model, image_embeds, batch: HistBatch) -> Tensor:
        n = len(batch.pair_first)
        if n == 0:  # still join global_mean's all-reduce: other ranks may have pairs
            return global_mean(image_embeds.new_zeros(0))
        rows = cat_rows(batch.pair_first, batch.pair_second, batch.composites)
        maps = gradcam_maps(
            model, image_embeds, rows, layers=self.capture_layers, head=self.config.capture_head,
            combine=self.config.capture_combine, recipe="train", create_graph=True,
        )  # [3n, gh, gw]
        return addition_loss(*maps.split(n), normalize=self.config.add_normalize)

    # ---------------------------------------------------------------- forward
    def forward(self, model: VisionLanguageBackbone, batch: HistBatch, progress: float) -> dict[str, Tensor]:
        cfg = self.config
        w = hist_weight(cfg.schedule, progress, cfg.paper_ramp_epochs)
        twin = model.momentum_twin()
        alpha = cfg.alpha * min(1.0, max(0.0, progress)) if twin is not None else 0.0
        if twin is not None:
            model.update_momentum(cfg.momentum)
        temp = self._temperature(model)

        image_embeds = model.encode_image(batch.pixel_values)  # [B, 1+P, Dv], once per image
        img = (model.image_features(image_embeds), None)
        image_embeds_m = None
        if twin is not None:
            with torch.no_grad():
                image_embeds_m = twin.encode_image(batch.pixel_values)
                img = (img[0], twin.image_features(image_embeds_m))

        kinds = [batch.captions] + ([batch.phrases, batch.subjects] if w > 0 else [])
        encoded = self._encode_all(model, twin, kinds)
        caps = encoded[0]
        ids = batch.image_ids
        zero = image_embeds.new_zeros(())
        out: dict[str, Tensor] = {"itc": self._itc(img, caps, ids, temp, alpha)}
        if w > 0:
            phr, sub = encoded[1], encoded[2]
            out["phrase_itc"] = self._itc(img, phr, ids, temp, alpha)
            out["subject_itc"] = self._itc(img, sub, ids, temp, alpha)
        # one fusion pass for every ITM term, one MLM pass for every MLM term
        itm = itm_losses(model, image_embeds, [self._itm_block(image_embeds, img[0], e, ids, temp) for e in encoded])
        lm = [zero, zero]
        if cfg.mlm_weight > 0:
            lm = self._language(model, twin, [e.rows for e in encoded[:2]], image_embeds, image_embeds_m, alpha)
        out["itm"], out["mlm"] = itm[0], lm[0]
        total = out["itc"] + out["itm"] + cfg.mlm_weight * out["mlm"]
        if w > 0:
            out["phrase_itm"], out["subject_itm"], out["phrase_mlm"] = itm[1], itm[2], lm[1]
            out["add"] = self._addition(model, image_embeds, batch)
            hist = (
                cfg.lambda_phrase * (out["phrase_itc"] + out["phrase_itm"] + cfg.mlm_weight * out["phrase_mlm"])
                + cfg.lambda_subject * (out["subject_itc"] + out["subject_itm"])
                + cfg.lambda_add * out["add"]
            )
            total = total + w * hist
        for key in ("phrase_itc", "phrase_itm", "phrase_mlm", "subject_itc", "subject_itm", "add"):
            out.setdefault(key, zero)
        # after every ITC term of this step has read the queue
        self.itc.enqueue(img[1], caps.feat_m, batch.image_ids, caps.rows.image_index)
        out["loss"] = total
        out["hist_weight"] = torch.tensor(w)
        out["temp"] = temp.detach()
        return out

    def _encode_all(self, model, twin, kinds: list[TextRows]) -> list[_Encoded]:
        """Every kind of text through the text encoder at its own padded length (a subject is
        ~3 tokens, a caption ~25: one call padded to the longest mostly encoded padding)."""
        return [self._encode(model, twin, rows) for rows in kinds]
