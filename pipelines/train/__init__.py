"""Training one cascade stage with DeepSpeed ZeRO on Ray Train (see trainer.train_stage).

Modules: config (TrainConfig), dsconfig (the DeepSpeed JSON, resolved), data (Ray Data input), engine
(DeepSpeed engine, optimiser, schedule), weights (gathered weights + EMA), checkpointing, validation,
tracking (MLflow), ledger, loop (per-worker loop), trainer (TorchTrainer wiring).
"""
from __future__ import annotations

from typing import Any

from pipelines.train.config import (
    CheckpointConfig,
    DataConfig,
    OptimConfig,
    ScalingConfig,
    ScheduleConfig,
    TrackingConfig,
    TrainConfig,
)

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


def __getattr__(name: str) -> Any:
    # Ray, DeepSpeed and MLflow load only when training is asked for, not when a config is built.
    if name in ("train_stage", "TrainResult"):
        from pipelines.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'pipelines.train' has no attribute {name!r}")
