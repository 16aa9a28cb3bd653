"""The registry flow against a real `mlflow server` on 127.0.0.1 (REST store, proxied artifacts)."""
from __future__ import annotations

import time

import mlflow
import pandas as pd
import pytest
from mlflow_server import mlflow_server as start_mlflow_server

from pipelines.registry.evaluate import EvalConfig, evaluate_stage
from pipelines.registry.loading import load_cascade
from pipelines.registry.promote import list_stages, promote, rollback
from pipelines.registry.register import CascadeSpec, RegisterConfig, register_cascade, register_stage
from pipelines.tracking import configure_tracking

pytest_plugins = ["test_registry_common"]  # its session fixtures (stages, held-out data) are shared


@pytest.fixture()
def mlflow_server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a test failure, not minutes of back-off
    try:
        with start_mlflow_server(tmp_path, str(tmp_path / "artifacts")) as uri:
            yield uri
    finally:
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
