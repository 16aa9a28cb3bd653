"""Typed configuration of one stage's training run (torchtitan-style nested dataclasses).

`TrainConfig` is data: it travels to the Ray Train workers as one object, is written next to the outputs
(`train_config.json`) and is rebuilt from that JSON with `TrainConfig.from_dict`. The DeepSpeed side is a
JSON file (pipelines/train/deepspeed/zero*.json, shipped with the package, or a path to your own) named by
`ScalingConfig.deepspeed_config`; the few fields a run commonly changes (ZeRO stage, micro-batch, accumulation,
clipping) can be overridden here, and `pipelines.train.dsconfig.resolve_deepspeed_config` writes the result to
`deepspeed.json` beside it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from imagen_core.stage import StageConfig

ZeroStage = Literal[0, 1, 2, 3]
OptimizerKind = Literal["adam", "adamw", "adafactor"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
LRDecay = Literal["cosine", "constant"]

ADAFACTOR_NEEDS_ZERO0 = (
    "optim.kind='adafactor' needs ZeRO stage 0: ZeRO 1-3 give the optimiser flat 1-D partitions, so Adafactor's "
    "factored second moment and its per-tensor RMS scaling would silently change meaning. Use a zero0 DeepSpeed "
    "config / scaling.zero_stage=0 (Adafactor's state is already small) or optim.kind='adam'/'adamw'."
)


FP16_NEEDS_GPU = (
    "ScalingConfig.precision='fp16' needs use_gpu=True: DeepSpeed 0.19's CPU accelerator refuses fp16 ('Type fp16 "
    "is not supported on your device'; it offers fp16 only where oneDNN has fp16 kernels). On CPU workers use "
    "precision='bf16' (supported, for tests and portability) or 'fp32'."
)


def _check_choice(name: str, value: Any, choices: Any) -> None:
    if value not in get_args(choices):
        raise ValueError(f"{name} must be one of {get_args(choices)}, got {value!r}")


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataConfig:
    """The embed step's Parquet, streamed by Ray Data into the workers."""

    paths: tuple[str, ...]
    """Parquet files or directories written by the embed step (key, caption, image, n_tokens, text_embedding),
    local or object-store URLs (s3://bucket/prefix)."""
    val_fraction: float = 0.02
    """Fraction of keys held out for the validation loss and sample grids, chosen by a hash of the key
    (stable across runs, stages and machines)."""
    val_max_samples: int = 256
    """At most this many held-out rows are used (the first ones in file order): validation stays cheap."""
    shuffle_buffer_rows: int = 256
    """Rows in each worker's local shuffle buffer; reseeded every epoch from (seed, epoch, rank)."""
    cpus_per_task: float = 0.25
    """CPUs each Ray Data read/decode task asks for. Fractional so data tasks fit beside the train workers
    on a small machine (with 1 CPU per task, 2 train workers on 2 CPUs starve Ray Data for ever)."""
    decode_batch_rows: int = 64
    """Rows per Ray Data decode task (images decoded, resized and centre-cropped there, never in the loop)."""
    prefetch_batches: int = 2
    """Micro-batches each worker prefetches while the current one trains."""
    materialize: bool = False
    """Decode the training split once into the Ray object store before training. For a small dataset (the demo's
    ~280 rows, 8 steps an epoch) Ray Data otherwise re-reads and re-decodes at every epoch start, and the
    workers waited for data ~45% of the time; the decoded split must fit in the object store."""
    train_crop: int | None = None
    """Train on square crops of this side of the stage's images, at a position drawn per sample and epoch (the
    low-res input cropped to match); validation, sampling and export stay at the full size. Imagen trained the
    256 -> 1024 stage on 256 crops (App. F). None: whole images."""
    ledger: bool = True
    """Write <output_dir>/ledger/rank<r>.jsonl: the keys and losses of every step (~50 bytes per sample per
    step), for auditing that each sample is seen once per epoch and that a resumed run saw what it should."""

    def __post_init__(self) -> None:
        if isinstance(self.paths, str) or not self.paths:
            raise ValueError("DataConfig.paths must be a non-empty tuple of Parquet files or directories")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check_positive("DataConfig", val_max_samples=self.val_max_samples,
                        shuffle_buffer_rows=self.shuffle_buffer_rows,
                        cpus_per_task=self.cpus_per_task, decode_batch_rows=self.decode_batch_rows)
        if self.prefetch_batches < 0:
            raise ValueError(f"DataConfig.prefetch_batches must be >= 0, got {self.prefetch_batches}")


