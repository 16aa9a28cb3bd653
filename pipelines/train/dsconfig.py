"""The DeepSpeed JSON a run uses: a shipped config (pipelines/train/deepspeed/, package data) or a path to a .json
file, plus TrainConfig's overrides, resolved once.

Resolved on the driver (so the exact dict is written to `deepspeed.json` beside the outputs) and handed to every
worker. What is resolved here:
- keys starting with "_" (comments) are dropped;
- overrides from ScalingConfig (ZeRO stage, micro-batch, accumulation, clipping);
- the precision: ScalingConfig.precision, or with "auto" the JSON's `bf16.enabled` ("auto" -> true on GPU, false
  on CPU) and `fp16.enabled`; exactly one of `bf16`/`fp16` ends up enabled, or neither (fp32). DeepSpeed keeps
  fp32 master weights and optimiser state under both; fp16 gets dynamic loss scaling unless the JSON sets a
  scale, and never DeepSpeed's input `auto_cast` (the U-Net casts its inputs itself: imagen_core/unet.py);
- `train_batch_size` = micro-batch x accumulation x workers (DeepSpeed checks the three agree);
- `zero_allow_untested_optimizer`: we pass a torch optimiser object, which DeepSpeed does not list as tested.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipelines.train.config import ADAFACTOR_NEEDS_ZERO0, FP16_NEEDS_GPU, TrainConfig

DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"
"""The shipped DeepSpeed JSONs (zero0.json .. zero3.json), installed with the package. To edit one, copy it
anywhere and name the copy by its path (`scaling.deepspeed_config = "my/zero2.json"`)."""


def deepspeed_json_path(name_or_path: str) -> Path:
    """`zero2` -> the shipped zero2.json (DEEPSPEED_DIR); anything ending in .json is a path."""
    if name_or_path.endswith(".json"):
        path = Path(name_or_path)
    else:
        path = DEEPSPEED_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")) if DEEPSPEED_DIR.is_dir() else []
        raise FileNotFoundError(
            f"DeepSpeed config {name_or_path!r} not found at {path}; use one of the shipped {known} "
            f"({DEEPSPEED_DIR}) or a path to a .json file"
        )
    return path


def _strip_comments(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_comments(v) for k, v in value.items() if not k.startswith("_")}
    return value


def load_deepspeed_json(name_or_path: str) -> dict[str, Any]:
    path = deepspeed_json_path(name_or_path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return _strip_comments(raw)


def resolve_deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """The exact dict every worker passes to deepspeed.initialize."""
    scaling = config.scaling
    ds = copy.deepcopy(load_deepspeed_json(scaling.deepspeed_config))
    source = scaling.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(
                f"DeepSpeed config {source!r} has an {section!r} section; remove it: the optimiser and learning-rate "
                "schedule come from TrainConfig.optim / TrainConfig.schedule (a torch optimiser is passed to "
                "deepspeed.initialize so nothing JIT-compiles)"
            )
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        raise ValueError(
            f"DeepSpeed config {source!r} offloads to CPU: offload needs DeepSpeedCPUAdam (a JIT-compiled op), "
            "which this trainer does not build; remove offload_optimizer/offload_param"
        )
    overrides = {
        "train_micro_batch_size_per_gpu": scaling.micro_batch_size,
        "gradient_accumulation_steps": scaling.grad_accum_steps,
        "gradient_clipping": scaling.gradient_clipping,
    }
    ds.update({k: v for k, v in overrides.items() if v is not None})
    if scaling.zero_stage is not None:
        zero["stage"] = scaling.zero_stage
    zero.setdefault("stage", 0)
    if zero["stage"] not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config {source!r}: zero_optimization.stage must be 0-3, got {zero['stage']!r}")
    if config.optim.kind == "adafactor" and zero["stage"] != 0:
        raise ValueError(ADAFACTOR_NEEDS_ZERO0)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if not isinstance(ds.get(key), int) or ds[key] < 1:
            raise ValueError(f"DeepSpeed config {source!r}: {key} must be a positive int, got {ds.get(key)!r}")
    ds.setdefault("gradient_clipping", 0.0)
    ds["train_batch_size"] = (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * scaling.num_workers
    )
    precision = resolve_precision(ds, config)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    if precision == "fp16" or "fp16" in ds:
        ds["fp16"] = {**FP16_DEFAULTS, **ds.get("fp16", {}), "enabled": precision == "fp16", "auto_cast": False}
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    return ds


FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1}
"""DeepSpeed's fp16 section where the JSON leaves it out: loss_scale 0 = dynamic, starting at 2**16."""


def resolve_precision(ds: dict[str, Any], config: TrainConfig) -> str:
    """"bf16", "fp16" or "fp32": ScalingConfig.precision, or with "auto" what the JSON enables (bf16 "auto" is
    bf16 on GPU and fp32 on CPU)."""
    scaling, source = config.scaling, config.scaling.deepspeed_config
    if scaling.precision != "auto":
        return scaling.precision
    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    fp16 = ds.get("fp16", {}).get("enabled", False)
    if bf16 not in (True, False, "auto") or fp16 not in (True, False):
        raise ValueError(
            f"DeepSpeed config {source!r}: bf16.enabled must be true, false or \"auto\" and fp16.enabled true or "
            f"false, got {bf16!r} and {fp16!r}"
        )
    if fp16 and bf16 is True:
        raise ValueError(f"DeepSpeed config {source!r} enables both bf16 and fp16; enable one (or set "
                         "scaling.precision)")
    if fp16:
        if not scaling.use_gpu:
            raise ValueError(f"DeepSpeed config {source!r} enables fp16: " + FP16_NEEDS_GPU)
        return "fp16"
    if bf16 == "auto":
        return "bf16" if scaling.use_gpu else "fp32"
    return "bf16" if bf16 else "fp32"


def precision_dtype(ds_config: dict[str, Any]) -> Any:
    """The torch dtype of the engine's weights under a resolved DeepSpeed config."""
    import torch

    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config["zero_optimization"]["stage"])
