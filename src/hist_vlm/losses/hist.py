"""The HIST objective: L = L_vl + w(t) * (l_p L_phrase + l_s L_subject + l_a L_add).

L_vl      ITC + ITM + l_m MLM (ALBEF) / LM (BLIP) on (image, caption)
L_phrase  ITC + ITM + l_m MLM/LM on (image, noun phrase C_i)
          l_m = `mlm_weight`: None (the default) = 1 when the backbone has a language head (a
          `MaskedLanguageModel` or a `CaptioningModel`), else no language term; 0 skips the
          MLM/LM pass (ALBEF's retrieval fine-tuning is ITC + ITM); > 0 on a backbone without
          a language head is an error when HistLoss is built, never a silent 0
L_subject ITC + ITM on (image, subject S_i)

The vision-language objectives each level sums are `objectives` (`OBJECTIVES`), each needing a
capability the backbone declares (models.base): itc (ContrastiveModel), itm (MatchingModel),
mlm (the language head: MaskedLanguageModel or CaptioningModel), rank (CaptioningModel: the
text likelier given its image than given another image of the batch, `terms.Rank`). None (the
default) = every one the backbone has, rank only where there is no ITM head: ITC + ITM + MLM
for ALBEF, ITC + ITM (+ LM) for BLIP, ITC + ITM for BLIP-2, LM + rank for LLaVA (a decoder:
its levels are L_vl = LM + rank on captions, L_phrase = LM + rank on phrases, L_subject = rank
on subjects). Naming one the backbone cannot compute is an error when HistLoss is built.
L_add     sum over patches |G_i + G_j - G_ij|, mean over pairs; G = GradCAM (`train` recipe,
          create_graph=True) of C_i, C_j and "C_i and C_j" from ONE autograd.grad call.
          The paper's later version calls it the COMPOSITION loss: one term, two names.
          `loss.lambda_composition` is an alias of `loss.lambda_add` (give either; both at
          different values is an error; once built, the weight is in `lambda_add` and
          `lambda_composition` reads None, so a saved config holds it once); the term is
          logged as `add` under either name.
          `add_normalize` says what G is (the paper's formula says nothing about scale):
            none          raw maps, the paper's formula as written. Raw maps are small (their
                          sum over patches ~1e-2..1e-1 on the tiny demo model, ~1e-3 on ALBEF-base
                          scale): the term is orders of magnitude below ITC, and G = 0 is a
                          trivial minimum; with the token-mean recipe a composite's map is
                          a mean over twice the tokens, so it is NOT naturally G_i + G_j
            minmax        each map through SelfEQ's min-max first, g = (g - min) / (max(g - min) + 1e-7)
                          (`gradcam.minmax_maps`): ~[0, 1] for a map whose range is well above
                          1e-7, ~0 for a near-constant one (its noise is not stretched). SelfEQ
                          averages its (smooth L1) loss over the cells; this sums over them, so
                          the term grows with the grid: weigh it with lambda_add
            distribution  each side scaled to sum 1: |(G_i + G_j) / sum(G_i + G_j) - G_ij / sum(G_ij)|,
                          the L1 distance (in [0, 2]) between where the composite looks and where
                          its parts look together; free of the map scale and of the token count,
                          and shrinking the maps cannot lower it
          Every map gets the term's gradient, as in SelfEQ's loss between its two maps (a fixed
          target G_i + G_j was tried and rejected: docs/experiments.md, "add_detach_parts")

Schedules w(t), t = epochs elapsed (float):
  paper     the paper's L = a L_vl + (1-a)(L_vl + L_HIST), a rising 0 -> 1 over the first two
            epochs, i.e. w = 1 - a: HIST fades out (SelfEQ applies its loss in epoch 0 only)
  constant  w = 1
  off       the baseline: HIST terms are not computed at all

`HistLoss` composes named terms (`losses.terms`: one small class each) over one step's context:
the vision tower runs once per image; each text kind (captions, phrases, subjects) runs the text
encoder, the ITM fusion and the MLM at its own padded length. All random choices (ITM negatives,
MLM masks) come from a generator seeded identically on every rank and drawn for the GLOBAL
batch, each rank taking its slice: a step gives the same result on one process as on many
(tests/test_ddp_hist.py). The ITC queue is a buffer of the `ItcLoss` module (`itc.queue.*`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hist_vlm.batch import HistBatch
from hist_vlm.losses.distributed import local_shard, world
from hist_vlm.losses.itc import ItcLoss
from hist_vlm.losses.terms import (
    AdditionTerm, CaptionTerm, EncodedText, Itc, Itm, Lm, PhraseTerm, Rank, Step, SubjectTerm, TextTerm,
)
from hist_vlm.models.base import (
    CaptioningModel, ContrastiveModel, MaskedLanguageModel, MatchingModel, MomentumTwin, VisionLanguageBackbone,
)

SCHEDULES = ("paper", "constant", "off")
OBJECTIVES = ("itc", "itm", "mlm", "rank")
ADD_NORMALIZES = ("none", "minmax", "distribution")


@dataclass
class HistLossConfig:
    schedule: str = "paper"
    lambda_phrase: float = 1.0
    lambda_subject: float = 1.0
    #: the addition (composition) loss's weight; None = 1, or `lambda_composition` if given
    lambda_add: float | None = None
    #: alias of `lambda_add` (the paper's later name, module doc); resolved into lambda_add
    lambda_composition: float | None = None
    add_normalize: str = "none"            # what the addition loss compares (module doc)
    #: cross-attention layers (0-based) for the addition-loss GradCAM; None = the backbone's
    #: `default_capture_layers` (ALBEF: 2 = BERT layer 8; BLIP: 8 = the paper's 9th layer).
    #: Checked against the backbone when HistLoss is built
    capture_layers: tuple[int, ...] | None = None
    capture_head: int | None = None        # None = mean over heads (the paper)
    capture_combine: str = "mean"          # or "product" (Table 7)
    queue_size: int = 65536                # ITC queue (only with a momentum twin)
    momentum: float = 0.995
    alpha: float = 0.4                     # distillation weight, ramped over epoch 0 (ALBEF)
    mlm_probability: float = 0.15
    #: masking rate of the tokens of the corpus's subject words (HistLoss's `subject_ids`);
    #: None = `mlm_probability` like every other token. Needs a masked-LM backbone (ALBEF)
    mlm_subject_probability: float | None = None
    #: l_m. None: 1 if the backbone has a language head, else no language term; 0: no MLM/LM
    #: pass at all (ALBEF's Retrieval.py trains ITC + ITM); > 0 needs a language head
    mlm_weight: float | None = None
    #: the vision-language objectives of every level (module doc); None = the backbone's own
    objectives: tuple[str, ...] | None = None
    itm_hard_negatives: bool = True       # False: uniform over the non-positives
    itm_group_size: int | None = None      # ITM and rank negatives among groups of this many images (None: local batch)
    paper_ramp_epochs: float = 2.0         # the paper schedule's w(t) reaches 0 after this many epochs (> 0)
    seed: int = 0                          # shared by all ranks: negatives and masks

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown HIST schedule {self.schedule!r} (choose from {SCHEDULES})")
        if self.capture_combine not in ("mean", "product"):
            raise ValueError(f"unknown capture_combine {self.capture_combine!r} (mean or product)")
        if self.add_normalize not in ADD_NORMALIZES:
            raise ValueError(f"unknown add_normalize {self.add_normalize!r} (choose from {ADD_NORMALIZES})")
        for name in ("lambda_phrase", "lambda_subject", "lambda_add", "lambda_composition", "mlm_weight"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("mlm_probability", "mlm_subject_probability", "momentum", "alpha"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not (math.isfinite(self.paper_ramp_epochs) and self.paper_ramp_epochs > 0):
            raise ValueError(f"paper_ramp_epochs must be a finite number > 0, got {self.paper_ramp_epochs}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if self.itm_group_size is not None and self.itm_group_size < 1:
            raise ValueError(f"itm_group_size must be >= 1 (or null: the local batch), got {self.itm_group_size}")
        if self.capture_head is not None and self.capture_head < 0:
            raise ValueError(f"capture_head must be >= 0 (or null: the mean over heads), got {self.capture_head}")
        if self.objectives is not None:
            unknown = [x for x in self.objectives if x not in OBJECTIVES]
            if unknown or not self.objectives or len(set(self.objectives)) != len(self.objectives):
                raise ValueError(f"objectives must be distinct names from {OBJECTIVES}, at least one; got "
                                 f"{list(self.objectives)}")
        if self.capture_layers is not None:
            if not self.capture_layers:
                raise ValueError("capture_layers is empty: give at least one layer, or null for the backbone's default")
            if any(x < 0 for x in self.capture_layers):
                raise ValueError(f"capture_layers must be 0-based layer indices >= 0, got {list(self.capture_layers)}")
        add, composition = self.lambda_add, self.lambda_composition
        if add is not None and composition is not None and add != composition:
            raise ValueError(f"lambda_composition is an alias of lambda_add (the same term): got lambda_add={add} "
                             f"and lambda_composition={composition}; give one")
        self.lambda_add = next((x for x in (add, composition) if x is not None), 1.0)
        self.lambda_composition = None


def available_objectives(model: VisionLanguageBackbone) -> dict[str, bool]:
    """Each of `OBJECTIVES`: whether `model` declares the capability it needs."""
    has_lm = isinstance(model, (MaskedLanguageModel, CaptioningModel))
    contrastive = isinstance(model, ContrastiveModel)
    return {"itc": contrastive, "itm": contrastive and isinstance(model, MatchingModel), "mlm": has_lm,
            "rank": isinstance(model, CaptioningModel)}


_NEEDS = {"itc": "a ContrastiveModel (ITC features)",
          "itm": "a MatchingModel (an ITM head) and a ContrastiveModel (the ITC features its negatives are drawn from)",
          "mlm": "a language head (a MaskedLanguageModel or a CaptioningModel)", "rank": "a CaptioningModel"}


def check_backbone(config: HistLossConfig, model: VisionLanguageBackbone) -> tuple[tuple[str, ...], float]:
    """What `config` asks of `model`, checked before any step runs: a ValueError naming the
    `loss.*` key for a capture layer or head the model does not have, an objective, language
    term or subject masking rate it cannot compute. Returns (the objectives, in `OBJECTIVES`
    order; l_m, `mlm_weight` resolved) (module doc)."""
    n_layers, n_heads = model.num_cross_attention_layers, model.num_cross_attention_heads
    bad = [x for x in (config.capture_layers or ()) if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"loss.capture_layers: layer {bad[0]} does not exist: the {model.name} backbone has "
                         f"{n_layers} cross-attention layers (0..{n_layers - 1})")
    if config.capture_head is not None and not 0 <= config.capture_head < n_heads:
        raise ValueError(f"loss.capture_head: head {config.capture_head} does not exist: the {model.name} "
                         f"backbone's cross-attention has {n_heads} heads (0..{n_heads - 1})")
    able = available_objectives(model)
    has = ", ".join(x for x in OBJECTIVES if able[x])
    for x in config.objectives or ():
        if not able[x]:
            raise ValueError(f"loss.objectives: {x!r} needs {_NEEDS[x]}, which the {model.name} backbone is not; "
                             f"it computes: {has}")
    if config.mlm_weight is not None and config.mlm_weight > 0 and not able["mlm"]:
        raise ValueError(f"loss.mlm_weight={config.mlm_weight}: the {model.name} backbone cannot compute the "
                         "language (MLM/LM) term: it is neither a MaskedLanguageModel nor a CaptioningModel "
                         "(BLIP: give model.params.decoder, a BlipForConditionalGeneration folder); set loss.mlm_weight=0")
    if config.mlm_subject_probability is not None and not isinstance(model, MaskedLanguageModel):
        raise ValueError(f"loss.mlm_subject_probability={config.mlm_subject_probability}: the {model.name} "
                         "backbone has no masked LM (not a MaskedLanguageModel) whose masking it could set")
    if config.objectives is None:
        chosen = {x for x in OBJECTIVES if able[x]} - ({"rank"} if able["itm"] else set())
    else:
        chosen = set(config.objectives)
        if "mlm" not in chosen and config.mlm_weight:
            raise ValueError(f"loss.mlm_weight={config.mlm_weight} but loss.objectives {list(config.objectives)} "
                             "has no 'mlm': add it, or set loss.mlm_weight=0")
    if config.mlm_weight is None:
        lm_weight = 1.0 if "mlm" in chosen else 0.0
    else:
        lm_weight = config.mlm_weight
    if not chosen - ({"mlm"} if lm_weight == 0 else set()):
        raise ValueError(f"loss.objectives {sorted(chosen)} with loss.mlm_weight=0 leave nothing to train")
    return tuple(x for x in OBJECTIVES if x in chosen), lm_weight


def hist_weight(schedule: str, progress: float, ramp_epochs: float = 2.0) -> float:
    """w(t) of the named schedule at `progress` epochs (module doc)."""
    if schedule == "off":
        return 0.0
    if schedule == "constant":
        return 1.0
    return 1.0 - min(1.0, max(0.0, progress) / ramp_epochs)


class HistLoss(nn.Module):
    """`HistLoss(config, model)(model, batch, progress) -> {'loss', 'itc', ..., 'add', 'hist_weight'}`.

    L = L_vl + w(t) * sum of lambda * term over `terms`, a list of (name, lambda, term). Owns the
    `ItcLoss` (its queue with a momentum twin) and the shared-seed generator (saved with the
    checkpoint's RNG states as `_gen`); the temperature is the backbone's."""

    def __init__(self, config: HistLossConfig, model: VisionLanguageBackbone,
                 subject_ids: Tensor | None = None) -> None:
        """`subject_ids` [K]: token ids of the subject words the parse found in the training
        captions, masked at `mlm_subject_probability` (the trainer passes them)."""
        super().__init__()
        cfg = self.config = config
        #: the objectives every level sums (module doc), resolved against the backbone
        self.objectives, lm_weight = check_backbone(config, model)
        queue_size = config.queue_size if model.momentum_twin() is not None else 0
        self.itc = ItcLoss(model.embed_dim, queue_size) if "itc" in self.objectives else None
        #: the vision-language terms, in the order they run (and draw)
        self.vl_terms = {"itc": Itc(self.itc), "itm": Itm(cfg.itm_hard_negatives, cfg.itm_group_size),
                         "mlm": Lm(cfg.mlm_probability, cfg.mlm_subject_probability, subject_ids),
                         "rank": Rank(cfg.itm_group_size)}
        self.vl = CaptionTerm(self.objectives, lm_weight)
        layers = tuple(int(x) for x in (cfg.capture_layers or model.default_capture_layers))
        self.terms: list[tuple[str, float, TextTerm | AdditionTerm]] = [
            ("phrase", cfg.lambda_phrase, PhraseTerm(self.objectives, lm_weight)),
            ("subject", cfg.lambda_subject, SubjectTerm(self.objectives)),
            ("add", cfg.lambda_add, AdditionTerm(layers, cfg.capture_head, cfg.capture_combine, cfg.add_normalize)),
        ]
        # a level none of whose parts is an objective (the subject level of an LM-only objective) computes nothing
        self.terms = [entry for entry in self.terms if not isinstance(entry[2], TextTerm) or entry[2].parts_on]
        self._gen: torch.Generator | None = None

    def _uniform(self, *shape: int, device: torch.device) -> Tensor:
        """Uniforms for the local rows, drawn for the global batch ([world * n, ...]) from the
        shared-seed generator, then sliced: identical choices on 1 or many processes."""
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.config.seed)
        size = world()[1]
        return local_shard(torch.rand(shape[0] * size, *shape[1:], generator=self._gen, device=device))

    def _step(self, model: VisionLanguageBackbone, batch: HistBatch, progress: float, kinds: list[str]) -> Step:
        """The step's context: the images encoded once, each kind of text in `kinds` once."""
        cfg = self.config
        twin = model.momentum_twin()
        alpha = cfg.alpha * min(1.0, max(0.0, progress)) if twin is not None else 0.0  # ramped over epoch 0
        if twin is not None:
            model.update_momentum(cfg.momentum)
        image_embeds = model.encode_image(batch.pixel_values)  # [B, 1+P, Dv], once per image
        temp = image_feat = image_embeds_m = image_feat_m = None
        if isinstance(model, ContrastiveModel):
            temp = model.temp
            with torch.no_grad():
                temp.clamp_(0.001, 0.5)  # ALBEF clamps at every forward
            image_feat = model.image_features(image_embeds)    # [B, E] (or [B, K, E])
        if twin is not None:
            with torch.no_grad():
                image_embeds_m = twin.encode_image(batch.pixel_values)
                image_feat_m = twin.image_features(image_embeds_m)
        return Step(model, twin, batch, temp, alpha, image_embeds, image_embeds_m, image_feat, image_feat_m,
                    self._encode_texts(model, twin, batch, kinds), self._uniform)

    def _encode_texts(
        self, model: VisionLanguageBackbone, twin: MomentumTwin | None, batch: HistBatch, kinds: list[str],
    ) -> dict[str, EncodedText]:
        """Every kind through the text encoder at its own padded length (a subject is ~3
        tokens, a caption ~25: one call padded to the longest mostly encoded padding); without
        ITC and ITM the text encoder is not run (a decoder has none)."""
        unimodal = "itc" in self.objectives or "itm" in self.objectives  # the text encoder's readers
        return {k: EncodedText.encode(model, twin, getattr(batch, k), unimodal) for k in kinds}

    def forward(self, model: VisionLanguageBackbone, batch: HistBatch, progress: float) -> dict[str, Tensor]:
        with model.reusing_image_projections():  # the step's terms read the same images
            return self._forward(model, batch, progress)

    def _forward(self, model: VisionLanguageBackbone, batch: HistBatch, progress: float) -> dict[str, Tensor]:
        cfg = self.config
        w = hist_weight(cfg.schedule, progress, cfg.paper_ramp_epochs)
        # "off" (w = 0): the HIST terms are not computed at all. A zero-weight term is skipped
        # only if it draws nothing (the addition term, whose GradCAM is most of a HIST step):
        # skipping a text term would shift the shared-seed draws of every term after it
        on = [(n, lam, t) for n, lam, t in self.terms if lam != 0 or t.draws] if w > 0 else []
        text_terms = [self.vl] + [t for _, _, t in on if isinstance(t, TextTerm)]
        step = self._step(model, batch, progress, list(dict.fromkeys(t.kind for t in text_terms)))
        for part, vl_term in self.vl_terms.items():  # ITC, ITM, LM, each over every kind that needs it
            needed = list(dict.fromkeys(t.kind for t in text_terms if part in t.needs()))  # each kind once
            if needed:
                step.vl_losses.update(zip([(k, part) for k in needed], vl_term(step, needed)))
        total, out = self.vl(step)
        hist = None
        for _, lam, term in on:
            value, logged = term(step)
            out.update(logged)
            hist = lam * value if hist is None else hist + lam * value
        if hist is not None:
            total = total + w * hist
        zero = step.image_embeds.new_zeros(())
        for term in [self.vl] + [t for _, _, t in self.terms]:
            for key in term.names:
                out.setdefault(key, zero)
        if self.itc is not None:
            caps = step.texts[self.vl.kind]  # after every ITC term of this step has read the queue
            self.itc.enqueue(step.image_feat_m, caps.feat_m, batch.image_ids, caps.rows.image_index)
        out["loss"] = total
        out["hist_weight"] = torch.tensor(w)
        if step.temp is not None:
            out["temp"] = step.temp.detach()
        return out
