"""`imagen run CONFIG`: the whole pipeline as a DAG of steps on Ray, resumable, recorded in MLflow.

ingest -> curate -> report -> embed -> train every stage (concurrently when the cluster has room for all of them,
one after another otherwise) -> heldout -> register (each stage, idempotent by weights) -> evaluate -> promote
(metric-gated, then the cascade resolving each stage by alias).

Durability (Ray Workflows was removed after Ray 2.47): each step's manifest, written last and keyed by the hash
of its config and its inputs' keys (pipelines/step.py), plus its nested MLflow run (pipelines/workflow.py). A
rerun on the same run directory skips finished steps and shards; a step whose config changed finds another key in
its directory, moves the old outputs to `superseded/` and runs again, and every step downstream follows because
its inputs' keys changed. `pipeline_state.json` holds each step's state for `imagen status`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pipelines.pipeline_config import (
    CURATE_DIR,
    EMBED_DIR,
    HELDOUT_DIR,
    INGEST_DIR,
    REGISTRY_DIR,
    SCORES_DIR,
    PipelineConfig,
)
from pipelines.run_output import RunOutput, count_files
from pipelines.status import STATE_FILE
from pipelines import storage
from pipelines.step import StepDir, StepKeyMismatch, atomic_write_json, step_key
from pipelines.storage import StoragePath

log = logging.getLogger("imagen.pipeline")

SUPERSEDED_DIR = "superseded"


# -- state for `imagen status` --------------------------------------------------------------------------------
class RunState:
    """`<run_dir>/pipeline_state.json`: every step's state, seconds, directory and MLflow run; rewritten on change."""

    def __init__(self, root: StoragePath, steps: list[str], dirs: dict[str, str]) -> None:
        self.path = root / STATE_FILE
        self.lock = threading.Lock()
        old = self.path.read_json().get("steps", {}) if self.path.exists() else {}
        self.steps = {name: {"state": "pending", "dir": dirs.get(name), **_kept(old.get(name))} for name in steps}
        self.data = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                     "state": "running", "order": steps, "steps": self.steps}
        self._write()

    def update(self, name: str, **fields: Any) -> None:
        with self.lock:
            self.steps[name].update(fields)
            self._write()

    def finish(self, state: str) -> None:
        with self.lock:
            self.data["state"] = state
            self.data["finished_at"] = time.time()
            self._write()

    def _write(self) -> None:
        atomic_write_json(self.path, self.data)


def _kept(old: dict[str, Any] | None) -> dict[str, Any]:
    """What an earlier attempt recorded of a step that stays true (its MLflow run, its last seconds)."""
    return {k: v for k, v in (old or {}).items() if k in ("mlflow_run_id", "seconds", "key") and old.get("state") == "done"}


# -- steps that start over when their config changed ------------------------------------------------------------
def supersede(root: StoragePath, step_dir: StoragePath, name: str) -> StoragePath:
    """Move a step directory holding another key aside (nothing is deleted) so the step can run afresh."""
    held = (step_dir / "_key.json").read_json().get("key", "unknown")
    target = root / SUPERSEDED_DIR / f"{name}-{held}-{int(time.time())}"
    step_dir.move_to(target)
    return target


def _rerun_on_change(root: StoragePath, name: str, run: Callable[[], dict[str, Any]], out: RunOutput) -> dict[str, Any]:
    try:
        return run()
    except StepKeyMismatch as mismatch:  # raised when the step opens its directory, before any work
        moved = supersede(root, storage.path(mismatch.root), name)
        out.line(f"{name}: its config or inputs changed; the previous outputs moved to {moved.relative_to(root)}")
        return run()


# -- the training stages --------------------------------------------------------------------------------------
def train_step(train: Any, embed_key: str, mlflow_tags: dict[str, str], ray_config: Any) -> dict[str, Any]:
    """One stage's training as a keyed step: its manifest holds the export, the MLflow run and the last metrics."""
    from pipelines.train.trainer import train_stage

    step = StepDir.open(train.output_dir, "train", dataclasses.replace(train, resume=False), [embed_key])
    if (manifest := step.manifest()) is not None:
        return manifest
    result = train_stage(train, ray_config, mlflow_tags=mlflow_tags)
    step.mark_done("fit", {"steps": train.total_steps})
    return step.finish(["fit"], **dataclasses.asdict(result))


def stage_demand(train: Any) -> dict[str, float]:
    """Ray resources one stage's training holds: its workers, plus a CPU for its Ray Data input pipeline."""
    scaling = train.scaling
    demand = {"CPU": scaling.num_workers * scaling.cpus_per_worker + 1.0}
    if scaling.use_gpu:
        demand["GPU"] = float(scaling.num_workers)
    return demand


