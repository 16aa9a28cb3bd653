"""Benchmark of stage training on this machine: throughput, data wait, and per-rank memory per ZeRO stage.

    .venv/bin/python bench/bench_train.py [--steps 30] [--workers 2] [--out /tmp/bench_train] [--stages 0 1 2 3]

1. Throughput of the demo base recipe (imagen_core.recipes.stage_demo_base) trained by `train_stage`
   (Ray Train + DeepSpeed + Ray Data decoding), measured over the steps after the first few, against
   the baseline "plain torch": one process, the same model, AdamW and global batch, pre-decoded batches in
   memory (no Ray, no DeepSpeed, no data loading): what the hardware does for this model with nothing else.
   Once per ZeRO stage (0, 1, 2, 3): goal at least 0.85x the baseline at equal total cores.
2. Per-rank memory for ZeRO 0 (plain data parallel), 1, 2 and 3 with `--workers` workers, measured from each
   of those runs' engines (optimiser-state, parameter and fp32-master elements; process RSS), against ZeRO-0.

Prints the machine, the absolute numbers and the ratios. The embed-format input (demo-corpus images, tiny-T5
embeddings) is generated first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_model  # noqa: E402 - bench/ is on sys.path when a script here runs

import numpy as np  # noqa: E402
import torch  # noqa: E402

GOAL_RATIO = 0.85
"""Ray Train + DeepSpeed against the single-process loop at equal total cores (the issue's goal)."""
WARMUP_STEPS = 5
"""Steps left out of the throughput (worker start, first Ray Data execution, allocator warm-up)."""


def machine() -> str:
    import deepspeed
    import ray

    cpu = cpu_model()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0]
    versions = f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}"
    return (f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, {gpu}; load average {load:.1f}; "
            f"Python {platform.python_version()}, {versions}")


def write_demo_embeddings(out: Path, num_rows: int, image_size: int) -> None:
    """Demo-corpus scenes as embed-step Parquet (tiny-T5 embeddings, D in the schema metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imagen_core.recipes import tiny_text_encoder
    from imagen_core.text_encoder import build_text_encoder
    from pipelines.demo.corpus import encode, random_scene, render
    from pipelines.embed import EMBED_DIM_KEY, embeddings_column

    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(num_rows)]
    encoder = build_text_encoder(tiny_text_encoder())
    embeddings = encoder.encode_batched([s.caption() for s in scenes])
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, num_rows, 128):
        rows = range(start, min(start + 128, num_rows))
        n_tokens, column = embeddings_column([embeddings[i] for i in rows])
        table = pa.table({
            "key": [f"{i:08d}" for i in rows],
            "caption": [scenes[i].caption() for i in rows],
            "image": pa.array([encode(render(scenes[i], image_size), "png") for i in rows], pa.binary()),
            "width": pa.array([image_size] * len(rows), pa.int32()),
            "height": pa.array([image_size] * len(rows), pa.int32()),
            "clip_score": pa.array([0.3] * len(rows), pa.float32()),
            "n_tokens": n_tokens,
            "text_embedding": column,
        }).replace_schema_metadata({EMBED_DIM_KEY: str(encoder.embed_dim).encode()})
        pq.write_table(table, out / f"{start // 128:05d}.parquet")


def bench_config(data: Path, out: Path, zero: int, steps: int, workers: int, micro: int):
    from imagen_core.recipes import stage_demo_base
    from pipelines.train.config import (
        CheckpointConfig,
        DataConfig,
        OptimConfig,
        ScalingConfig,
        ScheduleConfig,
        TrackingConfig,
        TrainConfig,
    )

    cpus = max(0.5, min(1.0, ((os.cpu_count() or 2) - 1) / workers))
    return TrainConfig(
        stage=stage_demo_base(), output_dir=str(out), run_name=f"bench-zero{zero}", total_steps=steps,
        # As the demo trains: the small training split decoded once into the object store (materialize).
        data=DataConfig(paths=(str(data),), val_fraction=0.05, val_max_samples=16, ledger=True, materialize=True),
        optim=OptimConfig(kind="adamw", lr=5e-4), schedule=ScheduleConfig(warmup_steps=1),
        checkpoint=CheckpointConfig(every_steps=steps, num_to_keep=2),
        tracking=TrackingConfig(log_every=max(1, steps // 3), val_every=steps, sample_every=steps, sample_steps=2,
                                num_samples=2),
        scaling=ScalingConfig(num_workers=workers, cpus_per_worker=cpus, deepspeed_config=f"zero{zero}",
                              micro_batch_size=micro),
    )


def trainer_throughput(out: Path, workers: int, micro: int) -> tuple[float, float]:
    """(images/s, data-wait fraction) after the warm-up steps, from the ledger times and MLflow's windows."""
    from mlflow import MlflowClient

    from pipelines.train.ledger import read_ledger

    ledger = read_ledger(out)
    times = sorted(e["time"] for (rank, _), e in ledger.items() if rank == 0)
    steps = len(times) - WARMUP_STEPS
    images_per_s = steps * micro * workers / (times[-1] - times[WARMUP_STEPS - 1])
    run = json.loads((out / "mlflow_run.json").read_text())
    history = MlflowClient(run["tracking_uri"]).get_metric_history(run["run_id"], "data_wait_fraction")
    later = [m.value for m in history if m.step > WARMUP_STEPS] or [m.value for m in history]
    return images_per_s, float(np.mean(later))