@dataclasses.dataclass(kw_only=True, frozen=True)
class OptimConfig:
    """Optimiser and EMA. Paper (App. F): Adafactor for the base, Adam (0.9, 0.999, 1e-8) for the SR
    stages, lr 1e-4, no weight decay."""

    kind: OptimizerKind = "adam"
    """"adam" / "adamw" (torch, elementwise: exact under every ZeRO stage) or "adafactor" (torch.optim.Adafactor).
    Adafactor needs ZeRO stage 0: ZeRO 1-3 hand the optimiser flat 1-D partitions, which would silently
    turn its factored row/column second moments into an unfactored one."""
    lr: float = 1e-4
    """Peak learning rate, reached at the end of the warm-up."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW betas (paper: 0.9, 0.999; imagen-pytorch's 0.99 is a known deviation)."""
    eps: float = 1e-8
    """Adam/AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW/Adafactor); the paper uses none."""
    fused: bool = True
    """Adam/AdamW: torch's fused update (`fused=True`: one kernel per parameter tensor, on CPU and GPU) instead of
    its loop of elementwise ops per tensor; the same update rule. Measured on the fp32 CPU training step
    (bench/bench_peer.py base64, 2 threads): 0.350 -> 0.337 s per step. Adafactor has no fused form; ignored there."""
    ema_decay: float = 0.9999
    """EMA decay per update (with the EMA's warm-up cap (1 + n) / (10 + n))."""
    ema_every: int = 1
    """Update the EMA every this many optimiser steps (each update gathers the fp32 weights: see loop.py)."""

    def __post_init__(self) -> None:
        _check_choice("OptimConfig.kind", self.kind, OptimizerKind)
        _check_positive("OptimConfig", lr=self.lr, eps=self.eps, ema_every=self.ema_every)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"OptimConfig.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass(kw_only=True, frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up then cosine decay (paper: 10k warm-up steps)."""

    warmup_steps: int = 10_000
    """Optimiser steps of linear warm-up from lr/warmup_steps to lr."""
    decay: LRDecay = "cosine"
    """After warm-up: "cosine" down to min_lr_ratio * lr at TrainConfig.total_steps, or "constant"."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""

    def __post_init__(self) -> None:
        _check_choice("ScheduleConfig.decay", self.decay, LRDecay)
        if self.warmup_steps < 0:
            raise ValueError(f"ScheduleConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"ScheduleConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    """DeepSpeed checkpoints reported to Ray Train, and recovery."""

    every_steps: int = 1000
    """Save a checkpoint every this many optimiser steps (and always at the last step of a fit)."""
    num_to_keep: int = 3
    """Checkpoints kept in storage (the oldest are deleted); >= 2 so a damaged latest one has a fallback."""
    max_failures: int = 3
    """Worker failures Ray Train recovers from (restarting from the latest valid checkpoint) before giving up."""
    storage_path: str | None = None
    """Ray Train storage: a local path or any pyarrow/fsspec URI (s3://, gs://, ...). None: <output_dir>/ray."""

    def __post_init__(self) -> None:
        _check_positive("CheckpointConfig", every_steps=self.every_steps)
        if self.num_to_keep < 2:
            raise ValueError(
                f"CheckpointConfig.num_to_keep must be >= 2 (a truncated latest checkpoint falls back to the one "
                f"before it), got {self.num_to_keep}"
            )
        if self.max_failures < -1:
            raise ValueError(f"CheckpointConfig.max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")


@dataclasses.dataclass(kw_only=True, frozen=True)
class TrackingConfig:
    """MLflow, logged from rank 0 (the driver creates the run and logs the config and the export)."""

    tracking_uri: str | None = None
    """MLflow tracking URI (sqlite:///path/mlflow.db, http://host:5000). None: sqlite:///<output_dir>/mlflow.db."""
    experiment: str = "imagen-train"
    """MLflow experiment name."""
    log_every: int = 10
    """Log loss, lr, grad norm, throughput, data wait and memory every this many optimiser steps."""
    val_every: int = 500
    """Validation loss (EMA and training weights) every this many steps and at the end of each fit."""
    sample_every: int = 500
    """Sample grid (PNG artifact) every this many steps and at the end of each fit."""
    num_samples: int = 4
    """Held-out captions (the first ones by key order) sampled in each grid: the same prompts all run long."""
    sample_steps: int = 25
    """Sampler steps for the grids (the stage's sampler kind and guidance)."""
    val_timesteps: int = 8
    """Validation loss averages these fixed times t_k = (k + 0.5) / K: deterministic, unlike the training loss."""
    val_seed: int = 1234
    """Seed of the validation noise (per sample, from the key): the same number across runs and restarts."""

    def __post_init__(self) -> None:
        _check_positive("TrackingConfig", log_every=self.log_every, val_every=self.val_every,
                        sample_every=self.sample_every, num_samples=self.num_samples,
                        sample_steps=self.sample_steps, val_timesteps=self.val_timesteps)


@dataclasses.dataclass(kw_only=True, frozen=True)
class ScalingConfig:
    """Workers and the DeepSpeed engine each one runs."""

    num_workers: int = 1
    """Ray Train workers: one per GPU (or CPU processes with gloo when use_gpu is False)."""
    use_gpu: bool = False
    """One GPU per worker and NCCL; False runs CPU workers over gloo (tests, the demo)."""
    cpus_per_worker: float = 1.0
    """CPUs each train worker reserves; lower it on a small machine so Ray Data tasks get CPUs too."""
    deepspeed_config: str = "zero2"
    """A DeepSpeed JSON: a shipped one by name ("zero0".."zero3", pipelines/train/deepspeed/) or a path to a .json file."""
    zero_stage: ZeroStage | None = None
    """Override of zero_optimization.stage (0 is plain data parallel)."""
    micro_batch_size: int | None = None
    """Override of train_micro_batch_size_per_gpu."""
    grad_accum_steps: int | None = None
    """Override of gradient_accumulation_steps."""
    gradient_clipping: float | None = None
    """Override of gradient_clipping (global-norm clipping; 0 disables)."""
    precision: Precision = "auto"
    """"auto": bf16 on GPU, fp32 on CPU (or what the DeepSpeed JSON's bf16/fp16 sections enable). "bf16": bf16
    weights, activations and gradients; DeepSpeed keeps fp32 master weights and optimiser state, and the stage
    keeps the loss and the diffusion maths in fp32 (imagen_core/stage.py). On CPU, bf16 is for tests and
    portability (DeepSpeed's CPU accelerator supports it; it is rarely faster than fp32 there). "fp16": GPU only,
    with DeepSpeed's dynamic loss scaling; DeepSpeed 0.19 refuses fp16 on CPU ("Type fp16 is not supported on
    your device": its CPU accelerator offers fp16 only where oneDNN has fp16 kernels), so it is refused here.
    "fp32": no mixed precision."""
    activation_checkpointing: bool | None = None
    """Override of the stage's UNetConfig.activation_checkpointing (recompute blocks in backward)."""

    def __post_init__(self) -> None:
        _check_positive("ScalingConfig", num_workers=self.num_workers, cpus_per_worker=self.cpus_per_worker)
        if self.zero_stage is not None:
            _check_choice("ScalingConfig.zero_stage", self.zero_stage, ZeroStage)
        _check_choice("ScalingConfig.precision", self.precision, Precision)
        for name in ("micro_batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ScalingConfig.{name} must be >= 1, got {value}")
        if self.gradient_clipping is not None and self.gradient_clipping < 0:
            raise ValueError(f"ScalingConfig.gradient_clipping must be >= 0, got {self.gradient_clipping}")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError(FP16_NEEDS_GPU)


@dataclasses.dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """One stage's training run. Base and SR stages differ only in `stage` (and sizes)."""

    stage: StageConfig
    """The stage to train; stored with every export. In a config file: a recipe name (`stage = "paper_base_2b"`),
    a table with `recipe` and fields to override, or a whole StageConfig table."""
    output_dir: str
    """Directory for the resolved configs, the export, the ledger and worker status: a local (or shared POSIX)
    path or an object-store URL (s3://bucket/prefix; then give tracking.tracking_uri, an MLflow sqlite file
    cannot live in a bucket)."""
    run_name: str
    """Name of the run in Ray Train storage; the same name with resume=True continues it."""
    total_steps: int
    """Optimiser steps of the whole run (the length of the learning-rate schedule)."""
    stop_at_step: int | None = None
    """Stop this fit early at this step (checkpointed); a later fit with resume=True goes on to total_steps."""
    resume: bool = False
    """True: continue the run stored under run_name from its latest valid checkpoint (or start it if it does not
    exist yet, so a workflow can always pass it). False refuses a run that already exists."""
    seed: int = 0
    """Seeds the initial weights, the data order and every noise draw."""
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    scaling: ScalingConfig = ScalingConfig()

    def __post_init__(self) -> None:
        if not isinstance(self.stage, StageConfig):
            raise TypeError(f"TrainConfig.stage must be a StageConfig, got {type(self.stage).__name__}")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"TrainConfig.run_name must be a non-empty name without '/', got {self.run_name!r}")
        _check_positive("TrainConfig", total_steps=self.total_steps)
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.total_steps:
            raise ValueError(
                f"TrainConfig.stop_at_step must be in [1, total_steps={self.total_steps}], got {self.stop_at_step}"
            )
        if self.schedule.warmup_steps > self.total_steps:
            raise ValueError(
                f"ScheduleConfig.warmup_steps {self.schedule.warmup_steps} exceeds total_steps {self.total_steps}"
            )
        if self.optim.kind == "adafactor" and self.scaling.zero_stage not in (None, 0):
            raise ValueError(ADAFACTOR_NEEDS_ZERO0)
        if (crop := self.data.train_crop) is not None:
            stage, align = self.stage, self.sr_factor
            multiple = math.lcm(align, 2**stage.unet.num_downsamples)
            if not 0 < crop < stage.image_size or crop % multiple:
                raise ValueError(
                    f"DataConfig.train_crop {crop} must be below the stage's image_size {stage.image_size} and a "
                    f"multiple of {multiple} (the SR factor {align} and the U-Net's 2**{stage.unet.num_downsamples})"
                )

    @property
    def last_step(self) -> int:
        """The step this fit stops at."""
        return self.stop_at_step if self.stop_at_step is not None else self.total_steps

    @property
    def stage_config(self) -> StageConfig:
        """The stage with the scaling overrides applied (activation checkpointing)."""
        if self.scaling.activation_checkpointing is None:
            return self.stage
        unet = dataclasses.replace(self.stage.unet, activation_checkpointing=self.scaling.activation_checkpointing)
        return dataclasses.replace(self.stage, unet=unet)

    @property
    def sr_factor(self) -> int:
        """image_size // lowres_size of a super-resolution stage; 1 for a base stage."""
        return self.stage.image_size // (self.stage.lowres_size or self.stage.image_size)

    @property
    def train_crop(self) -> Any:
        """The training crop (pipelines.train.data.RandomCrop) or None."""
        if self.data.train_crop is None:
            return None
        from pipelines.train.data import RandomCrop

        return RandomCrop(size=self.data.train_crop, seed=self.seed, align=self.sr_factor)

    @property
    def storage_path(self) -> str:
        if self.checkpoint.storage_path:
            return self.checkpoint.storage_path
        return f"{self.output_dir.rstrip('/')}/ray" if "://" in self.output_dir else str(Path(self.output_dir) / "ray")

    @property
    def tracking_uri(self) -> str:
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        if "://" in self.output_dir:
            raise ValueError(
                f"TrainConfig.output_dir {self.output_dir} is an object-store URL: give tracking.tracking_uri "
                "(an MLflow server, or sqlite:///<local path>); the default sqlite:///<output_dir>/mlflow.db needs "
                "a local output_dir")
        return f"sqlite:///{Path(self.output_dir).resolve() / 'mlflow.db'}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: Sequence[str] = ()) -> "TrainConfig":
        """Rebuild from `to_dict()` output, its JSON, or a TOML file's tables (imagen_core.config_io checks
        every key and type and names the bad one). `stage` may name a recipe, with overrides
        (imagen_core.recipes.stage_table); `overrides` are `dotted.key=value` strings applied after that."""
        from imagen_core.config_io import apply_override, build
        from imagen_core.recipes import stage_table

        def resolved(data: dict[str, Any]) -> dict[str, Any]:
            return {**data, "stage": stage_table(data["stage"])} if "stage" in data else data

        data = resolved(data)  # first, so that `stage.unet.dropout=0.1` overrides a field of the recipe
        for assignment in overrides:
            data = apply_override(data, assignment)
        return build(cls, resolved(data))  # again, for `stage=tiny_base` given as an override
