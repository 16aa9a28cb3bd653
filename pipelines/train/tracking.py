"""MLflow: one run per stage training, created by the driver, logged to by rank 0 during training.

The driver checks the tracking URI first (`pipelines.tracking.check_tracking`: a wrong URI fails in seconds with
a clear message, not after the cluster spent an hour), creates or reopens the run (its id is kept in
<output_dir>/mlflow_run.json, so a resumed training continues the same run), logs the resolved config as params and JSON artifacts, and at the
end the exported checkpoint. Rank 0 logs metrics, validation losses and sample grids through `RunLogger`.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.storage import StoragePath
from pipelines.tracking import experiment_id, flatten_params

RUN_FILE = "mlflow_run.json"


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_run(uri: str, experiment: str, run_name: str, output_dir: str | os.PathLike | StoragePath, resume: bool,
             tags: dict[str, str] | None = None) -> str:
    """The MLflow run id of this stage training: the stored one when resuming, else a new run with `tags`
    (a pipeline run passes `mlflow.parentRunId` to nest it under its step)."""
    client = _client(uri)
    record = storage.path(output_dir) / RUN_FILE
    if resume and record.exists():
        run_id = record.read_json()["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id(client, uri, experiment), run_name=run_name, tags=tags)
    from pipelines.step import atomic_write_json

    atomic_write_json(record, {"run_id": run.info.run_id, "tracking_uri": uri, "experiment": experiment})
    return run.info.run_id


def log_config(uri: str, run_id: str, config: dict[str, Any], ds_config: dict[str, Any],
               files: list[str | os.PathLike | StoragePath]) -> None:
    """Params (flattened resolved config, the DeepSpeed one under "deepspeed.") and the JSON files as artifacts.
    On resume the params are already there (MLflow refuses to change them): only new ones are added."""
    from mlflow.entities import Param

    client = _client(uri)
    existing = client.get_run(run_id).data.params
    params = {**flatten_params("", config), **flatten_params("deepspeed", ds_config)}
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), 100):
        client.log_batch(run_id, params=new[start:start + 100])
    for path in files:
        with local_copy(path) as local:
            client.log_artifact(run_id, str(local), artifact_path="config")


@contextlib.contextmanager
def local_copy(path: str | os.PathLike | StoragePath) -> Iterator[Path]:
    """A file or folder as a local path: itself on a local disk, else a download kept for the block."""
    where = storage.path(path)
    if where.is_local:
        yield where.local
        return
    with tempfile.TemporaryDirectory(prefix="mlflow-upload-") as tmp:
        target = Path(tmp) / where.name
        if where.is_file():
            target.write_bytes(where.read_bytes())
        else:
            where.download_to(target)
        yield target


def finish_run(uri: str, run_id: str, export_dir: str | os.PathLike | StoragePath | None, status: str) -> None:
    """Log the export (downloaded first when it is in an object store) and end the run with `status`."""
    client = _client(uri)
    if export_dir is not None and storage.path(export_dir).is_dir():
        with local_copy(export_dir) as local:
            client.log_artifacts(run_id, str(local), artifact_path="export")
    client.set_terminated(run_id, status=status)


class RunLogger:
    """Rank 0's handle on the run: metrics, PNG sample grids, small JSON artifacts."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = _client(uri)
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def artifact_bytes(self, data: bytes, artifact_path: str, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
