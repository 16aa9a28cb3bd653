"""An inverted-file (IVF) index over CLIP embeddings, built from shards, searched without loading it.

The autofaiss / SemDeDup recipe with faiss doing the vector work:
1. train: faiss k-means (spherical, seeded) on a sample of the embeddings, chosen by a hash of each
   row's key (so the sample, hence the clusters, do not depend on how rows are sharded); the centroids
   go into the coarse quantizer: an exact scan up to 16384 lists, a faiss HNSW graph beyond
   (IVF65536_HNSW32-style: assignment costs O(log lists), not O(lists)).
2. assign: per shard (a Ray task), each row's `nprobe` nearest lists; rows are written to one Arrow
   file per shard, sorted by bucket (a bucket is a group of lists), the bucket offsets in the file's
   metadata (`write_partitioned`).
3. reduce: per bucket (a Ray task), the bucket's slice of every shard file (each partition is its own
   record batches: memory-mapped on a local disk, ranged reads on an object store, only those bytes are
   read), sorted by (list, key) into `lists/<bucket>.arrow` with per-list offsets.

A query (`IvfIndex.search`) reads the quantizer, then only its `nprobe` lists: memory is O(nprobe x
list size), not O(rows). Curation's near-duplicate pass uses the same training and assignment with
several probes per row (pipelines/dedup.py); `imagen data search` queries the index built over the
curated rows (`build_search_index`). Every file (shards, work files, quantizer, lists) goes through
pipelines/storage.py: the directories may be local paths or object-store URLs (s3://bucket/prefix).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.step import (StepDir, atomic_write_bytes, atomic_write_json, atomic_write_parquet, finished_manifest,
                            shard_ids_of, shard_path)
from pipelines.storage import StoragePath

PARTS_META = b"partitions"
BATCHES_META = b"partition_batches"
FLAT_QUANTIZER_MAX_LISTS = 16_384
"""Up to this many lists the coarse quantizer is an exact scan of the centroids (faiss IndexFlatIP),
beyond it an HNSW graph: at 619 lists HNSW (efSearch 64) compared more vectors than a scan."""
INDEX_DIR = "index"
QUANTIZER_FILE = "quantizer.faiss"
CENTROIDS_FILE = "centroids.npy"


# -- files on a local disk or an object store (pipelines/storage.py) ---------------------------------------
Where = str | os.PathLike | StoragePath


def read_parquet(path: Where, columns: Sequence[str] | None = None, **options: Any) -> pa.Table:
    """pq.read_table of a local file or an object-store URL, through the store's cached filesystem."""
    p = storage.path(path)
    if p.is_local:
        return pq.read_table(str(p), columns=None if columns is None else list(columns), **options)
    return pq.read_table(p.fs_path, columns=None if columns is None else list(columns), filesystem=p.fs, **options)


def read_parquet_schema(path: Where) -> pa.Schema:
    p = storage.path(path)
    return pq.read_schema(str(p)) if p.is_local else pq.read_schema(p.fs_path, filesystem=p.fs)


def parquet_file(path: Where) -> pq.ParquetFile:
    """A ParquetFile (metadata, row groups read one at a time) of a local file or an object-store URL."""
    p = storage.path(path)
    return pq.ParquetFile(str(p)) if p.is_local else pq.ParquetFile(p.open_input())


def load_npy(path: Where) -> np.ndarray:
    p = storage.path(path)
    if p.is_local:
        return np.load(p.local)
    import io

    return np.load(io.BytesIO(p.read_bytes()))


def remove_tree(folder: Where) -> None:
    """Delete a work folder (or prefix) and everything under it; errors are ignored, as shutil.rmtree's."""
    try:
        storage.path(folder).remove()
    except OSError:
        pass


