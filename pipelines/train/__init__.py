"""Training one cascade stage with DeepSpeed ZeRO on Ray Train (see trainer.train_stage).

Modules: config (TrainConfig), dsconfig (the DeepSpeed JSON, resolved), data (Ray Data input), decode (the
functions the input pipeline runs, torch-free), engine (DeepSpeed engine, optimiser, schedule), weights (gathered
weights + EMA), checkpointing, validation, tracking (MLflow), ledger, loop (per-worker loop), trainer
(TorchTrainer wiring).
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "OptimConfig",
    "ScalingConfig",
    "ScheduleConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainResult",
    "train_stage",
]
_CONFIG = {"CheckpointConfig", "DataConfig", "OptimConfig", "ScalingConfig", "ScheduleConfig", "TrackingConfig",
           "TrainConfig"}


def __getattr__(name: str) -> Any:
    # Loaded when asked for: the configs import torch (through imagen_core's StageConfig), which the processes that
    # only unpickle the training input's functions (pipelines.train.decode) never need; Ray, DeepSpeed and MLflow
    # load only when training is asked for, not when a config is built.
    if name in _CONFIG:
        from pipelines.train import config

        return getattr(config, name)
    if name in ("train_stage", "TrainResult"):
        from pipelines.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'pipelines.train' has no attribute {name!r}")
