"""How a training run stops when it cannot go on: one line each, which the CLI prints as
`error: ...` with the exit code the error carries (a config mistake is `config.ConfigError`).
"""
from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that cannot go on (a checkpoint the disk cannot take, ...); the message is one line
    and says what was kept."""

    exit_code = 2


class NonFiniteError(TrainingError):
    """A loss term, gradient or weight became inf or NaN: the run stops before the optimizer
    step (or the save) that would have spread it, and no checkpoint of it is written."""

    exit_code = 1


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training: `step` optimizer steps were done; the newest complete
    checkpoint is intact and `--resume` continues from it. Still a KeyboardInterrupt, so a caller
    that stops on those stops on this too."""

    exit_code = 130

    def __init__(self, step: int, checkpoint: str | None) -> None:
        kept = f" (newest complete checkpoint: {checkpoint})" if checkpoint else " (no checkpoint yet)"
        super().__init__(f"interrupted at step {step}; resume with --resume{kept}")
        self.step, self.checkpoint = step, checkpoint
