"""The training loop: one process, or many launched by `torchrun` / `accelerate launch`.

Many processes follow `hist_vlm.train.distributed`: the model is never wrapped in DDP's
reducer (it would silently skip the all-reduce of the GradCAM double-backward); parameters are
broadcast from rank 0 once, and gradients are all-reduced explicitly after backward.

Exactness: the data depend on (seed, epoch, index) only (`hist_vlm.data.dataset`), and the
torch RNG is re-seeded from (seed, step, micro-step) before every forward, the same on every
rank, so the losses' shared-seed draws (MLM masks, hard negatives) cover the global batch
identically whatever the process count, and a resumed run repeats exactly what an
uninterrupted one would have drawn. (Dropout masks are then equal across ranks for equal row
positions; they still differ from step to step.)
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from hist_vlm._io import atomic_write_text
from hist_vlm.train.checkpoint import (
    Position,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from hist_vlm.train.config import ConfigError, TrainConfig
from hist_vlm.train.distributed import Environment, allreduce_gradients, broadcast_parameters, setup_environment
from hist_vlm.train.model import check_checkpoint_given
from hist_vlm.train.optim import build_optimizer, build_scheduler, freeze, trainable_parameters
from hist_vlm.train.tasks import get_task


def step_seed(seed: int, step: int, micro: int) -> int:
    """The torch seed of one forward: a function of (seed, optimizer step, micro-step) only."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    last_log: dict[str, float] = field(default_factory=dict)
    skipped_images: int = 0
    checkpoint: Path | None = None
    start_step: int = 0    # the global step this call began at (a resumed run: its checkpoint's)


