"""A pipeline run in MLflow: a parent run, a nested run per step keyed like the step's manifest; resume and failure."""
from __future__ import annotations

import json
import pathlib

import pytest

from pipelines.step import StepDir
from pipelines.tracking import TrackingUnavailable
from pipelines.workflow import KEY_TAG, PARENT_TAG, STEP_TAG, PipelineRun, manifest_metrics

EXPERIMENT = "workflow-tests"


def counting_step(root: pathlib.Path, name: str, config: dict, calls: list[str]):
    """A one-shard step over StepDir that records each time it does work."""

    def run() -> dict:
        step = StepDir.open(root / name, name, config, [])
        if (manifest := step.manifest()) is not None:
            return manifest
        calls.append(name)
        step.mark_done("s0", {"rows": config["rows"]})
        return step.finish(["s0"], rows=config["rows"], funnel={"kept": config["rows"] - 1, "note": "x"})

    return run


def nested_runs(pipeline: PipelineRun) -> list:
    return pipeline.client.search_runs([pipeline.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{pipeline.run_id}'")


def test_manifest_metrics_keep_numbers_by_path() -> None:
    metrics = manifest_metrics({"rows": 3, "ok": True, "name": "x", "funnel": {"kept": 2, "stages": [1]}, "t": 0.5})
    assert metrics == {"rows": 3.0, "funnel.kept": 2.0, "t": 0.5}


def test_steps_are_nested_runs_and_a_resumed_run_records_only_what_did_work(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    calls: list[str] = []
    with PipelineRun(tmp_path, uri, EXPERIMENT, "run", params={"seed": 0, "data": {"rows": 3}}) as pipeline:
        first = pipeline.step("ingest", counting_step(tmp_path, "ingest", {"rows": 3}, calls))
        pipeline.step("curate", counting_step(tmp_path, "curate", {"rows": 5}, calls))
    parent = pipeline.client.get_run(pipeline.run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["data.rows"] == "3"
    runs = {r.data.tags[STEP_TAG]: r for r in nested_runs(pipeline)}
    assert set(runs) == {"ingest", "curate"} and calls == ["ingest", "curate"]
    ingest = runs["ingest"]
    assert ingest.info.status == "FINISHED" and ingest.data.tags[KEY_TAG] == first["key"]
    assert ingest.data.metrics["manifest.rows"] == 3 and ingest.data.metrics["manifest.funnel.kept"] == 2
    assert "step_seconds" in ingest.data.metrics
    stored = pathlib.Path(pipeline.client.download_artifacts(ingest.info.run_id, "step/manifest.json", str(tmp_path)))
    assert json.loads(stored.read_text())["key"] == first["key"]

    # Resume: the same parent, the finished steps return at once and are not recorded twice.
    with PipelineRun(tmp_path, uri, EXPERIMENT, "run") as again:
        again.step("ingest", counting_step(tmp_path, "ingest", {"rows": 3}, calls))
        again.step("curate", counting_step(tmp_path, "curate", {"rows": 5}, calls))
    assert again.run_id == pipeline.run_id and calls == ["ingest", "curate"]
    assert [r.recorded_now for r in again.records] == [False, False]
    assert len(nested_runs(again)) == 2

    # A changed config is another key: the step does work again in a new directory and gets a new record.
    with PipelineRun(tmp_path, uri, EXPERIMENT, "run") as changed:
        changed.step("curate", counting_step(tmp_path / "v2", "curate", {"rows": 4}, calls))
    assert calls[-1] == "curate" and changed.records[0].recorded_now
    assert sorted(r.data.tags[STEP_TAG] for r in nested_runs(changed)) == ["curate", "curate", "ingest"]


def test_a_failing_step_is_recorded_failed_and_a_rerun_continues_the_same_parent(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    calls: list[str] = []

    def broken() -> dict:
        raise ValueError("shard 3 is not Parquet")

    with pytest.raises(ValueError, match="shard 3"):
        with PipelineRun(tmp_path, uri, EXPERIMENT, "run") as pipeline:
            pipeline.step("ingest", counting_step(tmp_path, "ingest", {"rows": 3}, calls))
            pipeline.step("embed", broken)
    assert pipeline.client.get_run(pipeline.run_id).info.status == "FAILED"
    failed = [r for r in nested_runs(pipeline) if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags[STEP_TAG] == "embed"
    assert failed[0].data.tags["imagen.error"] == "ValueError: shard 3 is not Parquet"

    with PipelineRun(tmp_path, uri, EXPERIMENT, "run") as rerun:
        rerun.step("ingest", counting_step(tmp_path, "ingest", {"rows": 3}, calls))
        rerun.step("embed", counting_step(tmp_path, "embed", {"rows": 2}, calls))
    assert rerun.run_id == pipeline.run_id and calls == ["ingest", "embed"]
    assert rerun.client.get_run(rerun.run_id).info.status == "FINISHED"
    finished = [r.data.tags[STEP_TAG] for r in nested_runs(rerun) if r.info.status == "FINISHED"]
    assert sorted(finished) == ["embed", "ingest"]


def test_a_step_with_its_own_run_is_nested_as_its_record(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with PipelineRun(tmp_path, uri, EXPERIMENT, "run") as pipeline:

        def train() -> dict:  # like train_stage: its own run, created with the parent's nesting tags
            run = pipeline.client.create_run(pipeline.experiment_id, run_name="base", tags=pipeline.nested_tags)
            pipeline.client.log_metric(run.info.run_id, "loss", 0.5)
            pipeline.client.set_terminated(run.info.run_id)
            return {"key": "k1", "mlflow_run_id": run.info.run_id}

        manifest = pipeline.step("train_base", train)
    (only,) = nested_runs(pipeline)
    assert only.info.run_id == manifest["mlflow_run_id"]
    assert only.data.tags[STEP_TAG] == "train_base" and only.data.metrics["loss"] == 0.5


def test_a_bad_tracking_uri_fails_before_any_step(tmp_path) -> None:
    with pytest.raises(TrackingUnavailable, match="does not exist"):
        PipelineRun(tmp_path, f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}", EXPERIMENT, "run")
    assert not (tmp_path / "pipeline_run.json").exists()


KILLED_RUN = """
import pathlib, sys, time
sys.path.insert(0, sys.argv[3])
from pipelines.workflow import PipelineRun
from test_workflow import counting_step
root, uri = pathlib.Path(sys.argv[1]), sys.argv[2]
calls = []
with PipelineRun(root, uri, "workflow-tests", "run") as pipeline:
    pipeline.step("ingest", counting_step(root, "ingest", {"rows": 3}, calls))
    def stuck():
        (root / "embed_started").touch()
        time.sleep(600)
    pipeline.step("embed", stuck)
"""


def test_kill9_mid_step_then_rerun_continues_the_parent_and_records_each_step_once(tmp_path) -> None:
    """A killed driver records nothing for the step it was in (kill -9 leaves no chance to): the rerun reopens the
    same parent, skips the finished step without a second record, and records the step it now finishes."""
    import signal
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tests_dir = pathlib.Path(__file__).parent
    driver = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path), uri, str(tests_dir)],
                              cwd=tests_dir.parent, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "embed_started").exists():
        assert driver.poll() is None, driver.stderr.read()
        assert time.monotonic() < deadline, "the driver never reached the embed step"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)

    calls: list[str] = []
    with PipelineRun(tmp_path, uri, EXPERIMENT, "run") as rerun:
        rerun.step("ingest", counting_step(tmp_path, "ingest", {"rows": 3}, calls))
        rerun.step("embed", counting_step(tmp_path, "embed", {"rows": 2}, calls))
    assert calls == ["embed"], "the finished step was not redone"
    assert [r.recorded_now for r in rerun.records] == [False, True]
    runs = nested_runs(rerun)
    assert sorted(r.data.tags[STEP_TAG] for r in runs) == ["embed", "ingest"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert rerun.client.get_run(rerun.run_id).info.status == "FINISHED"
