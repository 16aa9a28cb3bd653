"""`train_stage`: one cascade stage trained with DeepSpeed ZeRO on Ray Train, tracked in MLflow.

The driver resolves and writes the configs, checks MLflow, builds the Ray datasets and runs a `TorchTrainer`
whose workers run `loop.train_loop_per_worker`. Stages are independent runs (their own output_dir and
run_name) and can run at the same time on one Ray cluster.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.ray_env import RayConfig, init_ray
from pipelines.step import atomic_write_json
from pipelines.tracking import check_tracking
from pipelines.train import tracking
from pipelines.train.config import TrainConfig
from pipelines.train.data import build_dataset, parquet_files, ray_data_config, text_embed_dim
from pipelines.train.dsconfig import resolve_deepspeed_config
from pipelines.train.loop import EXPORT_DIR, WorkerSpec, train_loop_per_worker

logger = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
DEEPSPEED_FILE = "deepspeed.json"


class RunExists(RuntimeError):
    """A run with this name is already in storage and resume was not asked for."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    checkpoint_dir: str | None
    """The latest Ray Train checkpoint (DeepSpeed shards, EMA, data position) in storage: a local path, or a URL
    (s3://bucket/...) when the checkpoint storage is an object store."""
    export_dir: str
    """The consolidated stage checkpoint: model.safetensors (EMA), train.safetensors, config.json. An absolute
    local path or, for an object-store output_dir, its URL (s3://.../export): pass it to
    `pipelines.registry.register.register_stage` or `pipelines.registry.checkpoints.read_manifest`, which take both."""
    mlflow_run_id: str
    metrics: dict[str, Any]
    """Rank 0's metrics reported with the last checkpoint (loss, val_loss, ...)."""


def _absolute_storage(storage_path: str) -> str:
    """URIs as they are; local paths absolute (workers run in other directories than the driver)."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def checkpoint_uri(storage_path: str, path: str) -> str:
    """A Ray Train checkpoint's path on its filesystem as a URI: pyarrow's "bucket/key" gets the storage's scheme."""
    if "://" not in storage_path or "://" in path:
        return path
    return f"{storage_path.split('://', 1)[0]}://{path.lstrip('/')}"


def run_exists(storage_path: str, run_name: str) -> bool:
    return (storage.path(_absolute_storage(storage_path)) / run_name).exists()


def prepare_run(config: TrainConfig) -> tuple[dict[str, Any], list[str], int]:
    """Checks that need no cluster: DeepSpeed config, data contract, run-name clash. Writes the resolved configs."""
    ds_config = resolve_deepspeed_config(config)
    files = parquet_files(config.data.paths)
    embed_dim = text_embed_dim(files)
    if embed_dim != config.stage.unet.text_embed_dim:
        raise ValueError(
            f"the training data's text embeddings have D={embed_dim} but stage {config.stage.name!r} expects "
            f"unet.text_embed_dim={config.stage.unet.text_embed_dim}; embed with the stage's text encoder"
        )
    if run_exists(config.storage_path, config.run_name) and not config.resume:
        raise RunExists(
            f"run {config.run_name!r} already exists in {config.storage_path}; pass resume=True (--resume) to "
            "continue it, or choose another run_name"
        )
    output_dir = storage.path(config.output_dir)
    output_dir.mkdir()
    atomic_write_json(output_dir / CONFIG_FILE, config.to_dict())
    atomic_write_json(output_dir / DEEPSPEED_FILE, ds_config)
    return ds_config, files, embed_dim


def check_cpu_budget(config: TrainConfig) -> None:
    """Ray Data needs CPUs beside the train workers (its file-listing task asks for a whole CPU): on a small
    machine, workers reserving every CPU would leave the input pipeline waiting for ever. Fail instead."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    reserved = config.scaling.num_workers * config.scaling.cpus_per_worker
    if total - reserved < 1.0:
        raise ValueError(
            f"the Ray cluster has {total:g} CPUs and the {config.scaling.num_workers} train workers reserve "
            f"{reserved:g}: Ray Data needs at least 1 CPU beside them (its file-listing task asks for one). Lower "
            "scaling.cpus_per_worker (e.g. 0.5) or give Ray more CPUs"
        )


def build_trainer(config: TrainConfig, spec: WorkerSpec, files: list[str]) -> Any:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    stage = config.stage
    datasets = {
        split: build_dataset(files, split, config.data, stage.image_size, stage.lowres_size, config.seed)
        for split in ("train",)
    }
    scaling = config.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=_absolute_storage(config.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray_data_config(),
    )


def train_stage(config: TrainConfig, ray_config: RayConfig = RayConfig(), *,
                mlflow_tags: dict[str, str] | None = None) -> TrainResult:
    """Train (or with config.resume, continue) one stage; returns where its checkpoints and export are.

    `mlflow_tags` go on a new MLflow run (a pipeline run nests the training under itself with
    `mlflow.parentRunId`); they are not part of the config because they never change what is trained.
    """
    ds_config, files, embed_dim = prepare_run(config)
    output_dir = storage.path(config.output_dir)
    uri = config.tracking_uri
    check_tracking(uri, timeout_s=15.0)
    run_id = tracking.open_run(uri, config.tracking.experiment, config.run_name, output_dir, config.resume,
                               tags=mlflow_tags)
    config_files = [output_dir / CONFIG_FILE, output_dir / DEEPSPEED_FILE]
    tracking.log_config(uri, run_id, config.to_dict(), ds_config, config_files)
    init_ray(ray_config)
    if ray_config.address is None:  # a local Ray we started: its CPUs are all there will be
        check_cpu_budget(config)
    spec = WorkerSpec(config=config, deepspeed=ds_config, embed_dim=embed_dim, mlflow_run_id=run_id, tracking_uri=uri)
    try:
        result = build_trainer(config, spec, files).fit()
    except BaseException:
        tracking.finish_run(uri, run_id, None, "FAILED")
        raise
    export_dir = output_dir / EXPORT_DIR
    tracking.finish_run(uri, run_id, export_dir, "FINISHED")
    return TrainResult(
        checkpoint_dir=checkpoint_uri(config.storage_path, result.checkpoint.path) if result.checkpoint else None,
        export_dir=str(export_dir),
        mlflow_run_id=run_id,
        metrics=dict(result.metrics or {}),
    )
