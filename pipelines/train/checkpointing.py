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

On resume from remote storage (s3://, ...) each rank reads only the files it needs (`files_for_rank`: its own
optimiser partition, trainer_state and manifest, plus the model-state file DeepSpeed loads on every rank), after
checking every file's size from one listing; from local storage the checkpoint is read in place.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

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

    def read(name: str) -> bytes | None:
        path = directory / name
        return path.read_bytes() if path.is_file() else None

    def size_of(name: str) -> int | None:
        path = directory / name
        return path.stat().st_size if path.is_file() else None

    manifests, problems = _read_manifests(read, world_size)
    return problems + _check_files(manifests, size_of, lambda name: sha256(directory / name),
                                   lambda name: str(directory / name), rank)


def _read_manifests(read: Callable[[str], bytes | None],
                    world_size: int) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Every rank's parsed manifest, and the problems of those missing, unreadable or from another world size."""
    problems: list[str] = []
    manifests: dict[int, dict[str, Any]] = {}
    for r in range(world_size):
        name = MANIFEST_FILE.format(rank=r)
        data = read(name)
        if data is None:
            problems.append(f"{name} is missing (rank {r} did not finish writing or uploading)")
            continue
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            problems.append(f"{name} is not valid JSON: {error}")
            continue
        if manifest.get("world_size") != world_size:
            problems.append(
                f"written by {manifest.get('world_size')} ranks, this run has {world_size}: resume with the same "
                "num_workers (the data split and the ZeRO partitions depend on it)"
            )
            continue
        manifests[r] = manifest
    steps = {m.get("step") for m in manifests.values()}
    if len(steps) > 1:
        problems.append(f"the ranks' manifests disagree on the step: {sorted(steps, key=str)}")
    return manifests, problems


def _check_files(manifests: dict[int, dict[str, Any]], size_of: Callable[[str], int | None],
                 hash_of: Callable[[str], str] | None, where: Callable[[str], str], rank: int,
                 only: set[str] | None = None) -> list[str]:
    """Every file the manifests list (or those in `only`) has its recorded size; `rank`'s own files also their
    recorded sha256 (when `hash_of` is given)."""
    problems: list[str] = []
    for r, manifest in sorted(manifests.items()):
        for name, record in manifest["files"].items():
            if only is not None and name not in only:
                continue
            size = size_of(name)
            if size is None:
                problems.append(f"{name.rsplit('/', 1)[-1]} is missing")
            elif size != record["bytes"]:
                problems.append(f"{where(name)} has {size} bytes, its manifest records {record['bytes']} "
                                "(truncated or replaced)")
            elif r == rank and hash_of is not None and hash_of(name) != record["sha256"]:
                problems.append(f"{where(name)} does not match its recorded sha256 (changed after saving)")
    return problems


_SHARED_MODEL_STATE = re.compile(rf"^{DS_TAG}/mp_rank_\d+_model_states\.pt$")


def files_for_rank(manifests: dict[int, dict[str, Any]], rank: int) -> list[str]:
    """What `rank` needs to restore: every file it wrote itself (its ZeRO optimiser partition, trainer_state and
    manifest; on rank 0 also the EMA and DeepSpeed's pointer) and the model-state file DeepSpeed loads on every
    rank (ZeRO 0-2: ds/mp_rank_00_model_states.pt, written by rank 0). Under ZeRO-3 each rank wrote its own
    model-state partition (zero_pp_rank_<r>_...): the other ranks' partitions are never read."""
    own = set(manifests[rank]["files"]) | {MANIFEST_FILE.format(rank=rank)}
    shared = {name for r, m in manifests.items() if r != rank for name in m["files"] if _SHARED_MODEL_STATE.match(name)}
    return sorted(own | shared)


def fetch_for_rank(fs: Any, root: str, local: Path, rank: int, world_size: int) -> tuple[list[str], list[str]]:
    """(problems, files fetched) of a checkpoint in remote storage (`fs`, a pyarrow filesystem, at `root`): one
    listing gives every file's size, the ranks' manifests are read (small), every listed file's size is checked
    against them, and only `files_for_rank` are downloaded into `local`, where this rank re-hashes its own."""
    import pyarrow.fs as pafs

    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as error:
        return [f"{root} cannot be listed: {error}"], []
    sizes = {info.path[len(root) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}

    def read(name: str) -> bytes | None:
        if name not in sizes:
            return None
        with fs.open_input_stream(f"{root}/{name}") as f:
            return f.read()

    manifests, problems = _read_manifests(read, world_size)
    problems += _check_files(manifests, sizes.get, None, lambda name: f"{root}/{name}", rank)
    if problems or rank not in manifests:
        return problems, []
    wanted = files_for_rank(manifests, rank)
    local_fs = pafs.LocalFileSystem()

    def download(name: str) -> None:
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{root}/{name}", str(target), source_filesystem=fs, destination_filesystem=local_fs)

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(wanted))) as pool:
        list(pool.map(download, wanted))

    def local_size(name: str) -> int | None:
        path = local / name
        return path.stat().st_size if path.is_file() else None

    problems += _check_files(manifests, local_size, lambda name: sha256(local / name),
                             lambda name: f"{root}/{name}", rank, only=set(wanted))
    return problems, wanted


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


class Restored(NamedTuple):
    """What `latest_valid` found: a local directory with this rank's files, its TrainState, what was fetched."""

    directory: Path
    state: TrainState
    fetched: list[str] | None
    """Files (relative to the checkpoint) this rank downloaded from remote storage; None: read in place."""
    checkpoint_path: str


def _is_local(fs: Any) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


@contextlib.contextmanager
def latest_valid(rank: int, world_size: int) -> Iterator[Restored | None]:
    """Collective: the newest reported checkpoint that every rank verifies, as a local directory (kept for the
    duration of the block) with this rank's TrainState; None when the run has no checkpoint yet. Local storage
    is read in place; from remote storage this rank downloads only `files_for_rank`. Damaged checkpoints are
    logged and skipped in favour of older ones."""
    reported = candidates()
    if not reported:
        yield None
        return
    for checkpoint in reported:
        fs, root = checkpoint.filesystem, checkpoint.path
        scratch: Path | None = None
        if _is_local(fs):
            directory, fetched = Path(root), None
            problems = verify(directory, rank, world_size)
        else:
            scratch = directory = Path(tempfile.mkdtemp(prefix=f"restore-rank{rank}-"))
            problems, fetched = fetch_for_rank(fs, root, directory, rank, world_size)
        try:
            if all_ranks_agree(not problems):
                if fetched is not None:
                    size = sum((directory / name).stat().st_size for name in fetched)
                    logger.info("rank %d: restoring %s: fetched %d files (%.1f MB): %s", rank, root, len(fetched),
                                size / 1e6, ", ".join(fetched))
                yield Restored(directory, TrainState.read(directory, rank), fetched, str(root))
                return
            logger.warning("rank %d: skipping checkpoint %s: %s", rank, root,
                           "; ".join(problems) or "another rank found it damaged")
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
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
