"""The protocol every training task follows (`hist_vlm.train.tasks` finds them by name)."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn
from torch.utils.data import DataLoader

from hist_vlm.data.dataset import GlobalBatchSampler
from hist_vlm.train.config import TrainConfig
from hist_vlm.train.distributed import Environment


class TrainingTask(Protocol):
    """Constructed before the loop seeds the RNGs (it reads the data, which a derived
    vocabulary needs), then asked, in this order, for the model, its objective and its batches.

    The objective is called as `objective(model, batch, epochs_done) -> {"loss": ..., term: ...}`;
    every entry is logged, "loss" is the one differentiated.
    """

    def __init__(self, cfg: TrainConfig, env: Environment, run_dir: Path, resume: bool) -> None: ...

    def build_model(self) -> nn.Module: ...

    def objective(self, model: nn.Module) -> nn.Module: ...

    def loader(self, model: nn.Module) -> tuple[GlobalBatchSampler, DataLoader]:
        """This rank's batches: the sampler cuts global batches (and places resumed runs)."""
        ...
