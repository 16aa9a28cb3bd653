"""Rank 0's full fp32 copy of the training weights, gathered from the ZeRO partitions, and the EMA of it.

How the EMA stays correct under every ZeRO stage. Every `ema_every` steps all ranks take part in gathering
the fp32 master values: each rank writes the fragments of the masters it holds (DeepSpeed's tensor-fragment
API, for ZeRO 1, 2, 3 and the bf16 optimiser alike) into a zeroed flat buffer, and one reduce to rank 0 per
256 MB bucket assembles them (under ZeRO-0 in fp32 every parameter is whole and nothing is sent). Rank 0 copies
them into a plain CPU `DiffusionStage` and folds that into `imagen_core.ema.EMA`. One reduce per bucket rather
than DeepSpeed's `safe_get_full_fp32_param`, an all-reduce per parameter: on 2 CPU ranks (gloo) the demo base's
253 collectives took 0.38 s per update under ZeRO 1 and 2, 57-59% of a training step; one reduce takes 0.02 s
and gives bit-identical weights (bench/bench_ema.py).

Why this rather than a per-partition EMA: it is the same code for every stage and precision, averages the
fp32 masters (not bf16-rounded weights), and the EMA is an ordinary full model that rank 0 samples with,
validates and exports without further communication. The cost is one reduce of the model per update
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
        import torch.distributed as dist

        target = dict(self.module.named_parameters()) if self.module is not None else {}
        for bucket in _buckets(list(engine.module.named_parameters()), GATHER_BUCKET_NUMEL):
            flat = None  # no parameter of the bucket partitioned (ZeRO-0 in fp32): every rank has them whole
            if any(_partitioned(param) for _, param in bucket):
                flat = torch.zeros(sum(_full_numel(p) for _, p in bucket), dtype=torch.float32, device=engine.device)
                offset = 0
                for _, param in bucket:
                    if (fragment := _local_fp32_fragment(param)) is not None:
                        start, values = fragment
                        flat.narrow(0, offset + start, values.numel()).copy_(values.reshape(-1))
                    offset += _full_numel(param)
                # Fragments are disjoint and zero elsewhere, so the sum is each value exactly (x + 0 == x).
                dist.reduce(flat, dst=0)
            if self.module is None:
                continue
            offset = 0
            for name, param in bucket:
                numel = _full_numel(param)
                # A parameter DeepSpeed does not partition (frozen, or ZeRO-0 in fp32) is whole and is the master.
                value = flat.narrow(0, offset, numel) if _partitioned(param) else param.detach().reshape(-1)
                target[name].copy_(value.reshape(target[name].shape))
                offset += numel
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


GATHER_BUCKET_NUMEL = 64 * 2**20
"""Elements per reduce of the gather: 256 MB of fp32 on every rank at a time (the 2B base takes 31 reduces)."""


def _partitioned(param: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed holds this parameter's fp32 master in partitions (ZeRO 1-3, the bf16/fp16 optimisers)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _full_numel(param: torch.nn.Parameter) -> int:
    return param.ds_numel if hasattr(param, "ds_id") else param.numel()


def _local_fp32_fragment(param: torch.nn.Parameter) -> tuple[int, torch.Tensor] | None:
    """(offset in the flattened parameter, fp32 values) of the master's part this rank holds, or None when it
    holds none; DeepSpeed's tensor-fragment API, the same one `safe_get_full_fp32_param` reads before its
    per-parameter all-reduce."""
    if hasattr(param, "ds_id"):  # ZeRO-3: rank r holds elements [r * P, (r + 1) * P) of the padded flat tensor
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(param).reshape(-1)
        start = dist.get_rank() * local.numel()
        valid = max(0, min(local.numel(), param.ds_numel - start))
        return (start, local[:valid]) if valid else None
    mapping = getattr(param, "_hp_mapping", None)  # ZeRO 1/2 and the 16-bit optimisers; None: not on this rank
    return None if mapping is None else (mapping.lp_fragment_address.start, mapping.get_hp_fragment())


def _buckets(params: list[tuple[str, torch.nn.Parameter]], limit: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive groups of parameters of at most `limit` elements (a larger parameter is a group alone)."""
    groups: list[list[tuple[str, torch.nn.Parameter]]] = [[]]
    size = 0
    for item in params:
        numel = _full_numel(item[1])
        if groups[-1] and size + numel > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += numel
    return [g for g in groups if g]
