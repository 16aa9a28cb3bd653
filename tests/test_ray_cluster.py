"""`imagen demo` as a Ray Job on a real two-node Ray cluster started on this machine with `ray start`, losing its
second node in the middle of the base stage's training: the job still succeeds, Ray Train having restarted the
workers on the head node from the last checkpoint.

Layout (logical CPUs; the machine has 2 cores, Ray only counts them):
- head: 4 CPUs, resource `head_node`; second node: 2 CPUs, resource `second_node`; each its own --temp-dir, so
  neither the other tests' local Rays nor a bare `ray.init()` elsewhere on the machine can find this cluster.
- a holder actor reserves 1.5 of the head's CPUs (pinned by `head_node`) until the second node is stopped.
- ingest shards ask 1.5 CPUs each, train workers 1.5 each (2 per stage, so the stages train one after another):
  no node fits two of either while the holder lives, so ingest runs on both nodes and the base stage's two
  workers are placed one on each. After the second node is stopped the holder goes, and the head alone fits both
  workers plus a CPU for Ray Data: the restarted training and then the SR stage run there.

The cluster (token authentication, stopping one node) is tests/ray_cluster.py.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import secrets
import subprocess
import sys
import time

import pytest
from ray_cluster import Cluster, ray_cluster, stop_node

ROOT = pathlib.Path(__file__).resolve().parents[1]

HEAD_CPUS, SECOND_CPUS, HELD_CPUS, TASK_CPUS = 4, 2, 1.5, 1.5
BASE_STEPS, CHECKPOINT_EVERY = 12, 4
MODEL_NAME = "imagen-demo"  # the shipped demo config's model_name
EXCLUDES = [".git", ".venv", "runs", "out", ".pytest_cache", "**/__pycache__"]

SETS = {
    "ray.address": "auto",
    "demo.num_images": 120, "demo.num_prompts": 4,
    "ingest.rows_per_shard": 40, "ingest.cpus_per_shard": TASK_CPUS,
    "evaluate.num_samples": 4, "evaluate.sampler.steps": 4,
    **{f"train.{s}.{k}": v for s in ("base", "sr1") for k, v in {
        "total_steps": 6, "checkpoint.every_steps": 3, "tracking.val_every": 3, "tracking.sample_every": 6,
        "tracking.num_samples": 2, "tracking.sample_steps": 3, "tracking.log_every": 2,
        "schedule.warmup_steps": 2, "optim.ema_every": 2, "scaling.micro_batch_size": 8, "stage.sampler.steps": 4,
        "scaling.cpus_per_worker": TASK_CPUS,
    }.items()},
    # the base stage long enough that the node is stopped after a checkpoint and well before the end
    "train.base.total_steps": BASE_STEPS, "train.base.checkpoint.every_steps": CHECKPOINT_EVERY,
    "train.base.tracking.val_every": BASE_STEPS, "train.base.tracking.sample_every": BASE_STEPS,
}

HOLDER = r"""
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)

@ray.remote(num_cpus=float(sys.argv[2]), resources={"head_node": 0.001})
class Holder:
    def node(self):
        return ray.get_runtime_context().get_node_id()

