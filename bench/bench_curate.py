"""Benchmark of curation's selection pass (filters, exact and near dedup, the search index) on synthetic
scores: time per million rows and peak driver memory at several row counts.

    .venv/bin/python bench/bench_curate.py [--rows 100000 1000000] [--rows-per-shard 50000] [--out DIR]

Synthetic data, made once per size under --out (reused by later runs and by bench/bench_search.py):
ingest shards (metadata, a 16x16 PNG per row from a pool of 256) and score shards (CLIP score, a 64-dim
fp16 unit embedding around one of 4096 topics, cosine ~0.55 within a topic, an 8x8 thumbnail). Planted:
1% exact copies (same sha256, embedding, image) and 1% near copies (embedding at cosine ~0.99, the same
image, a thumbnail off by a few levels); 2% failed downloads; CLIP scores N(0.3, 0.05), so the default
absolute 0.28 rejects about a third.

Each measurement runs `select` in a fresh child process (Ray started before the clock), so its
ru_maxrss is the driver's own peak; a sampler thread records the largest Ray worker RSS too.
Prints one JSON line per size and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine  # noqa: E402 - bench/ is on sys.path when a script here runs

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

DIM = 64
TOPICS = 4096
POOL = 256
CLIP = {"model_name": "synthetic", "pretrained": None}


# -- synthetic data -----------------------------------------------------------------------------------
def _pool_images() -> list[bytes]:
    import io

    from PIL import Image

    rng = np.random.default_rng(123)
    out = []
    for _ in range(POOL):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((16, 16), Image.Resampling.NEAREST) \
            .save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _hex(raw: np.ndarray) -> np.ndarray:
    lut = np.array([f"{i:02x}" for i in range(256)], dtype=object)
    out = lut[raw[:, 0]]
    for j in range(1, raw.shape[1]):
        out = out + lut[raw[:, j]]
    return out


def _shard(args: tuple) -> int:
    """One synthetic shard: rows [start, start + n) of the corpus; copies point at earlier rows."""
    out, shard_id, start, n, seed = args
    rng = np.random.default_rng(seed * 1_000_003 + start)
    topics = np.random.default_rng(seed).standard_normal((TOPICS, DIM)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    idx = np.arange(start, start + n)
    keys = np.char.zfill(idx.astype(str), 9).astype(object)
    kind = rng.random(n)
    exact, near, failed = kind < 0.01, (kind >= 0.01) & (kind < 0.02), kind > 0.98
    # a copy's source: a row with a smaller number in the same shard (or this row if none)
    source = np.where(exact | near, np.maximum(start, idx - rng.integers(1, 5000, n)), idx)
    base_rng = np.random.default_rng([seed, start])
    base = topics[base_rng.integers(0, TOPICS, n)] + 0.9 * base_rng.standard_normal((n, DIM)).astype(np.float32) / np.sqrt(DIM)
    thumbs = base_rng.integers(0, 256, (n, 192), dtype=np.uint8)
    sha_raw = base_rng.integers(0, 256, (n, 16), dtype=np.uint8)
    local = source - start
    emb = base[local].copy()
    emb[near] += 0.15 * rng.standard_normal((int(near.sum()), DIM)).astype(np.float32) / np.sqrt(DIM)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    thumb = thumbs[local].copy()
    thumb[near] = np.clip(thumb[near].astype(np.int16) + rng.integers(-3, 4, (int(near.sum()), 192)), 0, 255)
    sha = _hex(sha_raw[local])
    sha[near] = _hex(rng.integers(0, 256, (int(near.sum()), 16), dtype=np.uint8))
    pool = _pool_images()
    image = pa.array([pool[i % POOL] for i in source], pa.binary())
    status = np.where(failed, "failed_to_download", "success").astype(object)
    ok = ~failed
    words = np.array(["a", "red", "blue", "photo", "of", "the", "small", "cat", "house", "tree", "car", "on",
                      "green", "field", "street", "old", "new", "bright", "dark", "view"], dtype=object)
    caption = words[rng.integers(0, len(words), n)]
    for _ in range(5):
        caption = caption + " " + words[rng.integers(0, len(words), n)]
    ingest = pa.table({
        "key": pa.array(keys, pa.string()), "url": pa.array("http://example.invalid/" + keys + ".jpg", pa.string()),
        "caption": pa.array(caption, pa.string()), "status": pa.array(status, pa.string()),
        "error": pa.array(np.where(failed, "HTTP Error 404", None), pa.string()),
        "image": pa.array(image.to_pylist(), pa.binary(), mask=failed),
        "width": pa.array(np.where(ok, 256, 0), pa.int32(), mask=failed),
        "height": pa.array(np.where(ok, 256, 0), pa.int32(), mask=failed),
        "original_width": pa.array(np.where(ok, 512, 0), pa.int32(), mask=failed),
        "original_height": pa.array(np.where(ok, 384, 0), pa.int32(), mask=failed),
        "sha256": pa.array(sha, pa.string(), mask=failed),
    })
    score = np.clip(rng.normal(0.3, 0.05, n), -1, 1).astype(np.float32)
    emb16 = np.where(failed[:, None], 0, emb).astype(np.float16)
    scores = pa.table({
        "key": pa.array(keys, pa.string()),
        "clip_score": pa.array(score, mask=failed),
        "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb16.reshape(-1)), DIM),
        "thumbnail": pa.FixedSizeBinaryArray.from_buffers(pa.binary(192), n, [None, pa.py_buffer(
            np.where(failed[:, None], 0, thumb).astype(np.uint8).tobytes())]),
        "unsafe_margin": pa.array(rng.normal(-0.1, 0.02, n).astype(np.float32), mask=failed),
        "unsafe_concept": pa.array(np.where(failed, None, "gore"), pa.string()),
        "score_error": pa.nulls(n, pa.string()),
    }, metadata={"clip": json.dumps(CLIP)})
    pq.write_table(ingest, Path(out) / "ingest" / "shards" / f"{shard_id}.parquet")
    pq.write_table(scores, Path(out) / "scores" / "shards" / f"{shard_id}.parquet")
    return int(ok.sum())


def generate(root: Path, rows: int, rows_per_shard: int, seed: int = 0) -> tuple[Path, Path]:
    """The synthetic ingest and score step directories (made once; a finished pair is reused)."""
    from multiprocessing import Pool

    from pipelines.step import StepDir

    ingest, scores = root / "ingest", root / "scores"
    if (scores / "manifest.json").exists():
        return ingest, scores
    for d in (ingest, scores):
        (d / "shards").mkdir(parents=True, exist_ok=True)
    tasks = [(str(root), f"{i:05d}", start, min(rows_per_shard, rows - start), seed)
             for i, start in enumerate(range(0, rows, rows_per_shard))]
    started = time.monotonic()
    with Pool(min(2, os.cpu_count() or 1)) as pool:
        scored = pool.map(_shard, tasks)
    istep = StepDir.open(ingest, "ingest", {"synthetic": rows, "rows_per_shard": rows_per_shard, "seed": seed}, [])
    sstep = StepDir.open(scores, "curate_score", {"synthetic": rows, "seed": seed}, [istep.key])
    for (_, shard_id, _, n, _), ok in zip(tasks, scored):
        istep.mark_done(shard_id, {"rows": n})
        sstep.mark_done(shard_id, {"rows": n, "scored": ok})
    ids = [t[1] for t in tasks]
    istep.finish(ids)
    sstep.finish(ids, clip=CLIP)
    print(f"generated {rows} rows in {len(ids)} shards in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return ingest, scores


# -- one measurement (child process) --------------------------------------------------------------
def _worker_rss_sampler(stop: threading.Event, peak: dict) -> None:
    import psutil

    me = os.getpid()
    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                if proc.info["pid"] != me and "default_worker.py" in cmd:
                    peak["worker_mb"] = max(peak.get("worker_mb", 0), proc.info["memory_info"].rss / 2**20)
            except (psutil.Error, TypeError):
                pass
        stop.wait(0.5)


def measure(root: Path, out: Path) -> dict:
    import shutil

    import ray

    from pipelines.ann_index import IvfConfig, build_search_index
    from pipelines.curate import SelectConfig, select
    from pipelines.ray_env import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=os.cpu_count()))
    shutil.rmtree(out, ignore_errors=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_worker_rss_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    started = time.monotonic()
    manifest = select(root / "ingest", root / "scores", out, SelectConfig(), search_index=None)
    select_s = time.monotonic() - started
    started = time.monotonic()
    index = build_search_index(out, IvfConfig())
    index_s = time.monotonic() - started
    stop.set()
    sampler.join()
    ray.shutdown()
    driver_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the search's exact scan
    search = measure_search(root, out)
    funnel = {s["filter"]: s["removed"] for s in manifest["funnel"]["stages"] if s["removed"]}
    return {"select_s": round(select_s, 1), "index_s": round(index_s, 1), "stage_s": manifest["stage_s"],
            "driver_peak_mb": round(driver_peak_mb, 0), "search": search,
            "driver_mb_before_select": round(rss_before, 0), "worker_peak_mb": round(peak.get("worker_mb", 0), 0),
            "funnel": funnel, "kept": manifest["funnel"]["kept"], "index_lists": index["lists"],
            "dedup_buckets": manifest["dedup"]["buckets"]}


def measure_search(root: Path, out: Path, queries: int = 200, k: int = 10, nprobe: int = 16) -> dict:
    """Latency of IvfIndex.search (one query at a time, as `imagen data search` runs) and its recall@k against
    an exact scan of the kept rows, shard by shard; the queries are kept rows' embeddings plus noise."""
    from pipelines.ann_index import INDEX_DIR, IvfIndex, embeddings_of, unit

    rng = np.random.default_rng(7)
    first = sorted((out / "shards").glob("*.parquet"))[0]
    pool = unit(embeddings_of(pq.read_table(first, columns=["clip_image_embedding"])["clip_image_embedding"]))
    q = unit(pool[rng.choice(len(pool), queries)] + 0.1 * rng.standard_normal((queries, pool.shape[1])) / 8)
    index = IvfIndex(out / INDEX_DIR)
    started = time.monotonic()
    index.search(q[:1], k, nprobe)
    cold_ms = (time.monotonic() - started) * 1e3
    times, hits = [], []
    for vector in q:
        started = time.monotonic()
        hits.append(set(index.search(vector[None], k, nprobe)[0]["key"].to_pylist()))
        times.append((time.monotonic() - started) * 1e3)
    index.close()
    checked = 20  # exact top-k by a streaming scan (bounded memory), for the first queries
    best = [[] for _ in range(checked)]
    for shard in sorted((out / "shards").glob("*.parquet")):
        table = pq.read_table(shard, columns=["key", "clip_image_embedding"])
        sims = unit(embeddings_of(table["clip_image_embedding"])) @ q[:checked].T
        keys = table["key"].to_numpy(zero_copy_only=False)
        for j in range(checked):
            top = np.argsort(-sims[:, j])[:k]
            best[j] = sorted(best[j] + list(zip(sims[top, j], keys[top])), reverse=True)[:k]
    recall = float(np.mean([len(hits[j] & {key for _, key in best[j]}) / k for j in range(checked)]))
    return {"queries": queries, "k": k, "nprobe": nprobe, "cold_first_ms": round(cold_ms, 1),
            "median_ms": round(float(np.median(times)), 2), "p95_ms": round(float(np.percentile(times, 95)), 2),
            f"recall_at_{k}": round(recall, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rows-per-shard", type=int, default=50_000)
    parser.add_argument("--out", default="/tmp/bench_curate")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child: measure the data under this folder
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), Path(args.measure) / "curate")))
        return
    print(machine())
    for rows in args.rows:
        root = Path(args.out) / f"rows_{rows}"
        generate(root, rows, args.rows_per_shard)
        child = subprocess.run([sys.executable, __file__, "--measure", str(root)], capture_output=True, text=True)
        if child.returncode:
            print(child.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"measurement at {rows} rows failed")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        per_million = (result["select_s"] + result["index_s"]) / rows * 1e6
        planted_exact, planted_near = round(0.01 * rows), round(0.01 * rows)
        print(json.dumps({"rows": rows, "s_per_million_rows": round(per_million, 1),
                          "planted_exact_about": planted_exact, "planted_near_about": planted_near, **result}))


if __name__ == "__main__":
    main()
