"""TrainConfig validation, the DeepSpeed JSON resolution and the learning-rate schedule (no Ray, no DeepSpeed)."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

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
                       text_encoder=TextEncoderConfig(name="imagen-asset:tiny-t5", max_length=16))


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
        ScalingConfig(precision="fp16")  # bf16 is allowed on CPU; fp16 is not (DeepSpeed refuses it)
    with pytest.raises(ValueError, match="tuple"):
        DataConfig(paths="data/")
    with pytest.raises(ValueError, match="betas"):
        OptimConfig(betas=(0.9, 1.0))


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_fused_optimizer_steps_as_the_plain_loop(kind: str) -> None:
    import torch

    from pipelines.train.engine import build_optimizer

    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(3)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    trained = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optim = build_optimizer(params, OptimConfig(kind=kind, lr=1e-2, weight_decay=0.1, fused=fused))
        assert optim.defaults["fused"] is (True if fused else None)  # None: torch's per-tensor loop on CPU
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optim.step()
        trained[fused] = params
    for fused_p, loop_p in zip(trained[True], trained[False]):
        torch.testing.assert_close(fused_p, loop_p, rtol=1e-6, atol=1e-7)
    assert not torch.equal(trained[True][0], start[0])


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

    from pipelines.tracking import TrackingUnavailable, check_tracking

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port}"):
        check_tracking(f"http://127.0.0.1:{port}", timeout_s=10)
    assert time.monotonic() - start < 10


def test_a_resumed_training_keeps_its_mlflow_run(tmp_path) -> None:
    from pipelines.tracking import TrackingUnavailable, check_tracking
    from pipelines.train.tracking import open_run

    with pytest.raises(TrackingUnavailable, match="does not exist"):  # a typo in the path, not a new directory
        check_tracking(f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_tracking(uri)
    run_id = open_run(uri, "exp", "r", tmp_path, resume=False)
    assert open_run(uri, "exp", "r", tmp_path, resume=True) == run_id  # a resumed training keeps its run
    assert open_run(uri, "exp", "r", tmp_path, resume=False) != run_id


# -- config files: stages by recipe, --set overrides, the shipped cluster configs ----------------------------
CLUSTER_TRAIN = pathlib.Path(__file__).resolve().parents[1] / "cluster" / "train"


@pytest.mark.parametrize("name", ["paper_base_2b", "paper_sr256_600m", "paper_sr1024_400m"])
def test_shipped_cluster_configs_train_the_paper_stages_with_the_paper_recipe(name) -> None:
    from imagen_core.config_io import load_file
    from imagen_core.recipes import stage_recipe

    config = TrainConfig.from_dict(load_file(str(CLUSTER_TRAIN / f"{name}.toml")))
    assert config.stage == stage_recipe(name)  # by name: the file restates nothing of the model
    scaling = config.scaling
    assert scaling.num_workers * scaling.micro_batch_size * scaling.grad_accum_steps == 2048  # the paper's batch
    assert (config.optim.lr, config.schedule.warmup_steps, config.total_steps) == (1e-4, 10_000, 2_500_000)
    assert config.optim.weight_decay == 0.0 and scaling.use_gpu and scaling.precision == "bf16"
    assert config.optim.ema_decay ** (1 / config.optim.ema_every) == pytest.approx(0.9999, abs=1e-6)
    assert resolve_deepspeed_config(config)["train_batch_size"] == 2048


def test_stage_by_recipe_with_overrides_and_clear_errors(tmp_path) -> None:
    from imagen_core.config_io import ConfigError
    from imagen_core.recipes import stage_tiny_base

    data = dataclasses.asdict(make_config(tmp_path))
    data["stage"] = {"recipe": "tiny_base", "unet": {"dropout": 0.1}, "guidance_scale": 2.0}
    config = TrainConfig.from_dict(data)
    expected = stage_tiny_base()
    assert config.stage == dataclasses.replace(expected, unet=dataclasses.replace(expected.unet, dropout=0.1),
                                               guidance_scale=2.0)
    with pytest.raises(ConfigError, match=r"unknown recipe 'paper_base'.*paper_base_2b"):
        TrainConfig.from_dict({**data, "stage": "paper_base"})
    with pytest.raises(ConfigError, match=r"stage.unet: unknown key 'dropuot'"):
        TrainConfig.from_dict({**data, "stage": {"recipe": "tiny_base", "unet": {"dropuot": 0.1}}})


def test_set_overrides_read_toml_values_and_reach_recipe_fields(tmp_path) -> None:
    from imagen_core.config_io import ConfigError, apply_override

    data = {**dataclasses.asdict(make_config(tmp_path)), "stage": "tiny_base"}
    config = TrainConfig.from_dict(data, [
        "total_steps=12", "optim.lr=3e-4", "data.paths=['a', 'b']", "stage.unet.dropout=0.2",
        "tracking.experiment=imagen-smoke", "scaling.gradient_clipping=0.5", "resume=true",
    ])
    assert (config.total_steps, config.optim.lr, config.data.paths) == (12, 3e-4, ("a", "b"))
    assert config.stage.unet.dropout == 0.2 and config.tracking.experiment == "imagen-smoke"
    assert config.scaling.gradient_clipping == 0.5 and config.resume is True
    assert TrainConfig.from_dict(data, ["stage=tiny_sr"]).stage.lowres_size == 16  # a recipe swapped by --set
    assert apply_override({}, "a.b.c=1") == {"a": {"b": {"c": 1}}}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_override({}, "total_steps")
    with pytest.raises(ConfigError, match="total_steps is 12, not a table"):
        apply_override({"total_steps": 12}, "total_steps.x=1")
    with pytest.raises(ConfigError, match="optim: unknown key"):
        TrainConfig.from_dict(data, ["optim.learning_rate=1e-4"])
