"""`imagen demo` (= `imagen run` of the shipped demo config, scaled down by --set only) with every step's output in
a bucket of a real S3-compatible server on 127.0.0.1, and MLflow's artifacts proxied into the same bucket: each
step's objects are there with its manifest, nothing of the run lands on the local disk but the log (copied to the
bucket at the end) and the demo's served corpus; `imagen status` reads the run from the bucket; a rerun finds every
step done."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow_server import mlflow_server
from test_pipeline_run import ROOT, TINY

STEP_DIRS = ("ingest", "scores", "curate", "embed", "train/base", "train/sr1", "heldout", "registry/register",
             "registry/evaluate", "registry/promote")


def _demo(run_dir: str, uri: str, log, env) -> subprocess.CompletedProcess:
    sets = [a for k, v in {**TINY, "tracking_uri": uri}.items() for a in ("--set", f"{k}={v}")]
    return subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--run-dir", run_dir, *sets], cwd=ROOT,
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=1500, env=env)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_demo_with_every_step_on_s3(s3, tmp_path):
    import os

    from mlflow import MlflowClient

    server, bucket = s3
    run_dir = f"s3://{bucket}/runs/demo"
    env = {**os.environ, "IMAGEN_CACHE_DIR": str(tmp_path / "cache")}
    with mlflow_server(tmp_path, f"s3://{bucket}/mlflow", server.env) as uri:
        done = _demo(run_dir, uri, tmp_path / "run.log", env)
        text = (tmp_path / "run.log").read_text()
        assert done.returncode == 0, text[-4000:]
        keys = server.keys(bucket)
        for step in STEP_DIRS:
            assert f"runs/demo/{step}/manifest.json" in keys, (step, [k for k in keys if k.startswith(f"runs/demo/{step}")][:20])
        expected = ["runs/demo/ingest/shards/00000.parquet", "runs/demo/curate/decisions/00000.parquet",
                    "runs/demo/embed/shards/00000.parquet", "runs/demo/train/base/export/model.safetensors",
                    "runs/demo/train/sr1/export/model.safetensors", "runs/demo/pipeline_state.json",
                    "runs/demo/pipeline_run.json", "runs/demo/summary.json", "runs/demo/samples.png",
                    "runs/demo/run.log"]
        assert not [k for k in expected if k not in keys], [k for k in expected if k not in keys]
        assert any(k.startswith("runs/demo/train/base/ray/") and "checkpoint_" in k for k in keys)  # Ray Train's
        assert any(k.startswith("runs/demo/train/base/ledger/") for k in keys)
        assert any(k.startswith("mlflow/") and k.endswith("model.safetensors") for k in keys)  # MLflow's artifacts
        summary = json.loads(server.client().get_object(Bucket=bucket, Key="runs/demo/summary.json")["Body"].read())
        assert summary["model_uri"].endswith("@champion")
        state = json.loads(server.client().get_object(Bucket=bucket, Key="runs/demo/pipeline_state.json")["Body"].read())
        assert state["state"] == "done" and all(s["state"] == "done" for s in state["steps"].values())
        local = [p for p in (tmp_path / "cache" / "runs").rglob("*") if p.is_file()]  # the run's local folder
        assert local and all(p.name == "run.log" or "corpus" in p.parts or "clip" in p.parts for p in local), local
        status = subprocess.run([sys.executable, "-m", "jobs.cli", "status", run_dir], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env=env)
        assert status.returncode == 0 and "run: done" in status.stdout and "6/6 steps" in status.stdout, status
        client = MlflowClient(uri)
        assert client.get_registered_model("imagen-demo").aliases.get("champion") is not None

        again = _demo(run_dir, uri, tmp_path / "rerun.log", env)
        rerun = (tmp_path / "rerun.log").read_text()
        assert again.returncode == 0, rerun[-4000:]
        for step in ("ingest", "curate", "embed", "train_base", "train_sr1", "register", "promote"):
            assert f"{step} already done" in rerun, (step, rerun[-3000:])
