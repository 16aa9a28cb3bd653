"""Benchmark: CLIP scoring through the curate step's Ray Data actor pool against a plain single-process loop.

    .venv/bin/python bench/bench_score.py [--images 480] [--rows-per-shard 40] [--model ViT-B-32]

`--model imagen-tiny-clip` (the demo's 3.7M-parameter CLIP on 64 px) makes the work preprocessing-bound.

Both score the same ingest shards with the same CLIP (an open_clip architecture with random weights saved to
a .safetensors file and loaded by the real loading path: same compute as the pretrained model, no hub) and the
same per-row work (decode, thumbnail, image and caption embeddings, concept margins, one Parquet file per
shard). Baseline: one process, `ShardScorer.score_shard` over the shards in order, torch with every core as
intra-op threads (what a script would do). Ours: `curate.score` with the default stages (CPU decode tasks of
0.5 CPU each feeding 2 model actors, 1 torch thread each), on a running local Ray (its start is not timed). Prints the machine, both figures and
the ratio.
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


def random_weights(model: str, path: Path) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from pipelines.clip_model import TINY_CLIP_NAME, register_tiny_clip

    if model == TINY_CLIP_NAME:
        register_tiny_clip()
    torch.manual_seed(0)
    clip = open_clip.create_model(model, pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


def ingest_corpus(work: Path, images: int, rows_per_shard: int) -> Path:
    from common import served_demo_corpus
    from pipelines.fetch_policy import FetchPolicyConfig
    from pipelines.ingest import IngestConfig, run_ingest
    from pipelines.url_lists import UrlListConfig

    with served_demo_corpus(work, images) as corpus:
        run_ingest(IngestConfig(url_list=UrlListConfig(paths=(str(corpus.url_list),)), output_dir=str(work / "ingest"),
                                rows_per_shard=rows_per_shard, image_size=256,
                                policy=FetchPolicyConfig(allow_loopback=True)))
    return work / "ingest"


def plain_loop(config, ingest: Path, out: Path) -> float:
    """The baseline: the same scorer, called shard after shard in this process, torch on every core."""
    from pipelines.curate import ShardScorer
    from pipelines.step import StepDir, atomic_write_parquet, shard_ids_of, shard_path

    manifest = json.loads((ingest / "manifest.json").read_text())
    step = StepDir.open(out, "curate_score", config, [manifest["key"]])
    started = time.monotonic()
    scorer = ShardScorer(config, str(ingest), step, torch_threads=os.cpu_count() or 1)  # sets torch's threads
    for shard_id in shard_ids_of(manifest):
        atomic_write_parquet(shard_path(out, shard_id), scorer.score_shard(shard_path(ingest, shard_id)))
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--rows-per-shard", type=int, default=40)
    parser.add_argument("--model", default="ViT-B-32")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import ray

    from pipelines.clip_model import ClipConfig
    from pipelines.curate import ScoreConfig, score
    from pipelines.ray_env import RayConfig, init_ray

    print(machine())
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        init_ray(RayConfig(num_cpus=os.cpu_count()))
        ingest = ingest_corpus(work, args.images, args.rows_per_shard)
        weights = random_weights(args.model, work / "clip.safetensors")
        config = ScoreConfig(clip=ClipConfig(model_name=args.model, pretrained=str(weights), batch_size=32))
        scored = sum(pq.read_table(p, columns=["status"])["status"].to_pylist().count("success")
                     for p in (ingest / "shards").glob("*.parquet"))
        baseline_s = plain_loop(config, ingest, work / "plain")
        started = time.monotonic()
        score(ingest, work / "ray", config)
        ours_s = time.monotonic() - started
        ray.shutdown()
        floats = ["clip_score", "image_embedding", "unsafe_margin"]  # rounding differs with the thread count
        same = all(pq.read_table(work / "ray" / "shards" / p.name).drop_columns(floats)
                   .equals(pq.read_table(p).drop_columns(floats)) for p in (work / "plain" / "shards").glob("*.parquet"))
        print(json.dumps({
            "model": args.model, "rows": args.images, "images_scored": scored,
            "plain_loop_images_per_s": round(scored / baseline_s, 2), "ray_pool_images_per_s": round(scored / ours_s, 2),
            "ratio_ray_pool_to_plain_loop": round(baseline_s / ours_s, 3), "plain_loop_s": round(baseline_s, 1),
            "ray_pool_s": round(ours_s, 1), "same_outputs_but_float_rounding": same,
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
