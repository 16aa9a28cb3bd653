"""Rank 0's full fp32 copy of the training weights, gathered from the ZeRO partitions, and the EMA of it.

How the EMA stays correct under every ZeRO stage. Every `ema_every` steps all ranks take part in gathering
each parameter's fp32 master value (`deepspeed.utils.safe_get_full_fp32_param`: an all-reduce of the
partitions, for ZeRO 1, 2, 3 and the bf16 optimiser alike; under ZeRO-0 in fp32 the parameter itself is the
whole master), rank 0 copies it into a plain CPU `DiffusionStage` and folds that into `imagen_core.ema.EMA`.

Why this rather than a per-partition EMA: it is the same code for every stage and precision, averages the
fp32 masters (not bf16-rounded weights), and the EMA is an ordinary full model that rank 0 samples with,
validates and exports without further communication. The cost is one all-reduce of the model per update
(amortised by ema_every) and two fp32 copies in rank 0's host memory (16 GB for the 2B base: host RAM, not
GPU memory). A per-partition EMA would save that host memory but needs DeepSpeed's internal partition
layout to export, and differs between stages.

The EMA is saved apart from the training weights and only ever loaded into the EMA (imagen-pytorch #138).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from imagen_core.ema import EMA
from imagen_core.stage import DiffusionStage, StageConfig


class FullWeights:
    """The gathered copy and its EMA on rank 0; other ranks only take part in the gathers."""

    def __init__(self, stage: StageConfig, rank: int, warmup: bool = True) -> None:
        self.rank = rank
        self.module: DiffusionStage | None = DiffusionStage(stage).eval().requires_grad_(False) if rank == 0 else None
        self.ema: EMA | None = None
        self._warmup = warmup

    @torch.no_grad()
    def gather(self, engine: Any) -> None:
        """Collective: every rank must call it at the same point. Leaves the current fp32 weights in
        `self.module` on rank 0."""
        from deepspeed.utils import safe_get_full_fp32_param

        target = dict(self.module.named_parameters()) if self.module is not None else {}
        for name, param in engine.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is None:  # ZeRO-0 in fp32: the parameter is whole and is the master
                full = param.detach()
            if self.module is not None:
                target[name].copy_(full.reshape(target[name].shape))
        if self.module is not None:
            buffers = dict(self.module.named_buffers())
            for name, buffer in engine.module.named_buffers():  # never partitioned
                if name in buffers:
                    buffers[name].copy_(buffer)

    def start_ema(self) -> None:
        """Begin the average at the gathered weights (rank 0), before the first step or a restore."""
        if self.module is not None:
            self.ema = EMA(self.module, warmup=self._warmup)

    def update_ema(self, decay: float) -> None:
        """Fold the gathered weights into the EMA (after a `gather`)."""
        if self.ema is not None:
            self.ema.update(self.module, decay)

    @contextlib.contextmanager
    def ema_weights(self, device: torch.device) -> Iterator[DiffusionStage]:
        """The module with the EMA weights on `device` (the training weights come back on exit)."""
        with self.on_device(device) as module, self.ema.swap(module):
            yield module

    @contextlib.contextmanager
    def on_device(self, device: torch.device) -> Iterator[DiffusionStage]:
        """The module moved to the training device for validation or sampling, then back to host memory."""
        self.module.to(device)
        try:
            yield self.module
        finally:
            self.module.to("cpu")