def fits_together(demands: list[dict[str, float]], available: dict[str, float]) -> bool:
    """Whether every stage's training fits on the cluster at once."""
    return all(sum(d.get(r, 0.0) for d in demands) <= available.get(r, 0.0) for r in {r for d in demands for r in d})


# -- registry steps -------------------------------------------------------------------------------------------
def export_heldout(embed_dir: StoragePath, out_dir: StoragePath, val_fraction: float) -> dict[str, Any]:
    """The rows every stage's training held out, as <key>.png + <key>.txt (img2dataset's "files" layout)."""
    import pyarrow.dataset as ds

    from pipelines.step import atomic_write_bytes
    from pipelines.train.data import held_out

    embed_key = (embed_dir / "manifest.json").read_json()["key"]
    step = StepDir.open(out_dir, "heldout", {"val_fraction": val_fraction}, [embed_key])
    if (manifest := step.manifest()) is not None:
        return manifest
    table = ds.dataset(str(embed_dir / "shards"), format="parquet").to_table(columns=["key", "caption", "image"])
    rows = 0
    for key, caption, image in zip(*(table[c].to_pylist() for c in ("key", "caption", "image"))):
        if held_out(key, val_fraction):
            atomic_write_bytes(out_dir / f"{key}.png", image)  # any PIL-readable bytes; the suffix marks images
            atomic_write_bytes(out_dir / f"{key}.txt", caption.encode())
            rows += 1
    step.mark_done("all", {"rows": rows})
    return step.finish(["all"], rows=rows)


