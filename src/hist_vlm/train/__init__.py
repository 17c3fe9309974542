"""hist_vlm.train: the training loop (`train`), its typed YAML config and resumable checkpoints.

    from hist_vlm.train import load_config, train
    result = train(load_config("demo_tiny", ["run.max_steps=10"])  # a preset name or a YAML path, resume=False)
"""
from hist_vlm.train.config import ConfigError, TrainConfig, load_config
from hist_vlm.train.loop import TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "load_config", "train"]
