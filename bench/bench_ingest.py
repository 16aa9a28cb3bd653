"""Benchmark: the ingest step against raw img2dataset on the same loopback corpus and settings.

    .venv/bin/python bench/bench_ingest.py [--images 2000] [--rows-per-shard 250] [--repeats 2]

Baseline: `img2dataset.download` (multiprocessing distributor, one process per core, 16 threads each,
parquet in, parquet out), the tool the ingest step wraps. Ours: `run_ingest` on a running local Ray with one
shard task per core (cpus_per_shard=1) and the same 16 threads, resize (center_crop to 64), encoding (JPEG 95)
and shard size, plus what it adds per row: the fetch policy (address check, opt-out header), the
normalised schema, sha256 of the stored bytes, the done records. Both read the same URL list from a demo corpus
of 256x256 JPEGs served by a threaded HTTP server on 127.0.0.1 in this process. Runs alternate
(baseline, ours, baseline, ...) and the best of each is compared. Prints the machine, each run and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine  # noqa: E402 - bench/ is on sys.path when a script here runs

THREADS = 16
IMAGE_SIZE = 64


def run_img2dataset(url_list: Path, out: Path, rows_per_shard: int) -> tuple[float, int]:
    import img2dataset
    import pyarrow.parquet as pq

    started = time.monotonic()
    img2dataset.download(
        url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
        output_format="parquet", output_folder=str(out), processes_count=os.cpu_count() or 1,
        thread_count=THREADS, image_size=IMAGE_SIZE, resize_mode="center_crop", encode_format="jpg",
        encode_quality=95, number_sample_per_shard=rows_per_shard, distributor="multiprocessing",
        timeout=10, retries=0, compute_hash=None, verify_hash=None, enable_wandb=False, disallowed_header_directives=["noai", "noimageai"],
    )
    seconds = time.monotonic() - started
    ok = sum(int((pq.read_table(p, columns=["status"])["status"].to_numpy(zero_copy_only=False) == "success").sum())
             for p in out.glob("*.parquet"))
    return seconds, ok


def run_ours(url_list: Path, out: Path, rows_per_shard: int) -> tuple[float, int]:
    from pipelines.fetch_policy import FetchPolicyConfig
    from pipelines.ingest import IngestConfig, run_ingest
    from pipelines.url_lists import UrlListConfig

    config = IngestConfig(url_list=UrlListConfig(paths=(str(url_list),)), output_dir=str(out),
                          rows_per_shard=rows_per_shard, image_size=IMAGE_SIZE, threads_per_shard=THREADS,
                          cpus_per_shard=1.0, policy=FetchPolicyConfig(allow_loopback=True))
    started = time.monotonic()
    manifest = run_ingest(config)
    return time.monotonic() - started, int(manifest["by_status"].get("success", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rows-per-shard", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import logging

    import ray

    from common import served_demo_corpus
    from pipelines.ray_env import RayConfig, init_ray

    logging.getLogger("img2dataset").setLevel(logging.ERROR)
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        with served_demo_corpus(work, args.images) as corpus:
            started = time.monotonic()
            init_ray(RayConfig(num_cpus=os.cpu_count()))  # a cluster is up before a step runs: not timed
            print(f"Ray started in {time.monotonic() - started:.1f}s (not in the figures)")
            best: dict[str, tuple[float, int]] = {}
            for repeat in range(args.repeats):
                for name, fn in (("img2dataset", run_img2dataset), ("ingest", run_ours)):
                    out = work / f"{name}-{repeat}"
                    seconds, ok = fn(corpus.url_list, out, args.rows_per_shard)
                    shutil.rmtree(out, ignore_errors=True)
                    print(json.dumps({"run": name, "repeat": repeat, "seconds": round(seconds, 2), "ok": ok,
                                      "samples_per_s": round(args.images / seconds, 1)}))
                    if name not in best or seconds < best[name][0]:
                        best[name] = (seconds, ok)
            ray.shutdown()
        base, ours = best["img2dataset"], best["ingest"]
        print(json.dumps({
            "rows": args.images, "img2dataset_samples_per_s": round(args.images / base[0], 1),
            "ingest_samples_per_s": round(args.images / ours[0], 1),
            "ratio_ingest_to_img2dataset": round(base[0] / ours[0], 3), "ok_img2dataset": base[1], "ok_ingest": ours[1],
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
