"""The registry flow against a real `mlflow server` on 127.0.0.1 (REST store, proxied artifacts)."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import mlflow
import pandas as pd
import pytest
from s3_server import free_port as _free_port

from pipelines.registry.evaluate import EvalConfig, evaluate_stage
from pipelines.registry.loading import load_cascade
from pipelines.registry.promote import list_stages, promote, rollback
from pipelines.registry.register import CascadeSpec, RegisterConfig, register_cascade, register_stage
from pipelines.tracking import TrackingUnavailable, check_tracking, configure_tracking

pytest_plugins = ["test_registry_common"]  # its session fixtures (stages, held-out data) are shared

STARTUP_DEADLINE_S = 120




def _wait_healthy(process: subprocess.Popen, uri: str, log: pathlib.Path) -> float:
    """Poll /health until it answers; fail at once if the server exits. Returns seconds taken."""
    started = time.monotonic()
    while time.monotonic() - started < STARTUP_DEADLINE_S:
        try:
            check_tracking(uri, timeout_s=1)
            return time.monotonic() - started
        except TrackingUnavailable:
            try:  # waits up to 0.25 s for the process: a pause between polls that also notices a crash
                code = process.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"mlflow server exited with {code}:\n{log.read_text()[-3000:]}")
    pytest.fail(f"mlflow server not healthy after {STARTUP_DEADLINE_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture()
def mlflow_server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a test failure, not minutes of back-off
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
        "--artifacts-destination", str(tmp_path / "artifacts"),
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        print(f"mlflow server healthy after {_wait_healthy(process, uri, log):.1f} s")
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the worker it started, nothing else
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_register_promote_rollback_and_load_by_alias_on_a_server(mlflow_server, stage_dirs, heldout_dir):
    started = time.monotonic()
    status = configure_tracking(mlflow_server)
    assert status.kind == "http" and "MLflow server 3." in status.detail
    config = RegisterConfig(experiment="server-tests")
    evaluation = EvalConfig(heldout_dir=str(heldout_dir), num_samples=2, metrics=("eval_loss",))

    register_stage(stage_dirs["base"], "srv", config)
    evaluate_stage("srv", "base", config=evaluation)
    assert promote("srv", "base", "eval_loss").outcome == "first_champion"
    register_stage(stage_dirs["sr"], "srv", RegisterConfig(experiment="server-tests", metrics=(("eval_loss", 1.0),)))
    promote("srv", "sr1", "eval_loss")
    register_cascade("srv", CascadeSpec(stages=("base", "sr1"), steps=2), config)

    register_stage(stage_dirs["base_trained"], "srv", config)
    evaluate_stage("srv", "base", config=evaluation)
    better = promote("srv", "base", "eval_loss", min_rel=0.05)
    print(better.summary())
    assert better.outcome == "promoted"
    register_stage(stage_dirs["base_other"], "srv", config)
    evaluate_stage("srv", "base", config=evaluation)
    assert promote("srv", "base", "eval_loss", min_rel=0.05).outcome == "refused"

    model = mlflow.pyfunc.load_model("models:/srv@champion")
    out = model.predict(pd.DataFrame({"prompt": ["a red square", "a red square"], "seed": [1, 1]}))
    assert list(out["width"]) == [16, 16] and out["image"][0] == out["image"][1]
    assert load_cascade("models:/srv@champion").sources[0] == "models:/srv-base/2 (@champion)"
    assert rollback("srv", "base", reason="server test").to_version == "1"
    assert load_cascade("models:/srv@champion").sources[0] == "models:/srv-base/1 (@champion)"
    table = list_stages("srv")
    print(table.to_string())
    assert set(table["model"]) == {"srv", "srv-base", "srv-sr1"}
    print(f"server flow took {time.monotonic() - started:.1f} s")
