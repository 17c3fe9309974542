"""The VQA task of the trainer (`task: vqa`): ALBEF's VQA fine-tuning from a pretrained backbone.

It supplies what the loop asks of a task (model, objective, batches); checkpoints, resume,
logging, schedules and many-process training are the loop's, exactly as for HIST.
"""
from __future__ import annotations

import sys
from pathlib import Path

from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hist_vlm.data.dataset import GlobalBatchSampler
from hist_vlm.data.vqa import VqaBatch, VqaCollate, VqaDataset, VqaFileError, VqaRecord, read_answer_list, read_vqa_files
from hist_vlm.plugins import generator
from hist_vlm.train.config import ConfigError, TrainConfig, VqaConfig
from hist_vlm.train.data import recipe, synthetic_world
from hist_vlm.train.model import build_model

SYNTHETIC_DIR = "vqa_world"


class VqaObjective(nn.Module):
    """ALBEF's VQA step: momentum update, then the weighted answer loss with distillation
    (alpha ramped linearly over the first epoch, as ALBEF's warm-up)."""

    def __init__(self, cfg: VqaConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, model, batch: VqaBatch, progress: float) -> dict[str, Tensor]:
        alpha = self.cfg.alpha * min(1.0, max(0.0, progress)) if self.cfg.distill else 0.0
        if self.cfg.distill:
            model.update_momentum(self.cfg.momentum)
        loss = model.answer_loss(batch.pixel_values, batch.questions, batch.answers, batch.weights, alpha)
        return {"loss": loss}


def vqa_files(cfg: TrainConfig, run_dir: Path, is_main: bool, barrier) -> tuple[list[Path], dict[str, Path], Path | None]:
    """(training files, image root per dataset, answer list or None); the synthetic set is
    generated once, on rank 0, into RUN/vqa_world/ (a later run reuses it while its recipe,
    `vqa.synthetic`, is unchanged: `hist_vlm.train.data.synthetic_world`), by the demo's
    "vqa_world" generator (`hist_vlm.plugins`)."""
    vqa = cfg.vqa
    if vqa.synthetic.enabled:
        try:
            generate_vqa_world = generator("vqa_world", "vqa.synthetic.enabled=true")
        except LookupError as e:
            raise ConfigError(str(e)) from None
        root, syn = run_dir / SYNTHETIC_DIR, vqa.synthetic
        if is_main:
            synthetic_world(root, recipe(syn), root / "answer_list.json", "vqa.synthetic", lambda: generate_vqa_world(
                root, syn.n_train, syn.n_val, syn.n_test, syn.image_size, syn.seed))
        barrier()
        return [root / "vqa_train.json"], {"vqa": root, "vg": root}, root / "answer_list.json"
    if not vqa.train_files:
        raise ConfigError("vqa.train_files is empty: give ALBEF's vqa_train.json (, vqa_val.json, vg_qa.json) "
                          "or set vqa.synthetic.enabled=true")
    files = [Path(f) for f in vqa.train_files]
    for key, value in (("vqa.image_root", vqa.image_root), ("vqa.vg_image_root", vqa.vg_image_root)):
        if value and not Path(value).is_dir():
            raise ConfigError(f"{key}: folder not found: {value}")
    roots = {"vqa": Path(vqa.image_root or files[0].parent), "vg": Path(vqa.vg_image_root or vqa.image_root or files[0].parent)}
    return files, roots, Path(vqa.answer_list) if vqa.answer_list else None


def vocabulary_words(records: list[VqaRecord], answers: list[str]) -> list[str]:
    """Every word the run tokenizes (questions, answers, candidates), cut as the tokenizer cuts."""
    from hist_vlm.models.tokenization import build_vocab, SPECIAL_TOKENS

    texts = [r.question for r in records] + [a for r in records for a in r.answers] + answers
    return build_vocab(texts)[len(SPECIAL_TOKENS):]


class VqaTask:
    """Reads the files (before the loop seeds and builds), then builds model, objective, batches."""

    def __init__(self, cfg: TrainConfig, env, run_dir: Path, resume: bool) -> None:
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        files, self.roots, answer_list = vqa_files(cfg, run_dir, env.is_main, env.barrier)
        try:
            self.records = read_vqa_files(files, allow_absolute_paths=cfg.data.allow_absolute_paths)
            self.candidates = read_answer_list(answer_list) if answer_list else []
        except VqaFileError as e:
            raise ConfigError(str(e)) from None

    def build_model(self) -> nn.Module:
        """The backbone (`model.checkpoint`, or from scratch) turned into the VQA model, ALBEF's
        decoder initialisation; `model.derive_vocab` gives a whole-word vocabulary the VQA words."""
        from hist_vlm.models import get_backbone
        from hist_vlm.models.tokenization import SPECIAL_TOKENS, write_vocab_file

        cfg = self.cfg
        head = get_backbone(cfg.model.name).heads.get("vqa")
        if head is None:
            raise ConfigError(f"task vqa: the {cfg.model.name} backbone has no VQA model")
        words = vocabulary_words(self.records, self.candidates) if cfg.model.derive_vocab else []
        vocab = vocab_file = None
        if words and cfg.model.checkpoint is None:   # from scratch: the VQA texts' own vocabulary
            vocab = [*SPECIAL_TOKENS, *words]
            vocab_file = self.run_dir / "vocab.txt"
            if self.env.is_main:
                write_vocab_file(vocab, vocab_file)
            self.env.barrier()
            words = []
        model_cfg = cfg.model if cfg.model.checkpoint is None else _without_derive(cfg.model)
        backbone = build_model(model_cfg, cfg.data.image_size, vocab, vocab_file)
        head = get_backbone(backbone.name).heads.get("vqa", head)   # a variant's own (albef_demo's)
        try:
            model, report = head.from_backbone(
                backbone, decoder_layers=cfg.vqa.decoder_layers, distill=cfg.vqa.distill, extra_words=words,
                vocab_dir=self.run_dir, source=str(cfg.model.checkpoint or "a new backbone"))
        except ValueError as e:
            raise ConfigError(f"vqa: {e}") from None
        if self.env.is_main:
            print(report, file=sys.stderr)
        return model

    def objective(self, model: nn.Module) -> nn.Module:
        return VqaObjective(self.cfg.vqa)

    def loader(self, model) -> tuple[GlobalBatchSampler, DataLoader]:
        cfg, env = self.cfg, self.env
        sampler = GlobalBatchSampler(len(self.records), cfg.data.batch_size, world_size=env.world_size,
                                     rank=env.rank, grad_accum=cfg.optim.grad_accum, seed=cfg.run.seed)
        dataset = VqaDataset(self.records, self.roots, cfg.data.image_size, seed=cfg.run.seed,
                             crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip,
                             allow_absolute_paths=cfg.data.allow_absolute_paths)
        collate = VqaCollate(model.tokenize_question, model.tokenize_answers, cfg.data.max_length)
        if env.is_main:
            tqdm.write(f"VQA: {len(self.records)} questions, {sampler.steps_per_epoch} steps per epoch")
        return sampler, DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                   num_workers=cfg.data.num_workers, pin_memory=env.device.type == "cuda")


def _without_derive(model_cfg):
    """The backbone loads with its own saved vocabulary; the VQA words are added afterwards."""
    from dataclasses import replace

    return replace(model_cfg, derive_vocab=False)
