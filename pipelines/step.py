"""A pipeline step as a set of shards: one input shard -> one output shard + a stats record.

Durability without Ray Workflows (removed after Ray 2.47): a step's state lives on disk.
- A shard is finished when its stats record `_done/<shard_id>.json` exists; the record is written last
  and atomically, after the shard's outputs, so a killed shard leaves no record and is redone whole.
- The step is finished when `manifest.json` exists with the step's key: the hash of its config and
  its inputs' keys. It is written last, atomically. A different config or input gives a different key:
  a step directory that holds another key is refused rather than mixed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from pipelines import storage
from pipelines.storage import StoragePath

MANIFEST = "manifest.json"
DONE_DIR = "_done"


def canonical_json(obj: Any) -> str:
    """Stable JSON for hashing: dataclasses become dicts, keys sorted, no whitespace."""

    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, (pathlib.PurePath, StoragePath)):
            return str(o)
        raise TypeError(f"cannot hash a {type(o).__name__} in a step config")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default)


def step_key(name: str, config: Any, input_keys: Sequence[str]) -> str:
    """Hash of the step's name, config and its inputs' keys: what makes an output reusable."""
    payload = canonical_json({"step": name, "config": config, "inputs": list(input_keys)})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def atomic_write_bytes(path: str | os.PathLike | StoragePath, data: bytes) -> None:
    """Whole-object write, local or object store: a reader sees the old file or the new one, never half."""
    storage.path(path).write_bytes(data)


def atomic_write_json(path: str | os.PathLike | StoragePath, obj: Any) -> None:
    storage.path(path).write_json(obj)


def atomic_write_parquet(path: str | os.PathLike | StoragePath, table: Any, **write_options: Any) -> None:
    """Write a pyarrow Table whole, so a reader never sees half a shard."""
    storage.path(path).write_parquet(table, **write_options)


class StepKeyMismatch(RuntimeError):
    """The output directory holds a step run with another config or other inputs."""

    def __init__(self, message: str, root: str | os.PathLike) -> None:
        super().__init__(message)
        self.root = str(root)

    def __reduce__(self) -> tuple[Any, ...]:  # keeps `root` across Ray's pickling of task errors
        return type(self), (self.args[0], self.root)


@dataclasses.dataclass(frozen=True)
class StepDir:
    """The output directory of one step run, keyed by `step_key`."""

    root: StoragePath
    name: str
    key: str

    @classmethod
    def open(cls, root: str | os.PathLike | StoragePath, name: str, config: Any, input_keys: Sequence[str]) -> "StepDir":
        """Open (creating) the step directory; refuse one that belongs to a different key."""
        root = storage.path(root)
        step = cls(root=root, name=name, key=step_key(name, config, input_keys))
        key_file = root / "_key.json"
        if key_file.exists():
            held = key_file.read_json()
            if held.get("key") != step.key:
                raise StepKeyMismatch(
                    f"{root} holds step {held.get('step')!r} with key {held.get('key')}, but this run's "
                    f"config/inputs give key {step.key}. Use a new output directory, or delete {root} "
                    "to recompute it.", root,
                )
        else:
            atomic_write_json(key_file, {"step": name, "key": step.key, "config": json.loads(canonical_json(config))})
        return step

    # -- shards ---------------------------------------------------------------------------------
    def done_path(self, shard_id: str) -> StoragePath:
        return self.root / DONE_DIR / f"{shard_id}.json"

    def is_done(self, shard_id: str) -> bool:
        return self.done_path(shard_id).exists()

    def mark_done(self, shard_id: str, stats: dict[str, Any]) -> None:
        atomic_write_json(self.done_path(shard_id), {"shard_id": shard_id, **stats})

    def shard_stats(self, shard_id: str) -> dict[str, Any]:
        return self.done_path(shard_id).read_json()

    def pending(self, shard_ids: Iterable[str]) -> list[str]:
        done = {f.stem for f in (self.root / DONE_DIR).files("*.json")}  # one listing, not a request per shard
        return [s for s in shard_ids if s not in done]

    # -- the step as a whole --------------------------------------------------------------------
    @property
    def manifest_path(self) -> StoragePath:
        return self.root / MANIFEST

    def manifest(self) -> dict[str, Any] | None:
        """The finished step's manifest, or None when the step has not finished with this key."""
        if not self.manifest_path.exists():
            return None
        manifest = self.manifest_path.read_json()
        return manifest if manifest.get("key") == self.key else None

    def finish(self, shard_ids: Sequence[str], **summary: Any) -> dict[str, Any]:
        """Write the manifest last: the step's outputs are complete and reusable."""
        manifest = {
            "step": self.name,
            "key": self.key,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "shards": [self.shard_stats(s) for s in shard_ids],
            **summary,
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest


class ShardFailed(RuntimeError):
    """A shard failed on every allowed attempt."""


def run_shards(
    remote_fn: Any,
    shard_args: dict[str, tuple],
    *,
    max_in_flight: int,
    max_attempts: int = 3,
    timeout_s: float | None = None,
    on_done: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """Run one Ray task per shard with retries and a per-attempt timeout; never hangs on a straggler.

    `remote_fn` is a `ray.remote` function; `shard_args[shard_id]` its arguments. A task that raises
    or outlives `timeout_s` is cancelled and resubmitted, up to `max_attempts` in all. Ray's own
    `max_retries` covers a dead worker process; this loop covers exceptions and hangs, which
    img2dataset's Ray distributor does not retry.
    """
    import ray

    queue = list(shard_args)
    attempts = {s: 0 for s in queue}
    running: dict[Any, tuple[str, float]] = {}
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    while queue or running:
        while queue and len(running) < max_in_flight:
            shard = queue.pop(0)
            attempts[shard] += 1
            running[remote_fn.remote(*shard_args[shard])] = (shard, time.monotonic())
        ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        for ref in ready:
            shard, _ = running.pop(ref)
            try:
                results[shard] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - any task error is retried, then reported
                errors[shard] = f"{type(exc).__name__}: {exc}"
                if attempts[shard] < max_attempts:
                    queue.append(shard)
                continue
            if on_done is not None:
                on_done(shard, results[shard])
        if timeout_s is not None:
            now = time.monotonic()
            for ref, (shard, started) in list(running.items()):
                if now - started > timeout_s:
                    ray.cancel(ref, force=True)
                    running.pop(ref)
                    errors[shard] = f"timed out after {timeout_s:.0f}s"
                    if attempts[shard] < max_attempts:
                        queue.append(shard)
    failed = {s: e for s, e in errors.items() if s not in results}
    if failed:
        lines = "\n".join(f"  {s}: {e}" for s, e in sorted(failed.items()))
        raise ShardFailed(
            f"{len(failed)} shard(s) failed after {max_attempts} attempts (finished shards are kept; "
            f"rerun to retry only these):\n{lines}"
        )
    return results


# -- shards of finished steps, and Ray Data actor pools over them -----------------------------------------
@dataclasses.dataclass(kw_only=True, frozen=True)
class ActorPoolConfig:
    """Ray resources of a model-running step (not part of any step key: they never change outputs)."""

    size: int = 2
    """Actors in the pool, each holding one model copy."""
    num_cpus: float = 0.5
    """CPUs reserved per actor. Fractional on purpose: 2 actors x 1 CPU on a 2-CPU Ray deadlocked
    Ray Data on this project's 2-core machines, the driver's own tasks need room too."""
    num_gpus: float = 0.0
    """GPUs per actor (set with ClipConfig/TextEncoder device "cuda")."""
    torch_threads: int = 1
    """torch intra-op threads per actor; more actors, fewer threads each."""
    start_timeout_s: int = 1800
    """Seconds to wait for the pool's actors to be placed and load their model before any input is read: an
    error then names a cluster without the requested CPUs/GPUs (or weights that do not load) before work starts,
    and the model's load does not compete with the stages that feed it for cores."""

    def __post_init__(self) -> None:
        if self.size < 1 or self.num_cpus <= 0 or self.num_gpus < 0 or self.torch_threads < 1 \
                or self.start_timeout_s < 1:
            raise ValueError(f"ActorPoolConfig needs size >= 1, num_cpus > 0, num_gpus >= 0, torch_threads >= 1, "
                             f"start_timeout_s >= 1: {self}")

    def wait_for_actors(self, dataset: Any) -> Any:
        """`dataset` set to start this pool's actors first and fail after start_timeout_s (Ray Data's default
        starts them alongside the stages before them and waits forever for resources that never come)."""
        dataset.context.wait_for_min_actors_s = self.start_timeout_s
        return dataset

    @contextlib.contextmanager
    def explained_start_timeout(self, field: str) -> Iterator[None]:
        """Ray's timeout for this pool's start, re-raised saying what to change (`field`: the pool's config key)."""
        import ray

        try:
            yield
        except ray.exceptions.GetTimeoutError as exc:
            raise RuntimeError(
                f"the actor pool {field} ({self.size} actors x {self.num_cpus:g} CPU, {self.num_gpus:g} GPU each) "
                f"did not start within {field}.start_timeout_s={self.start_timeout_s}: the cluster lacks those "
                f"resources (set {field}.num_gpus, num_cpus or size to what its nodes have) or the model takes "
                f"longer to load (raise {field}.start_timeout_s)") from exc


def finished_manifest(step_dir: str | os.PathLike | StoragePath, what: str) -> dict[str, Any]:
    """The manifest of a finished upstream step, or a clear error saying to run it first."""
    path = storage.path(step_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{what} at {step_dir} has not finished (no manifest.json): run {what} first")
    return path.read_json()


def shard_ids_of(manifest: dict[str, Any]) -> list[str]:
    return [s["shard_id"] for s in manifest["shards"]]


def shard_path(step_dir: str | os.PathLike | StoragePath, shard_id: str, sub: str = "shards") -> StoragePath:
    return storage.path(step_dir) / sub / f"{shard_id}.parquet"


def map_shards_on_actor_pool(actor_cls: type, constructor_kwargs: dict[str, Any], shard_ids: Sequence[str],
                             pool: ActorPoolConfig, pool_field: str = "pool") -> None:
    """Run `actor_cls(**constructor_kwargs)(batch)` over shards, one shard per call, on an actor pool.

    The shard is the unit of work (each call writes one output shard and its done record), so a
    killed run resumes shard by shard. One shard id per block: Ray Data would otherwise pack the few
    small items into one block and run them on one actor.
    """
    import ray

    from pipelines.ray_env import init_ray

    init_ray()
    ds = ray.data.from_items([{"shard_id": s} for s in shard_ids]).repartition(len(shard_ids))
    ds = ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(pool.size, len(shard_ids))),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
    )
    with pool.explained_start_timeout(pool_field):
        done = {row["shard_id"] for row in pool.wait_for_actors(ds).take_all()}
    missing = set(shard_ids) - done
    if missing:
        raise RuntimeError(f"actor pool returned no result for shards {sorted(missing)}")
