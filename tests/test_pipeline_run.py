"""`imagen run` end to end at the smallest size that shows each behaviour (the shipped demo config, scaled down
by --set only): every step runs and is recorded; kill -9 of the driver during ingest, curate, embed, training
and registration, each followed by a rerun, ends equal to an uninterrupted run with nothing finished redone and
no duplicate model versions; a changed SR-stage setting reruns that stage and everything after it, nothing before;
`imagen status` reads a running, a failed and a finished run."""
from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
from test_ingest import _kill_9 as kill_9  # the driver's process group and every process under it

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = {
    "demo.num_images": 120, "demo.num_prompts": 4, "ingest.rows_per_shard": 40,
    "evaluate.num_samples": 4, "evaluate.sampler.steps": 4,
    **{f"train.{s}.{k}": v for s in ("base", "sr1") for k, v in {
        "total_steps": 6, "checkpoint.every_steps": 3, "tracking.val_every": 3, "tracking.sample_every": 6,
        "tracking.num_samples": 2, "tracking.sample_steps": 3, "tracking.log_every": 2,
        "schedule.warmup_steps": 2, "optim.ema_every": 2, "scaling.micro_batch_size": 8, "stage.sampler.steps": 4,
    }.items()},
}
"""The demo config at the smallest size that still runs every step for real."""


def demo_argv(run_dir: pathlib.Path, **extra) -> list[str]:
    sets = [a for k, v in {**TINY, **extra}.items() for a in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "jobs.cli", "demo", "--run-dir", str(run_dir), *sets]


def run_to_end(run_dir: pathlib.Path, log: pathlib.Path, **extra) -> str:
    done = subprocess.run(demo_argv(run_dir, **extra), cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                          timeout=1500)
    text = log.read_text()
    assert done.returncode == 0, text[-4000:]
    return text


def state_of(run_dir: pathlib.Path) -> dict:
    path = run_dir / "pipeline_state.json"
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return json.loads(path.read_text())
    return {}