def register_step(config: PipelineConfig, trained: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every stage's export registered as `<model_name>-<stage>` (challenger); the same weights never twice."""
    from pipelines.registry.checkpoints import read_manifest
    from pipelines.registry.register import RegisterConfig, register_stage

    weights = {s: read_manifest(r["export_dir"])["files"]["model.safetensors"]["sha256"] for s, r in trained.items()}
    step = StepDir.open(config.dir(REGISTRY_DIR) / "register", "register",
                        {"name": config.model_name, "uri": config.mlflow_uri}, [weights[s] for s in trained])
    if (manifest := step.manifest()) is not None:
        return manifest
    embed_manifest = str(config.dir(EMBED_DIR) / "manifest.json")
    for stage, result in trained.items():
        if not step.is_done(stage):
            version = register_stage(result["export_dir"], config.model_name, RegisterConfig(
                training_run_id=result["mlflow_run_id"], dataset_manifest=embed_manifest,
                experiment=config.register.experiment or config.experiment, device=config.register.device))
            step.mark_done(stage, {"version": version, "weights_sha256": weights[stage]})
    return step.finish(list(trained), name=config.model_name)


def evaluate_step(config: PipelineConfig, registered: dict[str, Any]) -> dict[str, Any]:
    """Each registered version evaluated on the configured metrics (tags `metric.<name>` on the version)."""
    from pipelines.registry.evaluate import evaluate_stage

    step = StepDir.open(config.dir(REGISTRY_DIR) / "evaluate", "evaluate", config.evaluate, [registered["key"]])
    if (manifest := step.manifest()) is not None:
        return manifest
    stages = [s["shard_id"] for s in registered["shards"]]
    for shard in registered["shards"]:
        if not step.is_done(shard["shard_id"]):
            result = evaluate_stage(config.model_name, shard["shard_id"], version=shard["version"], config=config.evaluate)
            step.mark_done(shard["shard_id"], {"version": shard["version"], "metrics": result.metrics,
                                               "notes": result.notes})
    return step.finish(stages)


def promote_step(config: PipelineConfig, evaluated: dict[str, Any]) -> dict[str, Any]:
    """Each stage promoted if its challenger beats the champion on the metric; then the cascade, by alias."""
    import mlflow

    from pipelines.registry.loading import stage_model_name
    from pipelines.registry.promote import CHAMPION, promote
    from pipelines.registry.register import CascadeSpec, RegisterConfig, register_cascade

    step = StepDir.open(config.dir(REGISTRY_DIR) / "promote", "promote", config.promote, [evaluated["key"]])
    if (manifest := step.manifest()) is not None:
        return manifest
    client = mlflow.MlflowClient()
    stages = [s["shard_id"] for s in evaluated["shards"]]
    for shard in evaluated["shards"]:
        stage = shard["shard_id"]
        if step.is_done(stage):
            continue
        aliases = client.get_registered_model(stage_model_name(config.model_name, stage)).aliases
        if str(aliases.get(CHAMPION)) == str(shard["version"]):  # decided before an interruption
            outcome = {"outcome": "already_champion", "challenger_version": shard["version"]}
        else:
            p = config.promote
            decision = promote(config.model_name, stage, p.metric, min_abs=p.min_abs, min_rel=p.min_rel)
            outcome = {"outcome": decision.outcome, "challenger_version": decision.challenger_version,
                       "champion_version": decision.champion_version, "summary": decision.summary()}
        step.mark_done(stage, {"version": shard["version"], "metrics": shard["metrics"], "promotion": outcome})
    cascade = register_cascade(config.model_name, CascadeSpec(stages=tuple(stages), alias=config.register.cascade_alias),
                               RegisterConfig(experiment=config.register.experiment or config.experiment,
                                              device=config.register.device))
    return step.finish(stages, model_uri=f"models:/{config.model_name}@champion", cascade_version=cascade)


# -- the run --------------------------------------------------------------------------------------------------
def step_names(config: PipelineConfig) -> list[str]:
    return ["ingest", "curate", "report", "embed", *(f"train_{s}" for s in config.train), "heldout", "register",
            "evaluate", "promote"]


def step_dirs(config: PipelineConfig) -> dict[str, str]:
    registry = config.dir(REGISTRY_DIR)
    return {
        "ingest": str(config.dir(INGEST_DIR)), "curate": str(config.dir(CURATE_DIR)),
        "report": str(config.dir(CURATE_DIR) / "report"), "embed": str(config.dir(EMBED_DIR)),
        **{f"train_{s}": t.output_dir for s, t in config.train.items()},
        "heldout": str(config.dir(HELDOUT_DIR)), "register": str(registry / "register"),
        "evaluate": str(registry / "evaluate"), "promote": str(registry / "promote"),
    }


class _Steps:
    """Runs named steps under the pipeline's MLflow run, with state for `imagen status` and a line each."""

    def __init__(self, config: PipelineConfig, pipeline: Any, state: RunState, out: RunOutput) -> None:
        self.config, self.pipeline, self.state, self.out = config, pipeline, state, out

    def __call__(self, name: str, run: Callable[[], dict[str, Any]],
                 progress: tuple[int, str, Callable[[], int]] | None = None) -> dict[str, Any]:
        started = time.monotonic()
        self.state.update(name, state="running", started_at=time.time())
        self.out.start(name)
        if progress is not None:
            self.out.progress(name, *progress)
        try:
            manifest = self.pipeline.step(name, lambda: _rerun_on_change(self.config.root, name, run, self.out))
        except BaseException as error:
            self.state.update(name, state="failed", error=f"{type(error).__name__}: {error}"[:2000],
                              seconds=round(time.monotonic() - started, 1))
            self.out.failed(name, error)
            raise
        record = next((r for r in reversed(self.pipeline.records) if r.name == name), None)
        seconds = round(time.monotonic() - started, 1)
        self.state.update(name, state="done", seconds=seconds, key=manifest.get("key"),
                          mlflow_run_id=record.mlflow_run_id if record else None)
        self.out.done(name, seconds, _headline(name, manifest), skipped=record is not None and not record.recorded_now)
        return manifest


def _headline(name: str, manifest: dict[str, Any]) -> str:
    """A few words of what the step produced."""
    if name == "ingest":
        return f"{manifest.get('downloaded')} of {manifest.get('input_rows')} rows downloaded"
    if name == "curate" and manifest.get("funnel"):
        return f"kept {manifest['funnel']['kept']} of {manifest['funnel']['input']}"
    if name == "embed":
        return f"{sum(s.get('rows', 0) for s in manifest.get('shards', []))} captions embedded"
    if name.startswith("train_"):
        metrics = manifest.get("metrics") or {}
        loss = metrics.get("val_loss", metrics.get("loss"))
        return f"export {manifest.get('export_dir')}" + (f", val_loss {loss:.4f}" if isinstance(loss, float) else "")
    if name == "evaluate":
        return "; ".join(f"{s['shard_id']}: " + ", ".join(f"{k} {v:.3f}" for k, v in s["metrics"].items())
                         for s in manifest.get("shards", []))
    if name == "promote":
        outcomes = ", ".join(f"{s['shard_id']} {s['promotion'].get('outcome')}" for s in manifest.get("shards", []))
        return f"{outcomes}; cascade {manifest.get('model_uri')} v{manifest.get('cascade_version')}"
    return ""


def _train_all(config: PipelineConfig, steps: _Steps, embed_key: str, pipeline: Any) -> dict[str, dict[str, Any]]:
    """Every stage's training: at once when the cluster has room for all of them, else one after another."""
    import ray

    demands = [stage_demand(t) for t in config.train.values()]
    together = len(demands) > 1 and fits_together(demands, ray.cluster_resources())
    steps.out.line(f"training {len(config.train)} stage(s) " + ("concurrently" if together else "one after another")
                   + f" (cluster: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                     f"{ray.cluster_resources().get('GPU', 0):g} GPUs)")
    from pipelines.train.ledger import ledger_steps

    run = {name: (lambda t=t, name=name: steps(
        f"train_{name}", lambda: train_step(t, embed_key, pipeline.nested_tags, config.ray),
        progress=(t.total_steps, "step", lambda t=t: ledger_steps(t.output_dir, 0))))
        for name, t in config.train.items()}
    if not together:
        return {name: fn() for name, fn in run.items()}
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            results[name] = run[name]()
        except BaseException as error:  # noqa: BLE001 - re-raised in the driver thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,), name=f"train-{name}") for name in run]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {name: results[name] for name in config.train}


def run_pipeline(config: PipelineConfig, out: RunOutput | None = None) -> dict[str, Any]:
    """Run (or continue) the pipeline in `config.run_dir`; returns every step's manifest and the run's record."""
    from pipelines.curate import curate
    from pipelines.embed import embed
    from pipelines.ingest import run_ingest
    from pipelines.preflight import preflight
    from pipelines.ray_env import init_ray
    from pipelines.workflow import PipelineRun

    root = config.root
    preflight(config)  # seconds, before any step: every field, the URL list, the store, MLflow, DeepSpeed, widths
    root.mkdir()
    out = out or RunOutput(config.log_path)
    with out.capture():
        from imagen_core.config_io import to_dict

        state = RunState(root, step_names(config), step_dirs(config))
        try:
            with PipelineRun(root, config.mlflow_uri, config.experiment, root.name, params=to_dict(config)) as pipeline:
                from pipelines.tracking import configure_tracking

                configure_tracking(config.mlflow_uri)
                init_ray(config.ray)
                steps = _Steps(config, pipeline, state, out)
                ingested = steps("ingest", lambda: run_ingest(config.ingest, config.ray))
                curated = steps("curate", lambda: curate(config.dir(INGEST_DIR), config.dir(CURATE_DIR), config.curate,
                                                         score_dir=config.dir(SCORES_DIR)))
                steps("report", lambda: {"key": step_key("report", {}, [curated["key"]]), **_report(config)})
                embedded = steps("embed", lambda: embed(config.dir(CURATE_DIR), config.dir(EMBED_DIR), config.embed),
                                 progress=(len(curated["shards"]), "shard", count_files(config.dir(EMBED_DIR), "_done/*.json")))
                trained = _train_all(config, steps, embedded["key"], pipeline)
                val_fraction = next(iter(config.train.values())).data.val_fraction
                steps("heldout", lambda: export_heldout(config.dir(EMBED_DIR), config.dir(HELDOUT_DIR), val_fraction))
                registered = steps("register", lambda: register_step(config, trained))
                evaluated = steps("evaluate", lambda: evaluate_step(config, registered))
                promoted = steps("promote", lambda: promote_step(config, evaluated))
                summary = {
                    "run_dir": str(root), "mlflow": config.mlflow_uri, "mlflow_run_id": pipeline.run_id,
                    "log_file": str(config.log_path), "ingest": ingested, "curate": curated, "embed": embedded,
                    "train": trained, "register": registered, "evaluate": evaluated, "promote": promoted,
                    "model_uri": promoted["model_uri"], "steps": pipeline.summary(),
                }
        except BaseException:
            state.finish("failed")
            raise
        finally:
            _stop_local_ray(config)
            _keep_log(config)
        state.finish("done")
    atomic_write_json(root / "summary.json", summary)
    return summary


def _keep_log(config: PipelineConfig) -> None:
    """An object-store run keeps a copy of its log beside its outputs (the live log is a local file)."""
    if not config.root.is_local and config.log_path.exists():
        (config.root / "run.log").write_bytes(config.log_path.read_bytes())


def _stop_local_ray(config: PipelineConfig) -> None:
    """Shut down a Ray this run started, inside the capture: its last forwarded worker logs go to the log file."""
    import ray

    if config.ray.address is None and ray.is_initialized():
        ray.shutdown()


def _report(config: PipelineConfig) -> dict[str, Any]:
    """The curation report, once per curation (report.json is written last)."""
    from pipelines.report import report

    written = config.dir(CURATE_DIR) / "report" / "report.json"
    if written.exists():
        return written.read_json()
    return report(config.dir(CURATE_DIR), ingest_dir=config.dir(INGEST_DIR), tracking_uri=config.mlflow_uri,
                  experiment=config.experiment)