@dataclass(kw_only=True, frozen=True)
class IvfConfig:
    """How the inverted file is laid out (part of a step key: it changes which rows are compared)."""

    rows_per_list: int = 1024
    """Target rows per inverted list (k-means cluster): lists = ceil(rows / rows_per_list). Work per
    row is O(nprobe x rows_per_list), independent of the total."""
    train_points_per_list: int = 64
    """k-means training sample per list (faiss warns below 39)."""
    max_train_points: int = 262_144
    """Cap on the training sample (it is held in one task's memory)."""
    kmeans_iterations: int = 20
    """Lloyd iterations."""
    seed: int = 1234
    """Seeds k-means and the sample hash: same data and seed, same lists."""
    hnsw_neighbors: int = 32
    """HNSW graph degree of the coarse quantizer."""
    rows_per_bucket: int = 262_144
    """Rows one reduce task holds (a bucket is several lists)."""

    def __post_init__(self) -> None:
        for name in ("rows_per_list", "train_points_per_list", "max_train_points", "kmeans_iterations",
                     "hnsw_neighbors", "rows_per_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"IvfConfig.{name} must be >= 1, got {getattr(self, name)}")

    def n_lists(self, n_rows: int) -> int:
        return max(1, math.ceil(n_rows / self.rows_per_list))

    def n_buckets(self, n_entries: int) -> int:
        return max(1, math.ceil(n_entries / self.rows_per_bucket))

    def sample_fraction(self, n_rows: int) -> float:
        lists = self.n_lists(n_rows)
        if lists == 1 or n_rows == 0:
            return 0.0
        want = min(self.max_train_points, lists * self.train_points_per_list)
        return min(1.0, want / n_rows)


# -- shard-independent sampling ---------------------------------------------------------------------
def string_hash(strings: pa.Array | pa.ChunkedArray, seed: int = 0) -> np.ndarray:
    """A uint64 hash of each string (FNV-1a over its bytes, then the splitmix64 finaliser), vectorised
    over rows (the loop runs over byte positions): the same string hashes the same in every shard."""
    arr = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    arr = pc.fill_null(arr.cast(pa.large_string()), "")
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, count=n + 1, offset=arr.offset * 8)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, 0xCBF29CE484222325 ^ (seed * 0x9E3779B97F4A7C15 % 2**64), np.uint64)
    prime = np.uint64(0x100000001B3)
    for j in range(int(lengths.max()) if n else 0):
        live = j < lengths
        byte = np.where(live, data[np.minimum(starts + j, len(data) - 1)], 0).astype(np.uint64)
        h = np.where(live, (h ^ byte) * prime, h)
    h ^= lengths.astype(np.uint64)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def sample_mask(keys: pa.Array | pa.ChunkedArray, fraction: float, seed: int) -> np.ndarray:
    if fraction <= 0:
        return np.zeros(len(keys), bool)
    if fraction >= 1:
        return np.ones(len(keys), bool)
    return string_hash(keys, seed) < np.uint64(int(fraction * float(2 ** 64 - 1)))