def plain_torch_throughput(config, steps: int, global_batch: int) -> float:
    """The baseline: one process, same model/optimiser/global batch, batches already in memory."""
    from imagen_core.stage import DiffusionStage

    torch.manual_seed(0)
    model = DiffusionStage(config.stage)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    size, dim = config.stage.image_size, config.stage.unet.text_embed_dim
    images = torch.rand(global_batch, 3, size, size) * 2 - 1
    embeds, mask = torch.randn(global_batch, 16, dim), torch.ones(global_batch, 16, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + WARMUP_STEPS):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        loss = model(images, embeds, mask, generator=generator).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return steps * global_batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=16)  # the demo's
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--out", default="/tmp/bench_train")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3],
                        help="ZeRO stages to run (the memory table needs 0)")
    args = parser.parse_args()

    from pipelines.ray_env import RayConfig, init_ray
    from pipelines.train import train_stage

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    write_demo_embeddings(out / "data", args.rows, 48)
    init_ray(RayConfig())
    print(f"machine: {machine()}")

    # 1. throughput per ZeRO stage vs plain torch; each run's memory.json gives part 2.
    rates, memory = {}, {}
    for zero in args.stages:
        run_out = out / f"zero{zero}"
        config = bench_config(out / "data", run_out, zero, args.steps, args.workers, args.micro_batch)
        train_stage(config)
        rates[zero] = trainer_throughput(run_out, args.workers, args.micro_batch)
        memory[zero] = json.loads((run_out / "memory.json").read_text())["per_rank"]
    torch.set_num_threads(args.workers)  # the same CPUs the workers had between them
    baseline = plain_torch_throughput(config, max(10, args.steps // 2), args.micro_batch * args.workers)
    print(f"demo base ({config.stage.image_size}px), global batch {args.micro_batch * args.workers}, "
          f"{args.workers} workers, steps {WARMUP_STEPS + 1}-{args.steps}; goal >= {GOAL_RATIO} x baseline:")
    print(f"  plain torch     {baseline:8.1f} images/s   (baseline: one process, {args.workers} threads, batches in memory)")
    for zero, (images_per_s, data_wait) in rates.items():
        ratio = images_per_s / baseline
        print(f"  ZeRO-{zero}          {images_per_s:8.1f} images/s   data-wait fraction {data_wait:.3f}   "
              f"ratio {ratio:.2f} x baseline ({'met' if ratio >= GOAL_RATIO else 'NOT met'})")

    # 2. per-rank memory per ZeRO stage vs ZeRO-0 (its ratios need a ZeRO-0 run).
    if 0 not in memory:
        return
    from imagen_core.recipes import count_parameters
    from imagen_core.stage import DiffusionStage

    print(f"per-rank memory, {args.workers} workers, demo base ({count_parameters(DiffusionStage(config.stage)):,} "
          "parameters), ratio vs ZeRO-0 (plain data parallel) in brackets:")
    fields = ("optimizer_state_numel", "param_numel", "master_numel", "rss_bytes")
    for zero, ranks in memory.items():
        for rank, stats in enumerate(ranks):
            base = memory[0][rank]
            cells = []
            for name in fields:
                ratio = f"{stats[name] / base[name]:.2f}" if base[name] else "-"
                value = f"{stats[name] / 2**20:,.0f} MiB" if name == "rss_bytes" else f"{stats[name]:,}"
                cells.append(f"{name.replace('_numel', '')} {value} [{ratio}]")
            print(f"  ZeRO-{zero} rank {rank}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