class _Log:
    """Loss terms averaged over the micro-steps since the last line and over all ranks;
    printed, appended to RUN/log.jsonl, and sent to TensorBoard when asked."""

    def __init__(self, run_dir: Path, env: Environment, tensorboard: bool) -> None:
        self.env = env
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.since, self.steps = time.perf_counter(), 0
        self.path = run_dir / "log.jsonl"
        self.writer = None
        if tensorboard and env.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("run.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            v = torch.as_tensor(v).detach().float().to(self.env.device)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def rewind(self, step: int) -> None:
        """On resume: keep only the complete lines up to the checkpoint's step, so the log
        reads as one uninterrupted run (a kill can leave later steps or half a line)."""
        if not (self.env.is_main and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", step + 1) <= step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def step_done(self) -> None:
        self.steps += 1

    def flush(self, step: int, epoch: float, lr: float, bar: tqdm) -> dict[str, float]:
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]) / self.count  # one host sync per line
        if self.env.world_size > 1:
            dist.all_reduce(values)
            values /= self.env.world_size
        now = time.perf_counter()
        record = {"step": step, "epoch": round(epoch, 4), "lr": lr, **dict(zip(keys, values.tolist())),
                  "sec_per_step": round((now - self.since) / max(1, self.steps), 4)}
        self.sums, self.count, self.since, self.steps = {}, 0, now, 0
        if self.env.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            terms = " ".join(f"{k} {record[k]:.4f}" for k in keys)
            bar.write(f"step {step} | epoch {epoch:.2f} | lr {lr:.2e} | {terms}")
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
            if self.writer is not None:
                for k in keys:
                    self.writer.add_scalar(f"train/{k}", record[k], step)
                self.writer.add_scalar("train/lr", lr, step)
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(
    config: TrainConfig, *, resume: bool = False, progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Run (or continue, with `resume`) the training described by `config`. `on_step(step,
    last_step)` is called after every optimizer step (a caller's own progress display)."""
    check_checkpoint_given(config.model)
    env = setup_environment(config.run.device)
    try:
        return Trainer(config, env, resume, progress, on_step).run()
    finally:
        if env.owns_process_group:
            dist.destroy_process_group()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run, in the order `run()` calls its parts: setup (here), `resume()`,
    `open_logs()`, then `step()` and `after_step()` until `stop_at`, and `finish()`.

    The process group is `train()`'s (it tears it down whatever fails); the trainer only reads it."""

    def __init__(self, cfg: TrainConfig, env: Environment, resume: bool, progress: bool,
                 on_step: Callable[[int, int], None] | None = None) -> None:
        """Setup: the run folder, the task's data, then seeded weights, objective, loader,
        optimizer and schedule."""
        if cfg.run.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"run.precision must be auto, bf16 or fp32, got {cfg.run.precision!r}")
        self.cfg, self.env, self.resuming, self.progress, self.on_step = cfg, env, resume, progress, on_step
        self.run_dir = Path(cfg.run.dir)
        self.found = latest_checkpoint(self.run_dir)
        if self.found is not None and not resume:
            raise ConfigError(f"{self.run_dir} already holds checkpoints: pass --resume, or set run.dir to a new folder")
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        task = get_task(cfg.task)(cfg, env, self.run_dir, resume)  # reads the data before the model: it may take its vocabulary from them
        _seed_everything(cfg.run.seed)  # the same initial weights on every rank (and broadcast below)

        self.model = task.build_model().to(env.device)
        freeze(self.model, cfg.optim.freeze)
        self.objective = task.objective(self.model).to(env.device)
        broadcast_parameters(self.model)
        broadcast_parameters(self.objective)
        named = trainable_parameters(self.model, self.objective)
        self.params = [p for _, p in named]
        self.sampler, self.loader = task.loader(self.model)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg.schedule.epochs * self.steps_per_epoch
        self.stop_at = self.total_steps if cfg.run.max_steps is None else min(self.total_steps, cfg.run.max_steps)
        self.optimizer = build_optimizer(named, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.schedule, self.total_steps)
        self.position = Position(seed=cfg.run.seed, global_batch=self.sampler.global_batch)
        bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and env.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def resume(self) -> None:
        """With `resume` and a checkpoint: its weights, optimizer, schedule, RNG states and data
        position, refused when the global batch or seed would change the data order."""
        cfg, env, found = self.cfg, self.env, self.found
        if self.resuming and found is not None:
            self.position, rng_states = load_checkpoint(
                found, model=self.model, objective=self.objective, optimizer=self.optimizer, scheduler=self.scheduler
            )
            if self.position.global_batch != self.sampler.global_batch or self.position.seed != cfg.run.seed:
                raise ConfigError(
                    f"{found} was trained with global batch {self.position.global_batch} and seed "
                    f"{self.position.seed}; this run has {self.sampler.global_batch} and {cfg.run.seed}: "
                    "the data order would change"
                )
            # per-rank states when the world size is unchanged; else rank 0's (the loss's shared-seed
            # generator is the same on every rank)
            set_rng_state(rng_states[env.rank if len(rng_states) == env.world_size else 0], self.objective)
        elif self.resuming and env.is_main:
            tqdm.write(f"nothing to resume in {self.run_dir}: starting from step 0")

    def open_logs(self) -> None:
        """RUN/config.yaml, the loss log rewound to the (resumed) position, the progress bar,
        and the result the steps fill in. After `resume()`: all of them start at its position."""
        cfg, env, step = self.cfg, self.env, self.position.global_step
        if env.is_main:
            atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.log = _Log(self.run_dir, env, cfg.run.tensorboard)
        self.log.rewind(step)
        self.bar = tqdm(total=self.total_steps, initial=step, disable=not (self.progress and env.is_main),
                        desc="train", unit="step", dynamic_ncols=True)
        self.result = TrainResult(self.run_dir, step, start_step=step)
        self.skipped_before, self.skipped_here = self.position.skipped_images, []

    def step(self, batches: Iterator, epochs_done: float) -> float:
        """One optimizer step: `grad_accum` forwards, each re-seeded from (seed, step, micro-step),
        and backwards; the gradient all-reduce, clipping, optimizer and scheduler steps; the data
        position one step on. Returns the learning rate the step used."""
        cfg, position = self.cfg, self.position
        for micro in range(cfg.optim.grad_accum):
            batch, skipped = next(batches)
            for path in skipped[: max(0, 5 - len(self.skipped_here))]:   # the first few, by name
                self.bar.write(f"warning: unreadable image skipped: {path}")
            self.skipped_here += skipped
            torch.manual_seed(step_seed(cfg.run.seed, position.global_step, micro))
            with self.autocast():
                terms = self.objective(self.model, batch.to(self.env.device), epochs_done)
            (terms["loss"] / cfg.optim.grad_accum).backward()
            self.log.add(terms)
        allreduce_gradients(self.params)
        if cfg.optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        position.global_step += 1
        position.step_in_epoch += 1
        if position.step_in_epoch == self.steps_per_epoch:
            position.epoch, position.step_in_epoch = position.epoch + 1, 0
        return lr

    def after_step(self, epochs_done: float, lr: float) -> bool:
        """The progress bar; a log line every `log_every` steps and a checkpoint every
        `save_every`, both at the last step too. True once training is done."""
        run, step = self.cfg.run, self.position.global_step
        self.bar.update(1)
        if self.on_step is not None:
            self.on_step(step, self.stop_at)
        self.log.step_done()
        done = step >= self.stop_at
        if step % run.log_every == 0 or done:
            self.result.last_log = self.log.flush(step, epochs_done, lr, self.bar)
        if step % run.save_every == 0 or done:
            self.position.skipped_images = self._skipped_images()
            self.result.checkpoint = self.checkpoint()
        return done

    def checkpoint(self) -> Path | None:
        """Rank 0 saves, with every rank's RNG state; all ranks wait for it."""
        env, cfg = self.env, self.cfg
        states = [None] * env.world_size
        if env.world_size > 1:
            dist.all_gather_object(states, rng_state(self.objective))
        else:
            states = [rng_state(self.objective)]
        path = None
        if env.is_main:
            path = save_checkpoint(
                self.run_dir, model=self.model,
                objective=self.objective, optimizer=self.optimizer, scheduler=self.scheduler, position=self.position,
                rng_states=states, config=cfg.to_dict(), keep=cfg.run.keep_checkpoints,
            )
        env.barrier()
        return path

    def _skipped_images(self) -> int:
        """Unreadable image loads so far: the resumed run's, and this one's over all ranks."""
        return self.skipped_before + _count(len(self.skipped_here), self.env)

    def finish(self) -> TrainResult:
        """Close the bar and the log; the result, with a word on skipped images."""
        self.bar.close()
        self.log.close()
        result = self.result
        result.global_step = self.position.global_step
        result.skipped_images = self._skipped_images()
        if self.env.is_main and result.skipped_images:
            example = f" (e.g. {self.skipped_here[0]})" if self.skipped_here else ""
            tqdm.write(f"skipped {result.skipped_images} unreadable image loads{example}")
        return result

    def run(self) -> TrainResult:
        """Resume, open the logs, then step epoch by epoch (the sampler placed at the position)."""
        self.resume()
        self.open_logs()
        self.model.train()
        self.objective.train()
        position = self.position
        while position.global_step < self.stop_at:
            self.sampler.set_position(position.epoch, position.step_in_epoch)
            batches = iter(self.loader)
            for _ in range(position.step_in_epoch, self.steps_per_epoch):
                epochs_done = position.epoch + position.step_in_epoch / self.steps_per_epoch
                lr = self.step(batches, epochs_done)
                if self.after_step(epochs_done, lr):
                    break
        return self.finish()


def _count(n: int, env: Environment) -> int:
    """`n` summed over ranks."""
    if env.world_size == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=env.device)
    dist.all_reduce(t)
    return int(t.item())

