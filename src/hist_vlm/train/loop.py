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

A run cannot be silently wrong: `run.dir` is held by one process for the whole run
(`hist_vlm.locks.folder_lock`, rank 0); a loss term or gradient that is inf or NaN stops it before
the optimizer step (`NonFiniteError`), and weights holding one never reach a checkpoint; `--resume`
continues from the newest checkpoint that reads back whole (naming any damaged newer one) and
refuses a config whose settings differ from the checkpoint's, except `RESUMABLE_KEYS`; Ctrl-C
stops with `TrainingInterrupted` (the newest complete checkpoint intact).
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from hist_vlm._io import atomic_write_text
from hist_vlm.locks import FolderInUseError, folder_lock
from hist_vlm.train.checkpoint import (
    Position,
    SavedStates,
    apply_checkpoint,
    latest_checkpoint,
    newest_loadable,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_folders,
)
from hist_vlm.train.config import ConfigError, TrainConfig, config_from_dict
from hist_vlm.train.errors import NonFiniteError, TrainingError, TrainingInterrupted
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
    last_step)` is called after every optimizer step (a caller's own progress display).

    `run.dir` is held for the whole run (a second process on it is a `FolderInUseError`, before
    anything is written there). Ctrl-C is a `TrainingInterrupted` naming the step reached."""
    check_checkpoint_given(config.model)
    env = setup_environment(config.run.device)
    trainer = None
    try:
        with _run_lock(Path(config.run.dir), env):
            try:
                trainer = Trainer(config, env, resume, progress, on_step)
                return trainer.run()
            except KeyboardInterrupt:
                newest = latest_checkpoint(config.run.dir)
                step = (trainer.position.global_step if trainer is not None
                        else int(newest.name.split("-")[1]) if newest is not None and resume else 0)
                raise TrainingInterrupted(step, str(newest) if newest is not None else None) from None
    finally:
        if env.owns_process_group:
            dist.destroy_process_group()


@contextmanager
def _run_lock(run_dir: Path, env: Environment) -> Iterator[None]:
    """Rank 0 holds `run_dir` for the block; every rank stops together when another process has it."""
    with ExitStack() as stack:
        error = None
        if env.is_main:
            try:
                stack.enter_context(folder_lock(run_dir, "training run"))
            except FolderInUseError as e:
                error = e
        _raise_together(env, error)
        yield


def _raise_together(env: Environment, error: Exception | None) -> None:
    """Raise rank 0's `error` (None: go on) on every rank, so that no rank waits for one that stopped."""
    if env.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


#: settings `--resume` may change: how long the run goes on, how it reports and saves, where it
#: runs (and the folder's own path: a run folder may be moved; the permission to read images
#: outside data.image_root, which changes no data a run can train on). Any other change is
#: refused: the checkpoint's optimizer, schedule and data position were made by the saved
#: settings, and the run's config.yaml and checkpoints would record values it never trained with.
RESUMABLE_KEYS = ("run.max_steps", "run.log_every", "run.save_every", "run.keep_checkpoints", "run.tensorboard",
                  "run.device", "run.dir", "data.num_workers", "data.allow_absolute_paths")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def changed_settings(cfg: TrainConfig, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every setting `cfg` changes against a checkpoint's
    config, `RESUMABLE_KEYS` left out. The saved config is read as a file is (defaults of newer
    fields filled in, retired keys dropped) when it still can be."""
    try:
        old = _flat(config_from_dict(saved).to_dict())
    except ConfigError:
        old = _flat(saved)
    new, missing = _flat(cfg.to_dict()), "(unset)"
    return [(k, old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)
            and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)]


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
        folders = step_folders(self.run_dir)
        if folders and not resume:
            raise ConfigError(f"{self.run_dir} already holds checkpoints: pass --resume, or set run.dir to a new folder")
        # read back (and the settings compared) before anything is built: a refused resume
        # rebuilds no synthetic world
        self.saved: SavedStates | None = None
        if resume and folders:
            self.saved = newest_loadable(self.run_dir, self._warn)
            if self.saved is None:
                raise ConfigError(f"no checkpoint in {self.run_dir / 'checkpoints'} can be read back (each is named "
                                  "above): move that folder away to train from step 0")
            changed = changed_settings(cfg, self.saved.config)
            if changed:
                shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in changed[:6])
                more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
                raise ConfigError(f"--resume continues {self.saved.path.name} with its own settings; "
                                  f"changed: {shown}{more}. "
                                  f"Only {', '.join(RESUMABLE_KEYS)} may change on resume (docs/training.md); "
                                  "train into a new run.dir instead")
        self.found = self.saved.path if self.saved is not None else None
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
        if self.saved is not None:   # where the run stands from the start (an interrupt names it)
            self.position = replace(self.saved.position)
        bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and env.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def resume(self) -> None:
        """With `resume` and a checkpoint: its weights, optimizer, schedule, RNG states and data
        position, refused when the global batch or seed would change the data order."""
        cfg, env, found = self.cfg, self.env, self.found
        if self.resuming and self.saved is not None:
            saved, self.saved = self.saved, None   # the states are not kept once applied
            apply_checkpoint(saved, model=self.model, objective=self.objective, optimizer=self.optimizer,
                             scheduler=self.scheduler)
            self.position, rng_states = saved.position, saved.rng
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
        bad: dict[str, torch.Tensor] = {}   # per loss term: inf/NaN in any micro-step
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
            for k, v in terms.items():
                flag = ~torch.isfinite(torch.as_tensor(v).detach()).all()
                bad[k] = bad[k] | flag if k in bad else flag
        allreduce_gradients(self.params)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.env.device)
        self._check_finite(bad, norm.to(self.env.device))
        if cfg.optim.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, cfg.optim.max_grad_norm, norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        position.global_step += 1
        position.step_in_epoch += 1
        if position.step_in_epoch == self.steps_per_epoch:
            position.epoch, position.step_in_epoch = position.epoch + 1, 0
        return lr

    def _check_finite(self, bad: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Stop before the optimizer step when a loss term or the gradient holds inf or NaN (on
        any rank: one host sync, and every rank stops together)."""
        keys = sorted(bad)
        flags = torch.stack([bad[k].to(grad_norm.device) for k in keys] + [~torch.isfinite(grad_norm)]).float()
        if self.env.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        *term_flags, grad_flag = flags.tolist()
        if not any(term_flags) and not grad_flag:
            return
        step = self.position.global_step + 1
        terms = [k for k, f in zip(keys, term_flags) if f]
        what = (f"non-finite loss at step {step}: {', '.join(terms)}" if terms
                else f"non-finite gradient at step {step} (every loss term finite)")
        newest = latest_checkpoint(self.run_dir)
        kept = f"newest checkpoint: {newest}" if newest is not None else "no checkpoint was saved"
        raise NonFiniteError(f"{what}; stopped before the optimizer step and saved nothing of it ({kept}); "
                             "a lower optim.lr or an optim.max_grad_norm may help")

    def _warn(self, line: str) -> None:
        if self.env.is_main:
            print(line, file=sys.stderr, flush=True)

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
        path = error = None
        if env.is_main:
            try:
                path = save_checkpoint(
                    self.run_dir, model=self.model,
                    objective=self.objective, optimizer=self.optimizer, scheduler=self.scheduler, position=self.position,
                    rng_states=states, config=cfg.to_dict(), keep=cfg.run.keep_checkpoints,
                )
            except TrainingError as e:   # a full disk, weights of inf/NaN: every rank stops
                error = e
        _raise_together(env, error)   # also the barrier: every rank waits for the save
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
        try:
            while position.global_step < self.stop_at:
                self.sampler.set_position(position.epoch, position.step_in_epoch)
                batches = iter(self.loader)
                for _ in range(position.step_in_epoch, self.steps_per_epoch):
                    epochs_done = position.epoch + position.step_in_epoch / self.steps_per_epoch
                    lr = self.step(batches, epochs_done)
                    if self.after_step(epochs_done, lr):
                        break
        except BaseException:   # the bar and TensorBoard closed before the one-line error
            self.bar.close()
            self.log.close()
            raise
        return self.finish()


def _count(n: int, env: Environment) -> int:
    """`n` summed over ranks."""
    if env.world_size == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=env.device)
    dist.all_reduce(t)
    return int(t.item())