def imagen_status(run_dir: pathlib.Path) -> str:
    status = subprocess.run([sys.executable, "-m", "jobs.cli", "status", str(run_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    return status.stdout


def kill_during(run_dir: pathlib.Path, step: str, log: pathlib.Path, ready, check_status: bool = False) -> list[str]:
    """Start the run, kill -9 it while `step` runs and `ready()` holds; return the steps done before the kill.
    With check_status, `imagen status` is asked once `step` runs, before `ready()` is awaited: the kill then
    follows `ready()` within a poll, not after the seconds a status command takes (in which a tiny training can
    finish)."""
    proc = subprocess.Popen(demo_argv(run_dir), cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            running = state_of(run_dir).get("steps", {}).get(step, {}).get("state") == "running"
            if running and check_status:
                status = imagen_status(run_dir)
                assert "run: running" in status and f"{step:<14} running" in status, status
                check_status = False
            if running and ready():
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before {step} could be interrupted:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{step} never started"
        assert not check_status, f"{step} was never seen running"
    finally:
        kill_9(proc)
    return [name for name, s in state_of(run_dir)["steps"].items() if s["state"] == "done"]


def files_in(directory: pathlib.Path, pattern: str) -> bool:
    return any(directory.glob(pattern))


def ledger_lines(run_dir: pathlib.Path, stage: str) -> int:
    path = run_dir / "train" / stage / "ledger" / "rank0.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _table(path: pathlib.Path, columns: list[str], sort: str = "key"):
    import pyarrow.dataset as ds

    return ds.dataset(str(path), format="parquet").to_table(columns=columns).sort_by(sort).to_pylist()


def _weights(run_dir: pathlib.Path, stage: str):
    from safetensors.torch import load_file

    return load_file(run_dir / "train" / stage / "export" / "model.safetensors")


def _versions(run_dir: pathlib.Path, model: str) -> tuple[list[str], dict]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{model}'"))
    return versions, {a: str(v) for a, v in client.get_registered_model(model).aliases.items()}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_kill_9_at_every_step_then_rerun_equals_an_uninterrupted_run(tmp_path):
    import torch

    clean = tmp_path / "clean"
    out = run_to_end(clean, tmp_path / "clean.log")
    for line in ("ingest done", "curate done", "embed done", "train_base done", "train_sr1 done", "register done",
                 "evaluate done", "promote done", "sample done"):
        assert line in out, out
    assert "Failed to query Ray Train Controller" not in out and len(out.splitlines()) < 80, out
    assert (clean / "samples.png").stat().st_size > 0
    summary = json.loads((clean / "summary.json").read_text())
    funnel = summary["curate"]["funnel"]
    assert funnel["input"] == TINY["demo.num_images"] == summary["ingest"]["input_rows"]
    assert sum(s["removed"] for s in funnel["stages"]) + funnel["kept"] == funnel["input"], "every row accounted for"
    assert summary["model_uri"] == "models:/imagen-demo@champion"
    assert {"eval_loss", "colour_accuracy"} <= set(summary["evaluate"]["shards"][0]["metrics"])
    assert {"psnr", "psnr_bicubic"} <= set(summary["evaluate"]["shards"][1]["metrics"])

    # MLflow: one parent run for the run directory with a nested run per step.
    from mlflow import MlflowClient

    from pipelines.workflow import PARENT_TAG, STEP_TAG

    client = MlflowClient(summary["mlflow"])
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    nested = client.search_runs([parent.info.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent.info.run_id}'")
    assert sorted(r.data.tags[STEP_TAG] for r in nested) == sorted(summary["steps"])
    assert summary["steps"]["train_base"]["mlflow_run_id"] == summary["train"]["base"]["mlflow_run_id"]

    # The killed run's tiny CLIP is the clean run's: the demo fits one per run directory (same seed, same fit) and
    # skips the fit where the folder holds one; the clean run has shown the fit, the killed runs needn't repeat it.
    killed = tmp_path / "killed"
    shutil.copytree(clean / "clip", killed / "clip")
    phases = [
        ("ingest", lambda: files_in(killed / "ingest" / "_done", "*.json")),
        ("curate", lambda: True),
        ("embed", lambda: True),
        ("train_base", lambda: ledger_lines(killed, "base") >= 2),
        ("register", lambda: True),
    ]
    done_before: list[str] = []
    for step, ready in phases:  # each run after the first is also the rerun of the one killed before it
        log = tmp_path / f"kill-during-{step}.log"
        done_now = kill_during(killed, step, log, ready, check_status=step == "train_base")
        for name in done_before:  # nothing finished is redone
            assert f"{name} already done" in log.read_text(), (name, log.read_text())
        assert step not in done_now
        done_before = done_now
        if step == "ingest":  # the driver is gone: status says the run and its running step failed
            status = imagen_status(killed)
            assert status.startswith("run: failed") and "ingest         failed" in status, status
    final = run_to_end(killed, tmp_path / "final.log")
    for name in done_before:
        assert f"{name} already done" in final, (name, final)
    assert state_of(killed)["state"] == "done"

    # The interrupted run's outputs equal the uninterrupted run's.
    columns = ["key", "status", "sha256"]
    assert _table(killed / "ingest" / "shards", columns) == _table(clean / "ingest" / "shards", columns)
    decisions = ["key", "decision", "reason"]
    assert _table(killed / "curate" / "decisions", decisions) == _table(clean / "curate" / "decisions", decisions)
    embedded = ["key", "n_tokens", "text_embedding"]
    assert _table(killed / "embed" / "shards", embedded) == _table(clean / "embed" / "shards", embedded)
    for stage in ("base", "sr1"):
        a, b = _weights(clean, stage), _weights(killed, stage)
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a), f"{stage} weights differ"
    for model in ("imagen-demo-base", "imagen-demo-sr1", "imagen-demo"):
        versions, aliases = _versions(killed, model)
        assert versions == ["1"] and aliases.get("champion") == "1", (model, versions, aliases)  # no duplicates
        assert (versions, aliases) == _versions(clean, model)

    # A changed setting of the SR stage reruns that stage and every step after it (registration too: its
    # weights differ), nothing before it. Any step's change works the same way (its key changes, the steps
    # downstream see another input key); the SR stage is the cheapest to redo. Selection by a changed threshold
    # without rescoring is tests/test_curate.py's.
    changed = run_to_end(clean, tmp_path / "changed.log", **{"train.sr1.optim.lr": 3e-4})
    for name in ("ingest", "curate", "report", "embed", "train_base", "heldout"):
        assert f"{name} already done" in changed, (name, changed)
    assert "train_sr1: its config or inputs changed" in changed, changed
    for name in ("train_sr1", "register", "evaluate", "promote"):
        assert f"{name} done in" in changed, (name, changed)
    assert any((clean / "superseded").glob("train_sr1-*")), "the previous SR stage is kept, not deleted"
    versions, _ = _versions(clean, "imagen-demo-sr1")
    assert versions == ["1", "2"], versions  # other weights: a new version; the base stage's weights are the same
    assert _versions(clean, "imagen-demo-base")[0] == ["1"]

    status = imagen_status(clean)
    assert status.startswith("run: done") and "train_base     done     6/6 steps" in status, status
