"""Training checkpoints: DeepSpeed's own files, the EMA and each rank's data position, with a manifest per rank.

Each rank writes into its own local directory and reports it to Ray Train, which merges the ranks' files into
one checkpoint directory in storage (RunConfig.storage_path: local, NFS, s3:// ...):

    ds/...                           engine.save_checkpoint (model, optimiser partitions, lr schedule)
    latest                           DeepSpeed's pointer to the tag "ds" (rank 0)
    ema/                             rank 0: the EMA in imagen_core's safetensors format (separate from the weights)
    trainer_state.rank<r>.json       step, epoch, micro-batches consumed in the epoch, samples seen by rank r
    manifest.rank<r>.json            written LAST by rank r: size and sha256 of every file rank r wrote

A checkpoint counts only if all world_size manifests are there and every file they list has its recorded
size (each rank also re-hashes its own files): an interrupted upload or a truncated file is detected, the
ranks agree on it (all-reduce) and fall back to the previous checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.step import atomic_write_json

logger = logging.getLogger(__name__)

DS_TAG = "ds"
EMA_DIR = "ema"
STATE_FILE = "trainer_state.rank{rank}.json"
MANIFEST_FILE = "manifest.rank{rank}.json"
_CHUNK = 1 << 22


class CheckpointInvalid(RuntimeError):
    """No reported checkpoint passed verification."""


@dataclasses.dataclass
class TrainState:
    """Where one rank is: enough to continue without repeating or skipping data."""

    step: int = 0
    """Optimiser steps done."""
    epoch: int = 0
    """Epoch of the next micro-batch."""
    batches_in_epoch: int = 0
    """Micro-batches this rank consumed in `epoch` (skipped on resume)."""
    samples_seen: int = 0
    """Samples this rank trained on, all epochs."""
    world_size: int = 1
    """Ranks of the run that wrote it (the data split depends on it)."""

    @classmethod
    def read(cls, directory: Path, rank: int) -> "TrainState":
        return cls(**json.loads((directory / STATE_FILE.format(rank=rank)).read_text()))

    def write(self, directory: Path, rank: int) -> None:
        atomic_write_json(directory / STATE_FILE.format(rank=rank), dataclasses.asdict(self))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, rank: int, world_size: int, step: int) -> None:
    """Record every file this rank wrote into `directory`; call it after everything else."""
    own = MANIFEST_FILE.format(rank=rank)
    files = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != own
    }
    atomic_write_json(directory / own, {"rank": rank, "world_size": world_size, "step": step, "files": files})


def verify(directory: Path, rank: int, world_size: int) -> list[str]:
    """Problems with a merged checkpoint directory, as seen by `rank` (empty: usable)."""
    problems: list[str] = []
    steps = set()
    for r in range(world_size):
        path = directory / MANIFEST_FILE.format(rank=r)
        if not path.is_file():
            problems.append(f"{path.name} is missing (rank {r} did not finish writing or uploading)")
            continue
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            problems.append(f"{path.name} is not valid JSON: {error}")
            continue
        if manifest.get("world_size") != world_size:
            problems.append(
                f"written by {manifest.get('world_size')} ranks, this run has {world_size}: resume with the same "
                "num_workers (the data split and the ZeRO partitions depend on it)"
            )
            continue
        steps.add(manifest.get("step"))
        for name, record in manifest["files"].items():
            problems += _check_file(directory / name, record, rehash=(r == rank))
    if len(steps) > 1:
        problems.append(f"the ranks' manifests disagree on the step: {sorted(steps)}")
    return problems


def _check_file(path: Path, record: dict[str, Any], rehash: bool) -> list[str]:
    if not path.is_file():
        return [f"{path.name} is missing"]
    size = path.stat().st_size
    if size != record["bytes"]:
        return [f"{path} has {size} bytes, its manifest records {record['bytes']} (truncated or replaced)"]
    if rehash and sha256(path) != record["sha256"]:
        return [f"{path} does not match its recorded sha256 (changed after saving)"]
    return []


def candidates() -> list[Any]:
    """The run's reported checkpoints, newest first (those Ray Train restored from storage included)."""
    import ray.train

    return [r.checkpoint for r in reversed(ray.train.get_all_reported_checkpoints())]


def all_ranks_agree(ok: bool) -> bool:
    """True only if `ok` on every rank (an all-reduce MIN over the process group Ray Train made)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.is_initialized() and dist.get_backend() == "nccl":
        flag = flag.cuda()
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(engine: Any, weights: Any, state: TrainState, stage_config: dict[str, Any], rank: int, world_size: int,
         directory: Path) -> Path:
    """Collective: write this rank's part of the checkpoint into `directory` (a fresh local directory)."""
    from imagen_core.checkpoint import save_checkpoint

    engine.save_checkpoint(str(directory), tag=DS_TAG)
    if weights.ema is not None:
        save_checkpoint(directory / EMA_DIR, weights.ema.state_dict(), stage_config, {"step": state.step})
    state.write(directory, rank)
    write_manifest(directory, rank, world_size, state.step)
    return directory


@contextlib.contextmanager
def latest_valid(rank: int, world_size: int) -> Iterator[tuple[Path, TrainState] | None]:
    """Collective: the newest reported checkpoint that every rank verifies, as a local directory (kept for the
    duration of the block: for remote storage it is a download) with this rank's TrainState; None when the
    run has no checkpoint yet. Damaged checkpoints are logged and skipped in favour of older ones."""
    reported = candidates()
    if not reported:
        yield None
        return
    for checkpoint in reported:
        with checkpoint.as_directory() as local:
            directory = Path(local)
            problems = verify(directory, rank, world_size)
            if all_ranks_agree(not problems):
                yield directory, TrainState.read(directory, rank)
                return
            logger.warning("rank %d: skipping checkpoint %s: %s", rank, checkpoint.path,
                           "; ".join(problems) or "another rank found it damaged")
    raise CheckpointInvalid(
        f"none of the run's {len(reported)} reported checkpoints verified (see the warnings above); "
        "delete the run directory to start over, or restore a checkpoint from a backup"
    )


def load(directory: Path, engine: Any, weights: Any) -> None:
    """Collective: training weights, optimiser and lr-schedule state into the engine; the EMA into the EMA only
    (never into the training weights)."""
    from imagen_core.checkpoint import load_checkpoint

    loaded, _ = engine.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointInvalid(f"DeepSpeed could not load {directory} although it verified")
    if weights.ema is not None:
        ema_state, _ = load_checkpoint(directory / EMA_DIR)
        weights.ema.load_state_dict(ema_state)
