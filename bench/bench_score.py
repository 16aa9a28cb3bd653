"""Benchmark: CLIP scoring through the curate step's Ray Data actor pool against a plain single-process loop.

    .venv/bin/python bench/bench_score.py [--images 480] [--rows-per-shard 40] [--model ViT-B-32] [--precision bf16]

`--model imagen-tiny-clip` (the demo's 3.7M-parameter CLIP on 64 px) makes the work preprocessing-bound.

Both score the same ingest shards with the same CLIP (an open_clip architecture with random weights saved to
a .safetensors file and loaded by the real loading path: same compute as the pretrained model, no hub) and the
same per-row work (decode, thumbnail, image and caption embeddings, concept margins, one Parquet file per
shard). Baseline: one process, `ShardScorer.score_shard` over the shards in order, fp32 (open_clip's default),
torch with every core as intra-op threads (what a script would do). Ours: `curate.score` with the default stages
(CPU decode tasks of 0.5 CPU each feeding 2 model actors, 1 torch thread each) at `--precision` (bf16: what a
CPU with bf16 instructions should be given), on a running local Ray (its start is not timed). Two more rows
separate the two causes: the plain loop at ours' precision, and the pool in fp32. Prints the machine, every
figure, the ratios and how far ours' scores are from the baseline's.
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
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="ours' CLIP precision")
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

        def config(precision: str) -> ScoreConfig:
            return ScoreConfig(clip=ClipConfig(model_name=args.model, pretrained=str(weights), batch_size=32,
                                               precision=precision))

        def pool(precision: str, out: Path) -> float:
            started = time.monotonic()
            score(ingest, out, config(precision))
            return time.monotonic() - started

        scored = sum(pq.read_table(p, columns=["status"])["status"].to_pylist().count("success")
                     for p in (ingest / "shards").glob("*.parquet"))
        seconds = {
            "plain_loop_fp32": plain_loop(config("fp32"), ingest, work / "plain_loop_fp32"),
            f"ray_pool_{args.precision}": pool(args.precision, work / f"ray_pool_{args.precision}"),
        }
        if args.precision != "fp32":  # the same comparison at equal precision, both ways
            seconds[f"plain_loop_{args.precision}"] = plain_loop(config(args.precision), ingest,
                                                                 work / f"plain_loop_{args.precision}")
            seconds["ray_pool_fp32"] = pool("fp32", work / "ray_pool_fp32")
        ray.shutdown()
        ours, base = f"ray_pool_{args.precision}", "plain_loop_fp32"
        # rounding differs with threads and precision (and so may the argmax over random weights' near-equal sims)
        floats = ["clip_score", "image_embedding", "unsafe_margin", "unsafe_concept"]
        tables = {name: {p.name: pq.read_table(p) for p in (work / name / "shards").glob("*.parquet")} for name in seconds}
        same = all(tables[ours][n].drop_columns(floats).equals(t.drop_columns(floats)) for n, t in tables[base].items())
        diffs = [abs(a - b) for n, t in tables[base].items() for a, b in
                 zip(t["clip_score"].to_pylist(), tables[ours][n]["clip_score"].to_pylist()) if a is not None]
        print(json.dumps({
            "model": args.model, "rows": args.images, "images_scored": scored,
            **{f"{name}_images_per_s": round(scored / s, 2) for name, s in seconds.items()},
            f"ratio_{ours}_to_{base}": round(seconds[base] / seconds[ours], 3),
            **({f"ratio_ray_pool_to_plain_loop_both_{args.precision}":
                round(seconds[f"plain_loop_{args.precision}"] / seconds[ours], 3),
                "ratio_ray_pool_to_plain_loop_both_fp32": round(seconds[base] / seconds["ray_pool_fp32"], 3)}
               if args.precision != "fp32" else {}),
            **{f"{name}_s": round(s, 1) for name, s in seconds.items()},
            "max_abs_clip_score_diff_to_baseline": round(max(diffs), 5),
            "same_outputs_but_float_rounding": same,
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
