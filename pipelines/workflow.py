"""A pipeline run as named steps: one parent MLflow run, one nested run per step.

Ray Workflows was removed after Ray 2.47. A step's durable state is its output manifest (pipelines/step.py):
written last and atomically, keyed by the hash of the step's config and inputs, so calling a finished step
returns its manifest at once and a killed step redoes only its unfinished shards. This module adds the record of
the run as a whole:
- the parent run's id is kept in `<run_dir>/pipeline_run.json`, so a resumed run continues the same parent run;
- a step is a function returning its manifest (a dict with the step's "key"). It is recorded as a nested run
  tagged with its name and key, with the seconds it took, the manifest's numbers as metrics and the manifest as
  an artifact. A step that logs its own MLflow run (stage training, the curation report) returns that run's id
  as "mlflow_run_id", and that run is nested under the parent as the step's record;
- a step already recorded under this parent with the same key is not recorded again, so a resumed run adds
  nested runs only for the steps that did work; a failing step is recorded FAILED with its error, the parent is
  marked FAILED, and the error propagates.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

from pipelines import storage
from pipelines.step import atomic_write_json
from pipelines.storage import StoragePath
from pipelines.tracking import check_tracking, experiment_id, flatten_params

log = logging.getLogger("imagen.workflow")

PIPELINE_RUN_FILE = "pipeline_run.json"
PARENT_TAG = "mlflow.parentRunId"
"""The tag MLflow's UI nests runs by."""
STEP_TAG = "imagen.step"
KEY_TAG = "imagen.step_key"
ERROR_TAG_LIMIT = 5000
"""MLflow's limit on a tag value is 8,000 characters; an error message is cut well below it."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class StepRecord:
    """What one call of a step did, as the run's summary reports it."""

    name: str
    key: str
    seconds: float
    mlflow_run_id: str
    """The nested run that records the step."""
    recorded_now: bool
    """False when an earlier attempt of this run had already recorded the step with this key."""


