"""The DeepSpeed engine of one worker: the stage module, a torch optimiser, the warm-up + cosine schedule.

DeepSpeed wraps the model from outside (imagen_core knows nothing of it). A torch optimiser object is passed
to deepspeed.initialize, so no FusedAdam/CPUAdam op is JIT-compiled (about 36 s on first use on a 2-core CPU machine).
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from imagen_core.stage import DiffusionStage
from pipelines.train.config import ADAFACTOR_NEEDS_ZERO0, OptimConfig, ScheduleConfig, TrainConfig


def lr_factor(step: int, schedule: ScheduleConfig, total_steps: int) -> float:
    """Multiplier of the peak lr before optimiser step `step` (0-based): linear warm-up, then cosine decay
    to min_lr_ratio at total_steps (or constant)."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant" or total_steps <= schedule.warmup_steps:
        return 1.0
    progress = min(1.0, (step - schedule.warmup_steps) / (total_steps - schedule.warmup_steps))
    return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: Any, optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.kind in ("adam", "adamw"):
        adam = torch.optim.Adam if optim.kind == "adam" else torch.optim.AdamW
        # Not fused: None, torch's own choice (its foreach loop on GPU, the per-tensor loop on CPU); False would
        # also turn foreach off.
        return adam(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                    fused=optim.fused or None)
    # torch's Adafactor: the step is min(lr, 1/sqrt(step)) times the parameter's RMS (relative step sizes).
    return torch.optim.Adafactor(params, lr=optim.lr, weight_decay=optim.weight_decay)


def noise_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of the noise (t, eps, condition drop, augmentation level) of one micro-batch: a resumed run
    draws exactly what the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def skip_unused_deepspeed_ops() -> None:
    """Leave out DeepSpeed's shared-memory all-reduce op: it serves CPU inference (tensor parallelism), is
    JIT-compiled with g++ on its first use on a machine (about 21 s on 2 cores, twice as long on a busy one) and is
    loaded by every process-group set-up (each rank of each fit); training collectives go through
    torch.distributed (gloo on CPU, NCCL on GPU) either way."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # read by deepspeed.comm's TorchBackend


def build_engine(config: TrainConfig, ds_config: dict[str, Any]) -> Any:
    """deepspeed.initialize on the process group Ray Train created (gloo on CPU, NCCL on GPU)."""
    import deepspeed

    skip_unused_deepspeed_ops()

    sixteen_bit = ds_config["bf16"]["enabled"] or ds_config.get("fp16", {}).get("enabled", False)
    flattened = ds_config["zero_optimization"]["stage"] != 0 or sixteen_bit
    if config.optim.kind == "adafactor" and flattened:
        # DeepSpeed's 16-bit optimiser wrappers may flatten parameter groups too, like ZeRO 1-3.
        raise ValueError(ADAFACTOR_NEEDS_ZERO0 + " (and fp32: DeepSpeed's bf16/fp16 optimisers may flatten as well)")
    # Every rank builds the same initial weights: ZeRO-3 partitions each rank's own copy (0-2 also broadcast).
    # They are built in fp32; under bf16/fp16 DeepSpeed casts them and keeps fp32 masters, and the U-Net casts
    # its inputs to its weights' dtype (imagen_core/unet.py), so the loop feeds fp32 batches either way.
    torch.manual_seed(config.seed)
    model = DiffusionStage(config.stage_config)
    optimizer = build_optimizer(model.parameters(), config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.schedule, config.total_steps)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine


def manual_grad_norm(engine: Any) -> float:
    """Global grad norm where DeepSpeed does not record one (ZeRO-0 in fp32): grads are already all-reduced
    (averaged) at the accumulation boundary, so every rank computes the same number."""
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def grad_norm_recorded(engine: Any) -> bool:
    """Whether engine.get_global_grad_norm() is set after a step (every ZeRO stage, bf16 and fp16; not ZeRO-0
    fp32)."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def _numel(tensors: Any) -> int:
    return int(sum(t.numel() for t in tensors))


def memory_stats(engine: Any) -> dict[str, float]:
    """What this rank holds, measured from the engine (numbers of elements) and the process.

    optimizer_state_numel: tensors in the torch optimiser's state (Adam: exp_avg + exp_avg_sq); under ZeRO 1-3
    DeepSpeed gives the optimiser only this rank's flat partition, so this halves with 2 ranks.
    param_numel: parameter elements held by this rank (ZeRO-3: the partition `ds_tensor`, plus the whole value of
        parameters below stage3_param_persistence_threshold, which stay on every rank; else whole parameters).
    master_numel: fp32 master copy held by this rank (ZeRO 1-3 / bf16 partitions; 0 when params are the master).
    """
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    params = list(engine.module.parameters())
    masters = (
        getattr(optimizer, "single_partition_of_fp32_groups", None)  # ZeRO 1-2
        or getattr(optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO 3
        or getattr(optimizer, "fp32_groups_flat_partition", None)  # BF16_Optimizer
        or [t for group in getattr(optimizer, "fp32_groups", []) for t in group]  # ZeRO 0 + bf16/fp16 (unfused)
        or []
    )
    stats = {
        "optimizer_state_numel": _numel(state),
        "param_numel": sum(_held_numel(p) for p in params),
        "master_numel": _numel(masters),
        "rss_bytes": _rss_bytes(),
    }
    if torch.cuda.is_available() and engine.device.type == "cuda":
        stats["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(engine.device)
    return stats


def _held_numel(param: torch.nn.Parameter) -> int:
    if not hasattr(param, "ds_tensor"):
        return param.numel()
    return param.ds_tensor.numel() + (param.ds_numel if param.ds_persist else 0)


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
