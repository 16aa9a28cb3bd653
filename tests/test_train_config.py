"""TrainConfig validation, the DeepSpeed JSON resolution and the learning-rate schedule (no Ray, no DeepSpeed)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from imagen_core.recipes import unet_tiny
from imagen_core.stage import StageConfig
from imagen_core.text_encoder import TextEncoderConfig
from pipelines.train.config import (
    CheckpointConfig,
    DataConfig,
    OptimConfig,
    ScalingConfig,
    ScheduleConfig,
    TrainConfig,
)
from pipelines.train.dsconfig import DEEPSPEED_DIR, resolve_deepspeed_config
from pipelines.train.engine import lr_factor


def tiny_stage() -> StageConfig:
    return StageConfig(name="base", unet=dataclasses.replace(unet_tiny(), text_embed_dim=64),
                       text_encoder=TextEncoderConfig(name="tests/assets/tiny-t5", max_length=16))


def make_config(tmp_path, **changes) -> TrainConfig:
    base = dict(stage=tiny_stage(), output_dir=str(tmp_path / "out"), run_name="r", total_steps=100,
                data=DataConfig(paths=(str(tmp_path),)), schedule=ScheduleConfig(warmup_steps=10))
    return TrainConfig(**{**base, **changes})


def test_shipped_deepspeed_configs_resolve_with_overrides(tmp_path) -> None:
    assert sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")) == ["zero0", "zero1", "zero2", "zero3"]
    for stage in range(4):
        cfg = make_config(tmp_path, scaling=ScalingConfig(num_workers=2, deepspeed_config=f"zero{stage}"))
        ds = resolve_deepspeed_config(cfg)
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["bf16"]["enabled"] is False  # "auto" on CPU
        assert not any(k.startswith("_") for k in ds)
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 2
    cfg = make_config(tmp_path, scaling=ScalingConfig(
        num_workers=4, use_gpu=True, deepspeed_config="zero1", zero_stage=3, micro_batch_size=3,
        grad_accum_steps=5, gradient_clipping=0.5))
    ds = resolve_deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    overridden = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]
    assert overridden == (3, 5, 0.5)
    assert ds["train_batch_size"] == 3 * 5 * 4


def test_deepspeed_config_errors_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="zero0"):
        resolve_deepspeed_config(make_config(tmp_path, scaling=ScalingConfig(deepspeed_config="zero9")))
    custom = tmp_path / "opt.json"
    custom.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="TrainConfig.optim"):
        resolve_deepspeed_config(make_config(tmp_path, scaling=ScalingConfig(deepspeed_config=str(custom))))
    custom.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ValueError, match="JIT-compiled"):
        resolve_deepspeed_config(make_config(tmp_path, scaling=ScalingConfig(deepspeed_config=str(custom))))
    with pytest.raises(ValueError, match="stage 0"):  # Adafactor on flat ZeRO partitions would change meaning
        resolve_deepspeed_config(make_config(tmp_path, optim=OptimConfig(kind="adafactor"),
                                             scaling=ScalingConfig(deepspeed_config="zero2")))
    assert resolve_deepspeed_config(make_config(tmp_path, optim=OptimConfig(kind="adafactor"),
                                                scaling=ScalingConfig(deepspeed_config="zero0")))


def test_train_config_validation(tmp_path) -> None:
    with pytest.raises(ValueError, match="stop_at_step"):
        make_config(tmp_path, stop_at_step=101)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_config(tmp_path, total_steps=5)
    with pytest.raises(ValueError, match="num_to_keep"):
        CheckpointConfig(num_to_keep=1)
    with pytest.raises(ValueError, match="stage 0"):
        make_config(tmp_path, optim=OptimConfig(kind="adafactor"), scaling=ScalingConfig(zero_stage=3))
    with pytest.raises(ValueError, match="use_gpu"):
        ScalingConfig(precision="bf16")
    with pytest.raises(ValueError, match="tuple"):
        DataConfig(paths="data/")
    with pytest.raises(ValueError, match="betas"):
        OptimConfig(betas=(0.9, 1.0))


def test_train_config_round_trips_through_json(tmp_path) -> None:
    cfg = make_config(tmp_path, scaling=ScalingConfig(num_workers=2, zero_stage=3, activation_checkpointing=True))
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.stage_config.unet.activation_checkpointing is True and cfg.stage.unet.activation_checkpointing is False
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({**cfg.to_dict(), "optim": {"learning_rate": 1.0}})


def test_lr_schedule_warmup_then_cosine() -> None:
    schedule = ScheduleConfig(warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(s, schedule, 14) for s in range(15)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert lr_factor(50, ScheduleConfig(warmup_steps=4, decay="constant"), 100) == 1.0


def test_unreachable_tracking_uri_fails_in_seconds() -> None:
    import socket
    import time

    from pipelines.train.tracking import TrackingUnavailable, check_tracking_uri

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port}"):
        check_tracking_uri(f"http://127.0.0.1:{port}", timeout_s=10)
    assert time.monotonic() - start < 10


def test_sqlite_tracking_uri_is_checked_and_created(tmp_path) -> None:
    from pipelines.train.tracking import check_tracking_uri, open_run

    uri = f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}"
    check_tracking_uri(uri)
    run_id = open_run(uri, "exp", "r", tmp_path, resume=False)
    assert open_run(uri, "exp", "r", tmp_path, resume=True) == run_id  # a resumed training keeps its run
    assert open_run(uri, "exp", "r", tmp_path, resume=False) != run_id
