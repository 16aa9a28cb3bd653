"""`imagen status RUN_DIR`: each step's state, progress, seconds, outputs and MLflow run, read from disk.

The state file (`pipeline_state.json`, pipelines/pipeline.py) says what the driver last did; progress is counted
from the step directories themselves (finished shards' `_done` records, training ledger lines), so it is current
while a run goes on. A step the file calls running whose driver process is gone is reported failed.
"""
from __future__ import annotations

import os
import socket
from typing import Any

from pipelines import storage

STATE_FILE = "pipeline_state.json"
"""Written by the pipeline's driver (pipelines/pipeline.py RunState); read here without importing the pipeline."""


def _driver_alive(state: dict[str, Any]) -> bool:
    if state.get("host") != socket.gethostname():
        return True  # another machine's driver: trust the file
    try:
        os.kill(int(state["pid"]), 0)
    except (ProcessLookupError, PermissionError, KeyError, ValueError):
        return False
    return True


def _progress(name: str, directory: str | None) -> str | None:
    if not directory:
        return None
    path = storage.path(directory)
    if name.startswith("train_"):
        from pipelines.train.ledger import read_ledger

        config = path / "train_config.json"
        if not config.exists():
            return None
        steps = len({step for rank, step in read_ledger(path) if rank == 0})
        return f"{steps}/{config.read_json()['total_steps']} steps" if steps else None
    done = path / "_done"
    return f"{len(done.glob('*.json'))} shards" if done.exists() else None


def run_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's state with each step's progress; raises FileNotFoundError for a directory that holds no run."""
    path = storage.path(run_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} holds no pipeline run (no {STATE_FILE}): start one with imagen run CONFIG")
    state = path.read_json()
    alive = _driver_alive(state)
    if state["state"] == "running" and not alive:
        state["state"] = "failed"
        state["note"] = f"the driver (pid {state.get('pid')}) is gone: rerun imagen run to continue"
    for name, step in state["steps"].items():
        if step["state"] == "running" and not alive:
            step["state"] = "failed"
        step["progress"] = _progress(name, step.get("dir"))
        manifest = storage.path(step["dir"]) / "manifest.json" if step.get("dir") else None
        step["outputs"] = str(manifest.parent) if manifest is not None and manifest.exists() else None
    return state


def format_status(state: dict[str, Any]) -> str:
    lines = [f"run: {state['state']}" + (f" ({state['note']})" if state.get("note") else "")]
    lines.append(f"{'step':<14} {'state':<8} {'progress':<16} {'seconds':>8}  outputs / MLflow run")
    for name in state.get("order", state["steps"]):
        step = state["steps"][name]
        seconds = f"{step['seconds']:.1f}" if isinstance(step.get("seconds"), (int, float)) else ""
        where = step.get("outputs") or ""
        run = f" run {step['mlflow_run_id']}" if step.get("mlflow_run_id") else ""
        error = f"  error: {step['error'][:200]}" if step["state"] == "failed" and step.get("error") else ""
        lines.append(f"{name:<14} {step['state']:<8} {step.get('progress') or '':<16} {seconds:>8}  {where}{run}{error}")
    return "\n".join(lines)
