"""Ingest: a URL list -> normalized image shards, one Ray task per shard, resumable.

1. `validate_url_list` checks every file of the list in seconds, before any download.
2. `split_into_shards` writes input shards `inputs/<shard_id>.parquet` (key, url, caption); the key is the
   row's global number, so reruns give the same keys.
3. One Ray task per unfinished shard (`step.run_shards`: retries, per-attempt timeout) runs img2dataset
   1.47's `Downloader.download_shard` in-process on that one shard (not `img2dataset.download`, which
   spawns processes, and whose Ray distributor does not retry shards), with the fetch policy in place of
   img2dataset's `download_image`. Its parquet output is rewritten as `shards/<shard_id>.parquet` with
   OUTPUT_SCHEMA, every input row present, then `_done/<shard_id>.json` records the shard's counts.
4. `manifest.json` is written last with totals and timings.

A finished shard is never downloaded again; a shard killed midway has no `_done` record and is redone
whole (its output is written atomically, so a reader never sees half of it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import pathlib
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from pipelines import fetch_policy
from pipelines.fetch_policy import FetchPolicyConfig, refusal_kind
from pipelines.ray_env import RayConfig, init_ray
from pipelines import storage
from pipelines.storage import StoragePath
from pipelines.step import StepDir, atomic_write_json, atomic_write_parquet, run_shards
from pipelines.url_lists import UrlListConfig, shard_path, split_into_shards, validate_url_list

STEP_NAME = "ingest"
INPUTS_DIR = "inputs"
SHARDS_DIR = "shards"
STATUSES = ("success", "failed_to_download", "failed_to_decode", "refused", "failed_internal")
"""success; failed_to_download: HTTP/network error; failed_to_decode: not a decodable image (img2dataset's
failed_to_resize); refused: the fetch policy refused it (address, redirect, opt-out, size); failed_internal:
img2dataset returned no record for the row."""
OUTPUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
    ]
)
ResizeMode = Literal["center_crop", "keep_ratio", "keep_ratio_largest", "border", "no"]


@dataclass(kw_only=True, frozen=True)
class IngestConfig:
    url_list: UrlListConfig
    """Where the URLs and captions are."""
    output_dir: str
    """Step directory: inputs/, shards/, _done/, manifest.json. A local or shared path, or an object-store URL."""
    rows_per_shard: int = 10_000
    """Rows per shard: the unit of retry and resume."""
    image_size: int = 64
    """Side of the stored images: the cascade's largest stage size (64 for the demo)."""
    resize_mode: ResizeMode = "center_crop"
    """img2dataset's resize mode: center_crop gives square images of image_size."""
    resize_only_if_bigger: bool = False
    """Leave images smaller than image_size at their size (False: upscale them too)."""
    encode_format: Literal["jpg", "png"] = "jpg"
    """Encoding of the stored images."""
    encode_quality: int | None = None
    """JPEG quality 0-100 or PNG compression 0-9; None: 95 for jpg, 3 for png."""
    policy: FetchPolicyConfig = FetchPolicyConfig()
    """What may be fetched (addresses, opt-out, sizes, timeout)."""
    download_retries: int = 0
    """Extra tries per failed URL (img2dataset's retries)."""
    threads_per_shard: int = 16
    """Download threads in one shard task (downloads wait on the network, not the CPU)."""
    cpus_per_shard: float = 0.5
    """Ray CPUs reserved per shard task; fractional so a 2-CPU machine runs several (and never deadlocks)."""
    max_concurrent_shards: int | None = None
    """Shard tasks in flight; None: as many as the cluster's CPUs allow at cpus_per_shard."""
    max_attempts: int = 3
    """Attempts per shard (an exception or a timeout ends an attempt)."""
    shard_timeout_s: float | None = None
    """Wall-clock limit of one shard attempt; None: the time for every URL to time out, plus a minute."""

    def __post_init__(self) -> None:
        if not isinstance(self.url_list, UrlListConfig):
            raise TypeError(f"url_list must be a UrlListConfig, got {type(self.url_list).__name__}")
        if not self.output_dir:
            raise ValueError("output_dir must name the step directory")
        object.__setattr__(self, "output_dir", str(storage.path(self.output_dir)))  # absolute: sent to workers
        for name, low in (("rows_per_shard", 1), ("image_size", 8), ("threads_per_shard", 1), ("max_attempts", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.download_retries < 0:
            raise ValueError(f"download_retries must be >= 0, got {self.download_retries}")
        if self.cpus_per_shard <= 0:
            raise ValueError(f"cpus_per_shard must be > 0, got {self.cpus_per_shard}")
        if self.max_concurrent_shards is not None and self.max_concurrent_shards < 1:
            raise ValueError(f"max_concurrent_shards must be >= 1 or None, got {self.max_concurrent_shards}")
        limit = 100 if self.encode_format == "jpg" else 9
        if self.encode_quality is not None and not 0 <= self.encode_quality <= limit:
            raise ValueError(
                f"encode_quality for {self.encode_format} must be in [0, {limit}], got {self.encode_quality}"
            )

    @property
    def quality(self) -> int:
        if self.encode_quality is not None:
            return self.encode_quality
        return 95 if self.encode_format == "jpg" else 3

    @property
    def attempt_timeout_s(self) -> float:
        if self.shard_timeout_s is not None:
            return self.shard_timeout_s
        per_url = self.policy.timeout_s * (self.download_retries + 1)
        return math.ceil(self.rows_per_shard / self.threads_per_shard) * per_url + 60.0

    def identity(self) -> dict[str, Any]:
        """The fields that decide the output (not threads, attempts, timeouts of attempts)."""
        return {
            "url_list": self.url_list,
            "rows_per_shard": self.rows_per_shard,
            "image_size": self.image_size,
            "resize_mode": self.resize_mode,
            "resize_only_if_bigger": self.resize_only_if_bigger,
            "encode_format": self.encode_format,
            "encode_quality": self.quality,
            "policy": self.policy,
            "download_retries": self.download_retries,
        }


# -- one shard ------------------------------------------------------------------------------------
_POLICY_LOCK = threading.Lock()


@contextlib.contextmanager
def _fetch_policy_installed(policy: FetchPolicyConfig) -> Iterator[None]:
    """Run img2dataset's Downloader with the policy's fetch.

    img2dataset 1.47 has no hook for the fetch: `Downloader.download_shard` calls the module-level
    `download_image_with_retry`, which calls the module-level `download_image`. We swap that name for
    the shard's duration. The lock keeps two shards run in one process from mixing policies (under Ray a
    worker runs one task at a time).
    """
    i2d = fetch_policy.img2dataset_downloader()
    with _POLICY_LOCK:
        original = i2d.download_image
        i2d.download_image = functools.partial(fetch_policy.download_image, policy=policy)
        try:
            yield
        finally:
            i2d.download_image = original


def _run_img2dataset(config: IngestConfig, inputs: pa.Table, shard_index: int, scratch: pathlib.Path) -> pa.Table:
    """img2dataset's downloader on one shard, in this process; returns its parquet output."""
    import pyarrow.parquet as pq

    Downloader = fetch_policy.img2dataset_downloader().Downloader  # noqa: N806 - a class
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    # Our key travels as an extra column: img2dataset's own key is (shard, position), not the row id.
    table = pa.table({"url": inputs["url"], "caption": inputs["caption"], "row_key": inputs["key"]})
    feather = scratch / "input.arrow"  # download_shard reads an Arrow IPC file (and deletes it)
    with pa.OSFile(str(feather), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    out = scratch / "img2dataset"
    out.mkdir()
    policy = config.policy
    resizer = Resizer(
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_format=config.encode_format,
        encode_quality=config.quality,
        max_image_area=policy.max_image_pixels,
    )
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter,
        resizer=resizer,
        thread_count=config.threads_per_shard,
        save_caption=True,
        extract_exif=False,
        output_folder=str(out),
        column_list=["url", "caption", "row_key"],
        timeout=policy.timeout_s,
        number_sample_per_shard=max(inputs.num_rows, 1),
        oom_shard_count=5,
        compute_hash=None,  # img2dataset hashes the downloaded bytes; we hash the stored ones below
        verify_hash_type=None,
        encode_format=config.encode_format,
        retries=config.download_retries,
        user_agent_token=policy.user_agent_token,
        disallowed_header_directives=list(policy.opt_out_directives) if policy.honour_opt_out else None,
    )
    with _fetch_policy_installed(policy):
        downloader.download_shard((shard_index, str(feather)))  # raises on a shard-level failure
    return pq.read_table(out / f"{shard_index:05d}.parquet")


def _status(i2d_status: str | None, error: str | None) -> str:
    if i2d_status is None:
        return "failed_internal"
    if i2d_status == "success":
        return "success"
    if i2d_status == "failed_to_resize":  # img2dataset's name for "decoding/resizing raised"
        return "failed_to_decode"
    return "refused" if refusal_kind(error) is not None else "failed_to_download"


def normalise(inputs: pa.Table, raw: pa.Table, encode_format: str) -> pa.Table:
    """img2dataset's output -> OUTPUT_SCHEMA, one row per input row in input order."""
    position = {k: i for i, k in enumerate(raw.column("row_key").to_pylist())}
    taken = raw.take(pa.array([position.get(k) for k in inputs.column("key").to_pylist()], pa.int64()))
    statuses, errors = [], []
    for i2d_status, error in zip(taken.column("status").to_pylist(), taken.column("error_message").to_pylist()):
        status = _status(i2d_status, error)
        statuses.append(status)
        if status == "failed_internal":
            error = "img2dataset recorded no result for this row (see the worker log)"
        errors.append(None if status == "success" else error or i2d_status)
    images = taken.column(encode_format).cast(pa.binary())
    digests = [None if b is None else hashlib.sha256(b).hexdigest() for b in images.to_pylist()]
    columns = {
        "key": inputs.column("key"),
        "url": inputs.column("url"),
        "caption": inputs.column("caption"),
        "status": pa.array(statuses, pa.string()),
        "error": pa.array(errors, pa.string()),
        "image": images,
        **{c: taken.column(c).cast(pa.int32()) for c in ("width", "height", "original_width", "original_height")},
        "sha256": pa.array(digests, pa.string()),
    }
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def failure_reason(status: str, error: str | None) -> str:
    """A short reason for counting: the policy's kind, or the error text cut to 120 characters."""
    kind = refusal_kind(error)
    if kind is not None:
        return f"refused: {kind}"
    return f"{status}: {(error or '')[:120]}"


def shard_stats(table: pa.Table) -> dict[str, Any]:
    rows = table.to_pydict()
    by_status = Counter(rows["status"])
    reasons = Counter(failure_reason(s, e) for s, e in zip(rows["status"], rows["error"]) if s != "success")
    return {
        "rows": table.num_rows,
        "by_status": dict(by_status),
        "by_reason": dict(reasons.most_common(20)),
        "image_bytes": sum(len(b) for b in rows["image"] if b is not None),
    }


def ingest_shard(config: IngestConfig, step: StepDir, shard_id: str) -> dict[str, Any]:
    """Download one input shard, write `shards/<shard_id>.parquet`, then its `_done` record (last)."""
    import pyarrow.parquet as pq

    started = time.monotonic()
    fetch_policy.img2dataset_downloader()  # seconds on a fresh worker (wandb, cv2, albumentations): timed apart
    imported = time.monotonic()
    out = storage.path(config.output_dir)
    inputs = pq.read_table(str(shard_path(out / INPUTS_DIR, shard_id)))
    with tempfile.TemporaryDirectory(prefix=f"ingest-{shard_id}-") as scratch:
        raw = _run_img2dataset(config, inputs, int(shard_id), pathlib.Path(scratch))
    downloaded = time.monotonic()
    table = normalise(inputs, raw, config.encode_format)
    atomic_write_parquet(output_shard_path(out, shard_id), table)
    stats = {
        **shard_stats(table),
        "import_s": round(imported - started, 3),
        "download_s": round(downloaded - imported, 3),
        "seconds": round(time.monotonic() - started, 3),
    }
    step.mark_done(shard_id, stats)
    return stats


def output_shard_path(output_dir: str | os.PathLike | StoragePath, shard_id: str) -> StoragePath:
    return storage.path(output_dir) / SHARDS_DIR / f"{shard_id}.parquet"


# -- the step -------------------------------------------------------------------------------------
def _summary(step: StepDir, shard_ids: list[str], timings: dict[str, float]) -> dict[str, Any]:
    stats = [step.shard_stats(s) for s in shard_ids]
    by_status: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    for s in stats:
        by_status.update(s["by_status"])
        by_reason.update(s["by_reason"])
    rows = sum(s["rows"] for s in stats)
    seconds = [s["seconds"] for s in stats]
    return {
        "input_rows": rows,
        "downloaded": by_status.get("success", 0),
        "failed": rows - by_status.get("success", 0),
        "by_status": dict(by_status),
        "failed_by_reason": dict(by_reason.most_common(50)),
        "shard_files": [f"{SHARDS_DIR}/{s}.parquet" for s in shard_ids],
        "schema": {f.name: str(f.type) for f in OUTPUT_SCHEMA},
        "timings": {
            **{k: round(v, 3) for k, v in timings.items()},
            "shard_s_mean": round(sum(seconds) / len(seconds), 3),
        },
    }


def _max_in_flight(config: IngestConfig) -> int:
    import ray

    if config.max_concurrent_shards is not None:
        return config.max_concurrent_shards
    return max(1, int(ray.cluster_resources().get("CPU", 1) / config.cpus_per_shard))


def run_ingest(config: IngestConfig, ray_config: RayConfig = RayConfig()) -> dict[str, Any]:
    """Run (or resume) the ingest step; return its manifest. A finished step returns at once."""
    started = time.monotonic()
    files = validate_url_list(config.url_list)  # seconds, before any download
    out = storage.path(config.output_dir)
    step = StepDir.open(out, STEP_NAME, config.identity(), [f.fingerprint() for f in files])
    if (manifest := step.manifest()) is not None:
        return manifest
    atomic_write_json(out / "config.json", dataclasses.asdict(config))
    validated = time.monotonic()
    shard_ids = split_into_shards(config.url_list, config.rows_per_shard, out / INPUTS_DIR, files)
    split = time.monotonic()
    pending = step.pending(shard_ids)
    if pending:
        import ray

        init_ray(ray_config)
        task = ray.remote(num_cpus=config.cpus_per_shard)(ingest_shard)
        run_shards(
            task,
            {s: (config, step, s) for s in pending},
            max_in_flight=_max_in_flight(config),
            max_attempts=config.max_attempts,
            timeout_s=config.attempt_timeout_s,
        )
    finished = time.monotonic()
    timings = {
        "validate_s": validated - started,
        "split_s": split - validated,
        "download_s": finished - split,
        "total_s": finished - started,
    }
    summary = _summary(step, shard_ids, timings)
    return step.finish(shard_ids, shards_resumed=len(shard_ids) - len(pending), **summary)


def read_output(output_dir: str | os.PathLike) -> pa.Table:
    """All output shards of a finished ingest as one table (for checks and small corpora)."""
    import pyarrow.parquet as pq

    manifest_path = storage.path(output_dir) / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{output_dir} holds no finished ingest (no manifest.json); run run_ingest first")
    files = manifest_path.read_json()["shard_files"]
    return pa.concat_tables([pq.read_table(str(storage.path(output_dir) / f), schema=OUTPUT_SCHEMA) for f in files])