holder = Holder.remote()
print(ray.get(holder.node.remote()), flush=True)
sys.stdin.read()  # hold the CPUs until this driver is killed
"""




@pytest.fixture
def cluster():
    with ray_cluster(HEAD_CPUS, SECOND_CPUS) as started:
        yield started


def _state(run: pathlib.Path) -> dict:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return json.loads((run / "pipeline_state.json").read_text())
    return {}


def _ledger(train_dir: pathlib.Path, rank: int = 0) -> list[dict]:
    path = train_dir / "ledger" / f"rank{rank}.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(line))
    return lines


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_demo_job_survives_losing_a_node(cluster: Cluster, tmp_path: pathlib.Path) -> None:
    from ray.job_submission import JobStatus

    run = tmp_path / "run"
    base_dir = run / "train" / "base"
    _, head_flags = cluster.raylet_of(cluster.head_dir)
    second_raylet, second_flags = cluster.raylet_of(cluster.second_dir)
    head_id, second_id = head_flags["node_id"], second_flags["node_id"]
    assert "head_node,1" in head_flags["static_resource_list"]
    assert "second_node,1" in second_flags["static_resource_list"]
    alive = {n["node_id"] for n in cluster.state("nodes") if n["state"] == "ALIVE"}
    assert alive == {head_id, second_id}

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, cluster.gcs, str(HELD_CPUS)], env=cluster.env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == head_id

        entrypoint = ["imagen", "demo", "--run-dir", str(run),
                      *(arg for k, v in SETS.items() for arg in ("--set", f"{k}={v}"))]
        submission = f"imagen-demo-{secrets.token_hex(4)}"
        cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", submission,
                    "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                    "--entrypoint-resources", json.dumps({"head_node": 0.001}),  # the driver stays on the head
                    "--no-wait", "--", *entrypoint)
        jobs = cluster.jobs()

        def logs() -> str:
            with contextlib.suppress(Exception):
                return jobs.get_job_logs(submission)[-6000:]
            return "(no logs)"

        # Stop the second node while the base stage trains on both nodes, Ray Train holds a checkpoint of it
        # (its checkpoint manager's snapshot is written when it registers one), and rank 0 is a step or two past
        # a checkpoint step: the steps since the checkpoint are lost and redone, the next checkpoint is not due.
        snapshot = base_dir / "ray" / "base" / "checkpoint_manager_snapshot.json"
        deadline, polled = time.monotonic() + 1800, 0.0  # for the whole job; the cluster's start and stop aside
        while True:
            step = max((e["step"] for e in _ledger(base_dir)), default=0)
            if snapshot.exists() and step > CHECKPOINT_EVERY and step % CHECKPOINT_EVERY in (1, 2):
                break
            assert step < BASE_STEPS, "the base stage trained to its end between two polls: nothing to recover"
            if time.monotonic() > polled + 5:
                polled = time.monotonic()
                status = jobs.get_job_status(submission)
                assert not status.is_terminal(), f"the job ended ({status}) before the node was stopped:\n{logs()}"
                assert polled < deadline, f"train_base did not get past a checkpoint in time: {_state(run)}\n{logs()}"
            time.sleep(0.2)
        assert stop_node(str(cluster.second_dir)) > 0
        assert not second_raylet.is_running()
        stopped_at = step
        assert _state(run)["steps"]["train_base"]["state"] == "running"
    finally:
        holder.kill()  # its CPUs go back to the head, where the workers restart
        holder.wait(30)

    while not (status := jobs.get_job_status(submission)).is_terminal():
        assert time.monotonic() < deadline, f"the job did not finish in time:\n{logs()}"
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, logs()
    job_id = jobs.get_job_info(submission).job_id

    # the run finished every step; its outputs and the champion cascade are there
    state = _state(run)
    assert state["state"] == "done" and {n: s["state"] for n, s in state["steps"].items()} == dict.fromkeys(
        state["order"], "done"), state
    assert (run / "samples.png").stat().st_size > 0
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}",
                                 registry_uri=f"sqlite:///{run / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.name == MODEL_NAME

    # work ran on both nodes: ingest shards (no two fit on one node) and the base stage's first workers (one on
    # each node); the one on the second node died with it
    nodes = {n["node_id"]: n["state"] for n in cluster.state("nodes")}
    assert nodes[head_id] == "ALIVE" and nodes[second_id] == "DEAD", nodes
    shards = [t for t in cluster.state("tasks", job_id=job_id) if t["func_or_class_name"] == "ingest_shard"]
    assert {t["node_id"] for t in shards if t["state"] == "FINISHED"} == {head_id, second_id}, shards
    workers = [a for a in cluster.state("actors", job_id=job_id) if a["class_name"] == "RayTrainWorker"]
    lost = [a for a in workers if a["node_id"] == second_id]
    assert len(lost) == 1 and lost[0]["state"] == "DEAD", lost
    assert lost[0]["death_cause"]["actor_died_error_context"]["reason"] == "NODE_DIED", lost
    # on the head: the base stage's first worker, its two restarted ones, and the SR stage's two
    assert len([a for a in workers if a["node_id"] == head_id]) >= 5, workers

    # training recovered on the head from the last checkpoint: the restarted rank 0 restored a checkpoint step
    # before the stop, and its ledger is the steps up to the stop, then again from the step after that checkpoint
    worker0 = json.loads((base_dir / "workers" / "rank0.json").read_text())
    restored = worker0["restored_step"]
    assert worker0["attempt"] >= 2 and restored is not None, worker0
    assert 0 < restored < stopped_at and restored % CHECKPOINT_EVERY == 0, (restored, stopped_at)
    steps = [e["step"] for e in _ledger(base_dir)]
    before = len(steps) - (BASE_STEPS - restored)
    assert steps == [*range(1, before + 1), *range(restored + 1, BASE_STEPS + 1)], steps
    assert before >= stopped_at, (steps, stopped_at)  # steps restored + 1 .. stopped_at were trained twice