def manifest_metrics(manifest: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The manifest's numbers as MLflow metrics: top-level and nested-dict numbers, named by their path."""
    metrics: dict[str, float] = {}
    for name, value in manifest.items():
        path = f"{prefix}{name}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            metrics[path] = float(value)
        elif isinstance(value, dict):
            metrics.update(manifest_metrics(value, f"{path}."))
    return metrics


class PipelineRun:
    """The parent MLflow run of one pipeline run directory; `step` runs and records a step under it.

    Use as a context manager: leaving it marks the parent FINISHED, or FAILED (KILLED on Ctrl-C) on an error.
    """

    def __init__(self, run_dir: str | os.PathLike | StoragePath, tracking_uri: str, experiment: str, run_name: str,
                 params: dict[str, Any] | None = None) -> None:
        from mlflow import MlflowClient

        check_tracking(tracking_uri)  # seconds, before any step starts
        self.run_dir = storage.path(run_dir)
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = experiment_id(self.client, tracking_uri, experiment)
        self.records: list[StepRecord] = []
        self.run_id = self._reopen() or self._create(run_name, params or {})

    # -- the parent run -------------------------------------------------------------------------------------
    def _reopen(self) -> str | None:
        """The stored parent run, if it is in this tracking store; it is set RUNNING again."""
        record = self.run_dir / PIPELINE_RUN_FILE
        if not record.exists():
            return None
        stored = record.read_json()
        if stored.get("tracking_uri") != self.tracking_uri:
            return None
        try:
            self.client.get_run(stored["run_id"])
        except Exception:  # noqa: BLE001 - deleted or from another database: start a new parent
            return None
        self.client.update_run(stored["run_id"], status="RUNNING")
        log.info("resuming pipeline run %s", stored["run_id"])
        return stored["run_id"]

    def _create(self, run_name: str, params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"imagen.pipeline": run_name})
        flat = [Param(k, v) for k, v in flatten_params("", params).items()]
        for start in range(0, len(flat), 100):
            self.client.log_batch(run.info.run_id, params=flat[start:start + 100])
        atomic_write_json(self.run_dir / PIPELINE_RUN_FILE,
                          {"run_id": run.info.run_id, "tracking_uri": self.tracking_uri})
        return run.info.run_id

    def __enter__(self) -> "PipelineRun":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        self.client.set_terminated(self.run_id, status=status)

    @property
    def nested_tags(self) -> dict[str, str]:
        """Tags that nest a run under this pipeline run (for steps that create their own MLflow run)."""
        return {PARENT_TAG: self.run_id}

    # -- steps ----------------------------------------------------------------------------------------------
    def step(self, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Call `run()` (it returns the step's manifest, with its "key") and record the step; return the manifest."""
        started_ms, started = int(time.time() * 1000), time.monotonic()
        log.info("step %s ...", name)
        try:
            manifest = run()
        except BaseException as error:
            self._record_failure(name, started_ms, error)
            raise
        seconds = round(time.monotonic() - started, 1)
        key = str(manifest["key"])
        existing = self._recorded(name, key)
        if existing is not None:
            record = StepRecord(name=name, key=key, seconds=seconds, mlflow_run_id=existing, recorded_now=False)
        else:
            run_id = self._record(name, key, manifest, started_ms, seconds)
            record = StepRecord(name=name, key=key, seconds=seconds, mlflow_run_id=run_id, recorded_now=True)
        self.records.append(record)
        log.info("step %s done in %.1fs", name, seconds)
        return manifest

    def _step_tags(self, name: str, key: str) -> dict[str, str]:
        return {PARENT_TAG: self.run_id, STEP_TAG: name, KEY_TAG: key}

    def _recorded(self, name: str, key: str) -> str | None:
        """The finished nested run that already records step `name` with `key` under this parent, if any."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(f"tags.{PARENT_TAG} = '{self.run_id}' and tags.`{STEP_TAG}` = '{name}' "
                           f"and tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'"),
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _record(self, name: str, key: str, manifest: dict[str, Any], started_ms: int, seconds: float) -> str:
        from mlflow.entities import Metric

        own = manifest.get("mlflow_run_id")
        if own:  # the step logged its own run: nest it here as the step's record
            run_id = str(own)
            for tag, value in self._step_tags(name, key).items():
                self.client.set_tag(run_id, tag, value)
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=name, start_time=started_ms,
                                            tags=self._step_tags(name, key)).info.run_id
        now = int(time.time() * 1000)
        metrics = {**manifest_metrics({k: v for k, v in manifest.items() if k != "mlflow_run_id"}, "manifest."),
                   "step_seconds": seconds}
        batch = [Metric(k, v, now, 0) for k, v in metrics.items()]
        for start in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[start:start + 500])
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "manifest.json"
            path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(run_id, str(path), artifact_path="step")
        if not own:
            self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def _record_failure(self, name: str, started_ms: int, error: BaseException) -> None:
        """A nested FAILED run carrying the error; the original error is what the caller sees."""
        try:
            run_id = self.client.create_run(self.experiment_id, run_name=name, start_time=started_ms,
                                            tags={PARENT_TAG: self.run_id, STEP_TAG: name}).info.run_id
            self.client.set_tag(run_id, "imagen.error", f"{type(error).__name__}: {error}"[:ERROR_TAG_LIMIT])
            self.client.set_terminated(run_id, status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        except Exception:  # noqa: BLE001 - recording must not mask the step's own error
            log.exception("could not record the failure of step %s in MLflow", name)

    def summary(self) -> dict[str, Any]:
        """Per step: seconds of this call, its key and the nested run that records it."""
        return {r.name: {"seconds": r.seconds, "key": r.key, "mlflow_run_id": r.mlflow_run_id,
                         "recorded_now": r.recorded_now} for r in self.records}