# -- the coarse quantizer ---------------------------------------------------------------------------
@dataclass
class Quantizer:
    """k-means centroids (unit vectors) and the HNSW graph over them."""

    centroids: np.ndarray
    index: Any = None  # faiss.IndexHNSWFlat (inner product), None for a single list

    @property
    def n_lists(self) -> int:
        return len(self.centroids)

    def assign(self, emb: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(lists (N, p), similarities (N, p)), nearest first, p = min(nprobe, lists)."""
        emb = np.ascontiguousarray(emb, np.float32)
        p = min(nprobe, self.n_lists)
        if self.n_lists == 1:
            return np.zeros((len(emb), 1), np.int64), emb @ self.centroids.T
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(64, 2 * p)
        sims, lists = self.index.search(emb, p)
        return lists.astype(np.int64), sims

    def save(self, folder: Where) -> None:
        import faiss

        folder = storage.path(folder)
        folder.mkdir()
        buf = _np_bytes(self.centroids)
        atomic_write_bytes(folder / CENTROIDS_FILE, buf)
        if self.index is not None:
            atomic_write_bytes(folder / QUANTIZER_FILE, faiss.serialize_index(self.index).tobytes())

    @classmethod
    def load(cls, folder: Where) -> "Quantizer":
        import faiss

        folder = storage.path(folder)
        centroids = load_npy(folder / CENTROIDS_FILE)
        index = None
        graph = folder / QUANTIZER_FILE
        if graph.exists():
            raw = np.fromfile(graph.local, np.uint8) if graph.is_local else np.frombuffer(graph.read_bytes(), np.uint8)
            index = faiss.deserialize_index(raw)
        return cls(centroids=centroids, index=index)


def _np_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def train_from_samples(sample_paths: Sequence[str], column: str, n_lists: int, config: IvfConfig, dim: int,
                       folder: str) -> int:
    """A Ray task: read the per-shard samples, sort them by key, train, save into `folder`; returns the
    list count. The sample is capped by IvfConfig.max_train_points, so this task's memory is bounded."""
    if sample_paths and n_lists > 1:
        sample = pa.concat_tables([read_parquet(p, columns=["key", column]) for p in sample_paths])
        sample = sample.take(pc.sort_indices(sample, sort_keys=[("key", "ascending")]))
        quantizer = train_quantizer(unit(embeddings_of(sample[column])), n_lists, config, dim)
    else:
        quantizer = Quantizer(centroids=np.full((1, dim), 1.0 / math.sqrt(dim), np.float32))
    quantizer.save(storage.path(folder))
    return quantizer.n_lists


def train_quantizer(sample: np.ndarray, n_lists: int, config: IvfConfig, dim: int) -> Quantizer:
    """k-means on the sample (rows in key order: the same sample gives the same centroids), then HNSW.
    Fewer sample points than lists shrink the list count (each list needs a centroid)."""
    import faiss

    sample = np.ascontiguousarray(sample, np.float32)
    n_lists = min(n_lists, len(sample))
    if n_lists <= 1:
        mean = sample.mean(0) if len(sample) else np.ones(dim, np.float32)
        norm = np.linalg.norm(mean)
        return Quantizer(centroids=(mean / (norm if norm > 0 else 1.0))[None, :].astype(np.float32))
    kmeans = faiss.Kmeans(dim, n_lists, niter=config.kmeans_iterations, seed=config.seed, spherical=True,
                          max_points_per_centroid=max(256, config.train_points_per_list),
                          min_points_per_centroid=1, verbose=False)
    kmeans.train(sample)
    centroids = np.ascontiguousarray(kmeans.centroids, np.float32)
    if n_lists <= FLAT_QUANTIZER_MAX_LISTS:  # a scan of the centroids beats a graph walk at this size
        index = faiss.IndexFlatIP(dim)
        index.add(centroids)
        return Quantizer(centroids=centroids, index=index)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # HNSW insertion order decides the graph: build it single-threaded
    try:
        index = faiss.IndexHNSWFlat(dim, config.hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(centroids)
    finally:
        faiss.omp_set_num_threads(threads)
    return Quantizer(centroids=centroids, index=index)


# -- partitioned files: one file per producer, sorted by partition, offsets in the metadata -----------
def write_partitioned(path: Where, table: pa.Table, part: np.ndarray, n_parts: int,
                      sort_within: Sequence[str] = ()) -> None:
    """Write `table` sorted by `part` (then `sort_within` columns) as an uncompressed Arrow IPC file
    with `n_parts + 1` row offsets in its metadata, whole (a local temp file renamed, or one object).

    Each partition is its own record batches (their first batch index per partition is in the metadata
    too), so a reader of one partition reads only its bytes: from a memory map, or ranged reads from a store."""
    part = np.asarray(part, np.int64)
    table = table.append_column("__part", pa.array(part))
    keys = [("__part", "ascending")] + [(c, "ascending") for c in sort_within]
    table = table.take(pc.sort_indices(table, sort_keys=keys)) if table.num_rows else table
    counts = np.bincount(np.asarray(table["__part"]), minlength=n_parts) if table.num_rows else np.zeros(n_parts, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    table = table.drop_columns(["__part"])
    chunk = 65536
    batches = np.concatenate([[0], np.cumsum([-(-int(c) // chunk) for c in counts])]).tolist()
    schema = table.schema.with_metadata({**(table.schema.metadata or {}), PARTS_META: json.dumps(offsets).encode(),
                                         BATCHES_META: json.dumps(batches).encode()})
    table = table.replace_schema_metadata(schema.metadata)

    def write(sink: Any) -> None:
        with pa.ipc.new_file(sink, schema) as writer:
            for p in range(n_parts):
                start, stop = offsets[p], offsets[p + 1]
                for lo in range(start, stop, chunk):
                    # one batch per slice (combined: write_table would write one per chunk)
                    writer.write_batch(table.slice(lo, min(chunk, stop - lo)).combine_chunks().to_batches()[0])

    target = storage.path(path)
    if not target.is_local:
        fs, inner = target.fs, target.fs_path
        with fs.open_output_stream(inner) as sink:  # one object: complete on close, never half
            write(sink)
        return
    local = target.local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            write(sink)
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PartitionedFile:
    """A partitioned file, memory-mapped on a local disk or opened for ranged reads on a store:
    `part(p)` reads only partition p's bytes."""

    def __init__(self, path: Where) -> None:
        self.path = storage.path(path)
        self._source = pa.memory_map(str(self.path), "r") if self.path.is_local else self.path.open_input()
        self._reader = pa.ipc.open_file(self._source)
        metadata = self._reader.schema.metadata
        self.offsets = json.loads(metadata[PARTS_META])
        self._batches = json.loads(metadata[BATCHES_META]) if BATCHES_META in metadata else None
        self._table: pa.Table | None = None

    @property
    def n_parts(self) -> int:
        return len(self.offsets) - 1

    @property
    def schema(self) -> pa.Schema:
        return self._reader.schema

    def table(self) -> pa.Table:
        if self._table is None:
            self._table = self._reader.read_all()  # zero-copy over the memory map
        return self._table

    def part(self, p: int) -> pa.Table:
        if self._batches is None:  # a file written before partitions were whole batches
            start, stop = self.offsets[p], self.offsets[p + 1]
            return self.table().slice(start, stop - start)
        batches = [self._reader.get_batch(b) for b in range(self._batches[p], self._batches[p + 1])]
        return pa.Table.from_batches(batches, self._reader.schema)

    def close(self) -> None:
        self._table = None
        self._source.close()


def read_partition(paths: Sequence[Where], p: int) -> pa.Table | None:
    """Partition p of every file, concatenated (None when all are empty)."""
    parts = []
    for path in paths:
        f = PartitionedFile(path)
        piece = f.part(p)
        if piece.num_rows:
            parts.append(piece.combine_chunks())  # copies out of the map before it is closed
        f.close()
    return pa.concat_tables(parts) if parts else None


def embeddings_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column -> (N, E) float32."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)


def unit(emb: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norm > 0, norm, 1.0)


# -- the search index over a data directory ---------------------------------------------------------
SEARCH_COLUMNS = ["key", "caption", "clip_score", "clip_image_embedding"]


def _sample_shard(data_dir: str, shard_id: str, fraction: float, seed: int, out: str) -> int:
    table = read_parquet(shard_path(data_dir, shard_id), columns=["key", "clip_image_embedding"])
    pick = sample_mask(table["key"], fraction, seed)
    sample = table.filter(pa.array(pick))
    atomic_write_parquet(out, sample)
    return sample.num_rows


def single_threaded_faiss() -> None:
    """In a Ray task: one OpenMP thread (the tasks themselves fill the cores)."""
    import faiss

    faiss.omp_set_num_threads(1)


def _assign_shard(data_dir: str, shard_id: str, shard_index: int, folder: str, n_buckets: int, out: str) -> int:
    single_threaded_faiss()
    quantizer = Quantizer.load(folder)
    table = read_parquet(shard_path(data_dir, shard_id), columns=SEARCH_COLUMNS)
    emb = unit(embeddings_of(table["clip_image_embedding"]))
    lists, _ = quantizer.assign(emb, 1)
    home = lists[:, 0]
    entries = pa.table({
        "list": pa.array(home, pa.int32()),
        "key": table["key"], "caption": table["caption"],
        "clip_score": table["clip_score"].cast(pa.float32()),
        "shard": pa.array(np.full(table.num_rows, shard_index, np.int32)),
        "row": pa.array(np.arange(table.num_rows, dtype=np.int32)),
        "embedding": table["clip_image_embedding"],
    })
    write_partitioned(out, entries, home % n_buckets, n_buckets)
    return table.num_rows


def _reduce_bucket(inputs: list[str], bucket: int, n_lists: int, n_buckets: int, out: str) -> int:
    table = read_partition(inputs, bucket)
    lists_here = len(range(bucket, n_lists, n_buckets))
    if table is None:
        table = _empty_entries(inputs[0])
    local = (np.asarray(table["list"], np.int64) - bucket) // n_buckets if table.num_rows else np.zeros(0, np.int64)
    write_partitioned(out, table, local, lists_here, sort_within=("key",))
    return table.num_rows


def _empty_entries(any_input: str) -> pa.Table:
    f = PartitionedFile(any_input)
    schema = f.schema.remove_metadata()
    f.close()
    return schema.empty_table()


def build_search_index(data_dir: str | os.PathLike, config: IvfConfig = IvfConfig(), *,
                       out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build (once: a keyed step) the IVF index over a curate or embed directory's shards, into
    `<data_dir>/index/`. Runs as Ray tasks; the driver holds only counts. Returns the index manifest."""
    import ray

    from pipelines.ray_env import init_ray
    from pipelines.step import run_shards

    data_dir = storage.path(data_dir)  # absolute: paths travel to Ray workers
    manifest = finished_manifest(data_dir, "curate or embed")
    shard_ids = shard_ids_of(manifest)
    out = storage.path(out_dir) if out_dir else data_dir / INDEX_DIR
    step = StepDir.open(out, "search_index", config, [manifest["key"]])
    if (done := step.manifest()) is not None:
        return done
    started = time.monotonic()
    rows = {s: parquet_file(shard_path(data_dir, s)).metadata.num_rows for s in shard_ids}
    n_rows = sum(rows.values())
    if n_rows == 0:
        raise ValueError(f"{data_dir} holds no rows to index")
    clip = _clip_meta(data_dir, shard_ids)
    init_ray()
    work = out / "_work"
    fraction = config.sample_fraction(n_rows)
    n_lists = config.n_lists(n_rows)
    dim = read_parquet_schema(shard_path(data_dir, shard_ids[0])).field("clip_image_embedding").type.list_size
    if n_lists > 1:
        sampler = ray.remote(num_cpus=0.5)(_sample_shard)
        run_shards(sampler, {s: (str(data_dir), s, fraction, config.seed, str(work / f"sample_{s}.parquet"))
                             for s in shard_ids}, max_in_flight=4)
    trainer = ray.remote(num_cpus=1)(train_from_samples)
    samples = [str(work / f"sample_{s}.parquet") for s in shard_ids] if n_lists > 1 else []
    n_lists = ray.get(trainer.remote(samples, "clip_image_embedding", n_lists, config, dim, str(out)))
    n_buckets = min(n_lists, config.n_buckets(n_rows))
    assign = ray.remote(num_cpus=0.5)(_assign_shard)
    run_shards(assign, {s: (str(data_dir), s, i, str(out), n_buckets, str(work / f"assign_{s}.arrow"))
                        for i, s in enumerate(shard_ids)}, max_in_flight=4)
    inputs = [str(work / f"assign_{s}.arrow") for s in shard_ids]
    reduce = ray.remote(num_cpus=0.5)(_reduce_bucket)
    run_shards(reduce, {str(b): (inputs, b, n_lists, n_buckets, str(out / "lists" / f"{b:05d}.arrow"))
                        for b in range(n_buckets)}, max_in_flight=4)
    for b in range(n_buckets):
        step.mark_done(f"{b:05d}", {"bucket": b})
    remove_tree(work)
    meta = {"rows": n_rows, "lists": n_lists, "buckets": n_buckets, "dim": dim, "shard_ids": shard_ids,
            "clip": clip, "data_dir": str(data_dir), "config": dataclasses.asdict(config)}
    atomic_write_json(out / "index.json", meta)
    step.finish([f"{b:05d}" for b in range(n_buckets)], **{k: v for k, v in meta.items() if k != "shard_ids"},
                elapsed_s=round(time.monotonic() - started, 2))
    return step.manifest()


def _clip_meta(data_dir: StoragePath, shard_ids: Sequence[str]) -> dict[str, Any] | None:
    stored = (read_parquet_schema(shard_path(data_dir, shard_ids[0])).metadata or {}).get(b"clip")
    return json.loads(stored) if stored else None


class IvfIndex:
    """A built search index (local or on a store), opened read-only: the quantizer in memory, the lists
    memory-mapped (local) or read list by list (store)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = storage.path(folder)
        if not (self.folder / "manifest.json").exists():
            raise FileNotFoundError(f"no finished search index in {self.folder}: build it with build_search_index")
        self.meta = (self.folder / "index.json").read_json()
        self.quantizer = Quantizer.load(self.folder)
        self._files: dict[int, PartitionedFile] = {}

    def _list(self, list_id: int) -> pa.Table:
        bucket = list_id % self.meta["buckets"]
        if bucket not in self._files:
            self._files[bucket] = PartitionedFile(self.folder / "lists" / f"{bucket:05d}.arrow")
        return self._files[bucket].part(list_id // self.meta["buckets"])

    def search(self, queries: np.ndarray, k: int, nprobe: int = 16) -> list[pa.Table]:
        """Per query, up to k rows (key, caption, clip_score, shard, row, similarity), best first
        (ties by key). Exact within the probed lists; all lists are probed when nprobe >= lists."""
        queries = unit(np.atleast_2d(np.asarray(queries, np.float32)))
        lists, _ = self.quantizer.assign(queries, nprobe)
        out = []
        for q, probe in zip(queries, lists):
            parts = [t for t in (self._list(int(l)) for l in probe if l >= 0) if t.num_rows]
            if not parts:
                out.append(None)
                continue
            cand = pa.concat_tables(parts)
            emb = unit(embeddings_of(cand["embedding"]))
            sims = emb @ q
            keys = cand["key"].to_numpy(zero_copy_only=False).astype(str)
            top = np.lexsort((keys, -sims))[:k]
            out.append(cand.drop_columns(["embedding", "list"]).take(pa.array(top))
                       .append_column("similarity", pa.array(sims[top], pa.float32())))
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
