"""`task: hist`: the HIST / ALBEF objectives (`HistLoss`) on `hist-vlm parse` output."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hist_vlm.data.dataset import GlobalBatchSampler, HistCollate, HistDataset, ImageRecord, read_parse_output
from hist_vlm.losses.hist import HistLoss, check_backbone
from hist_vlm.models.base import MaskedLanguageModel
from hist_vlm.train.config import ConfigError, TrainConfig
from hist_vlm.train.data import prepare_data
from hist_vlm.train.distributed import Environment
from hist_vlm.train.model import build_model, derive_vocabulary


def subject_token_ids(model: MaskedLanguageModel, records: list[ImageRecord]) -> torch.Tensor:
    """[K] the distinct token ids of every subject word the parse found in `records`, without
    the model's never-masked specials: what `loss.mlm_subject_probability` masks."""
    words = sorted({rec.captions[ci][start:end] for rec in records for ci, start, end, _ in rec.subject_spans})
    if not words:
        return torch.zeros(0, dtype=torch.long)
    ids, mask = model.tokenize(words)
    found = set(ids[mask.bool()].tolist()) - set(model.mask_tokens.never_mask)
    return torch.tensor(sorted(found), dtype=torch.long)


class HistTask:
    """The HIST / ALBEF objectives on `hist-vlm parse` output (every preset but the VQA ones)."""

    def __init__(self, cfg: TrainConfig, env: Environment, run_dir: Path, resume: bool) -> None:
        self.cfg, self.env = cfg, env
        phrases, self.image_root = prepare_data(cfg.data, run_dir, env.is_main, env.barrier)
        self.records, dropped = read_parse_output(phrases, self.image_root,
                                                  allow_absolute_paths=cfg.data.allow_absolute_paths)
        if dropped and env.is_main:
            tqdm.write(f"{dropped} images of {phrases} have no phrase and are left out")
        self.vocab, self.vocab_file = derive_vocabulary(cfg.model, self.records, run_dir, resume=resume,
                                                        is_main=env.is_main, barrier=env.barrier)

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg.model, self.cfg.data.image_size, self.vocab, self.vocab_file)

    def objective(self, model) -> torch.nn.Module:
        """`HistLoss`; a `loss.*` setting the model cannot honour (a capture layer or head it does
        not have, an objective or language term it cannot compute) is a ConfigError here, before any step."""
        try:
            _, lm_weight = check_backbone(self.cfg.loss, model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.cfg.loss.mlm_weight is None and lm_weight == 0 and self.env.is_main:
            tqdm.write(f"note: no language (MLM/LM) term: the {model.name} backbone has no language head "
                       "(loss.mlm_weight is unset; set it to 0 to silence this, or give a model with one)")
        subject_ids = None
        if self.cfg.loss.mlm_subject_probability is not None and isinstance(model, MaskedLanguageModel):
            subject_ids = subject_token_ids(model, self.records)
        return HistLoss(self.cfg.loss, model, subject_ids)

    def loader(self, model) -> tuple[GlobalBatchSampler, DataLoader]:
        """This rank's batches: the sampler cuts global batches, the collate tokenizes."""
        cfg, env = self.cfg, self.env
        sampler = GlobalBatchSampler(
            len(self.records), cfg.data.batch_size, world_size=env.world_size, rank=env.rank,
            grad_accum=cfg.optim.grad_accum, seed=cfg.run.seed,
        )
        dataset = HistDataset(
            self.records, self.image_root, cfg.data.image_size, seed=cfg.run.seed,
            crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip, swap_negatives=cfg.data.swap_negatives,
            allow_absolute_paths=cfg.data.allow_absolute_paths,
        )
        collate = HistCollate(model.tokenize, cfg.data.max_length, cfg.data.pad_to_max_length)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                            pin_memory=env.device.type == "cuda")
        return sampler, loader
