"""GPU smoke test of the real training path: one node, all its GPUs, NCCL, bf16, SDPA; base and SR stages.

    python bench/gpu_smoke.py                      # demo-size stages, 300 base + 200 SR steps
    python bench/gpu_smoke.py --size m100           # the ~100M stages of bench/bench_gpu.py (base 64, SR 64->256)

What it runs, all through the project's own code:
1. the environment: CUDA devices, bf16 support, NCCL, and which fused SDPA kernels take the U-Net's masked bf16
   attention (F.scaled_dot_product_attention with a boolean key mask, as imagen_core/unet.py calls it);
2. its own training data: demo-corpus scenes with tiny-T5 caption embeddings written as the embed step's
   Parquet (bench/bench_train.py::write_demo_embeddings: key, caption, image, n_tokens, flat fp16 embeddings,
   D in the schema metadata);
3. per stage, `pipelines.train.trainer.train_stage` (Ray Train TorchTrainer, one worker per GPU, NCCL, DeepSpeed
   ZeRO-2 in bf16, Ray Data decoding): a fit stopped and checkpointed at half the steps, then a fit resumed from
   that checkpoint to the end;
4. the exports sampled back on GPU in bf16 (base, then SR on the base's samples).

It prints a table of every check (PASS/FAIL with its figures) and exits 1 if any failed. Needs a CUDA machine
with this package installed; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

os.environ["DS_ACCELERATOR"] = "cuda"  # forwarded to the Ray workers (pipelines.ray_env): never the CPU one here
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CHECKS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, figures: str = "") -> bool:
    CHECKS.append((name, bool(ok), figures))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {figures}", flush=True)
    return bool(ok)


def attempt(name: str, fn, *args, **kwargs):
    """Run one part; a crash is a failed check (with its error), not the end of the smoke test."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - reported in the table
        traceback.print_exc()
        check(name, False, f"{type(error).__name__}: {str(error)[:300]}")
        return None


# -- 1. environment ----------------------------------------------------------------------------------------

def environment() -> int:
    count = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    check("CUDA devices", count >= 1, f"{count} x {', '.join(names) or 'none'}; torch {torch.__version__}, CUDA "
                                      f"{torch.version.cuda}")
    if count == 0:
        return 0
    check("bf16 supported", torch.cuda.is_bf16_supported(), f"compute capability {torch.cuda.get_device_capability(0)}")
    nccl = torch.distributed.is_nccl_available()
    version = ".".join(map(str, torch.cuda.nccl.version())) if nccl else "-"
    check("NCCL available", nccl, f"NCCL {version}; Ray Train TorchConfig(backend='nccl') with use_gpu=True")
    return count


def sdpa_kernels(stages) -> None:
    """Which fused SDPA backends run the U-Net's attention: bf16, head dim 64 (or the stage's), boolean key mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    for stage in stages:
        cfg = stage.unet
        head = cfg.attention_head_dim
        heads = max(1, cfg.base_channels * cfg.channel_mults[-1] // head)
        side = cfg.image_size // 2 ** cfg.num_downsamples
        pixels, tokens = side * side, 16
        q = torch.randn(8, heads, pixels, head, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(8, heads, pixels + tokens, head, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(8, 1, 1, pixels + tokens, device="cuda", dtype=torch.bool)
        mask[:, ..., -tokens // 2:] = False  # padded text tokens, as a short caption has
        reference = scaled_dot_product_attention(q.float(), kv.float(), kv.float(), attn_mask=mask)
        works = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    out = scaled_dot_product_attention(q, kv, kv, attn_mask=mask)
                if (out.float() - reference).abs().max().item() < 0.05:
                    works.append(backend.name)
            except RuntimeError:
                pass
        check(f"SDPA fused kernel ({stage.name})", bool(works),
              f"{', '.join(works) or 'none (math fallback)'} for bf16 q {tuple(q.shape)}, boolean key mask "
              "(flash attention takes no mask: expected absent)")


# -- 3. training -------------------------------------------------------------------------------------------

def train_config(stage, data: Path, out: Path, steps: int, gpus: int, args):
    from pipelines.train.config import (
        CheckpointConfig,
        DataConfig,
        OptimConfig,
        ScalingConfig,
        ScheduleConfig,
        TrackingConfig,
        TrainConfig,
    )

    half = steps // 2
    cpus = max(1, min(4, ((os.cpu_count() or 4) - 2) // gpus))
    return TrainConfig(
        stage=stage, output_dir=str(out), run_name=f"smoke-{stage.name}", total_steps=steps, stop_at_step=half,
        data=DataConfig(paths=(str(data),), val_fraction=0.05, val_max_samples=64, materialize=True,
                        cpus_per_task=0.5),
        optim=OptimConfig(kind="adamw", lr=args.lr, ema_decay=0.995, ema_every=10),
        schedule=ScheduleConfig(warmup_steps=min(50, half)),
        checkpoint=CheckpointConfig(every_steps=half, num_to_keep=2, max_failures=0),
        tracking=TrackingConfig(log_every=10, val_every=half, sample_every=steps, sample_steps=10, num_samples=4),
        scaling=ScalingConfig(num_workers=gpus, use_gpu=True, cpus_per_worker=cpus, deepspeed_config=f"zero{args.zero}",
                              micro_batch_size=args.micro_batch, precision="bf16"),
    )


def metric_history(config, run_id: str, name: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=config.tracking_uri).get_metric_history(run_id, name)
    return sorted((m.step, m.value) for m in history)


def train_and_resume(stage, data: Path, out: Path, steps: int, gpus: int, args) -> Path | None:
    from pipelines.train import train_stage
    from pipelines.train.ledger import read_ledger, status_path

    name = stage.name
    config = train_config(stage, data, out, steps, gpus, args)
    half = config.stop_at_step
    start = time.monotonic()
    stopped = train_stage(config)
    first_s = time.monotonic() - start
    check(f"{name}: fit to step {half} (stop, checkpoint)", stopped.metrics.get("step") == half,
          f"{first_s:.0f} s, checkpoint {Path(stopped.checkpoint_dir).name if stopped.checkpoint_dir else None}")
    start = time.monotonic()
    resumed = train_stage(dataclasses.replace(config, stop_at_step=None, resume=True))
    second_s = time.monotonic() - start
    restored = json.loads(status_path(out, 0).read_text()).get("restored_step")
    check(f"{name}: resume from the checkpoint to step {steps}",
          restored == half and resumed.metrics.get("step") == steps and resumed.mlflow_run_id == stopped.mlflow_run_id,
          f"restored step {restored}, ended at {resumed.metrics.get('step')}, {second_s:.0f} s, one MLflow run")

    ds = json.loads((out / "deepspeed.json").read_text())
    shards = sorted(p.name for p in Path(resumed.checkpoint_dir).rglob("*optim_states.pt"))
    bf16_shards = [s for s in shards if s.startswith("bf16_")]
    check(f"{name}: DeepSpeed bf16, ZeRO-{ds['zero_optimization']['stage']}, {gpus} ranks",
          ds["bf16"]["enabled"] is True and len(bf16_shards) == gpus,
          f"{len(bf16_shards)}/{len(shards)} optimiser shards bf16_*; world size {gpus}")

    ledger = read_ledger(out)
    per_step = [float(np.mean([np.mean(ledger[(r, s)]["loss"]) for r in range(gpus)])) for s in range(1, steps + 1)]
    tenth = max(5, steps // 10)
    first, last = float(np.mean(per_step[:tenth])), float(np.mean(per_step[-tenth:]))
    check(f"{name}: training loss finite and falling", bool(np.isfinite(per_step).all()) and last < 0.8 * first,
          f"mean of first {tenth} steps {first:.4f} -> last {tenth} {last:.4f}")
    around = float(np.mean(per_step[half - tenth:half])), float(np.mean(per_step[half:half + tenth]))
    check(f"{name}: no jump at the resume", around[1] < 1.5 * around[0],
          f"{tenth} steps before the stop {around[0]:.4f}, after the resume {around[1]:.4f}")
    val = stopped.metrics.get("val_loss_train_weights"), resumed.metrics.get("val_loss_train_weights")
    check(f"{name}: validation loss falls across the resume", None not in val and val[1] < val[0],
          f"step {half} {val[0]:.4f} -> step {steps} {val[1]:.4f} (fixed t and noise; EMA: "
          f"{resumed.metrics.get('val_loss', float('nan')):.4f})")

    images = [v for s, v in metric_history(config, resumed.mlflow_run_id, "images_per_s") if s > 20]
    wait = [v for s, v in metric_history(config, resumed.mlflow_run_id, "data_wait_fraction") if s > 20]
    memory = json.loads((out / "memory.json").read_text())["per_rank"]
    cuda_gib = [r.get("cuda_max_allocated_bytes", 0) / 2**30 for r in memory]
    check(f"{name}: throughput and memory", bool(images) and all(g > 0 for g in cuda_gib),
          f"{np.median(images) if images else float('nan'):.0f} images/s (global batch "
          f"{args.micro_batch * gpus}), data wait {np.median(wait) if wait else float('nan'):.1%}, peak CUDA memory "
          f"per rank {', '.join(f'{g:.2f}' for g in cuda_gib)} GiB")
    return Path(resumed.export_dir)


# -- 4. sampling -------------------------------------------------------------------------------------------

def sample_exports(base_dir: Path, sr_dir: Path | None, device: str = "cuda") -> None:
    from imagen_core.diffusion import SamplerConfig
    from imagen_core.text_encoder import build_text_encoder
    from pipelines.registry.checkpoints import load_stage

    prompts = ["a red circle on a blue background", "a yellow square on a green background"]
    base = load_stage(base_dir, device=device).to(torch.bfloat16)
    encoder = build_text_encoder(base.config.text_encoder, device)
    embeds, mask = (t.to(device) for t in encoder.encode(prompts))
    generator = torch.Generator(device=device).manual_seed(0)
    sampler = SamplerConfig(kind="dpmpp_2m", steps=20)
    start = time.monotonic()
    low = base.sample(embeds, mask, sampler=sampler, generator=generator)
    check("base export samples in bf16", low.dtype == torch.float32 and bool(torch.isfinite(low).all())
          and low.abs().max() <= 1.0 + 1e-5,
          f"{tuple(low.shape)} {low.dtype} (bf16 weights, fp32 sampler), {time.monotonic() - start:.1f} s")
    if sr_dir is None:
        return
    sr = load_stage(sr_dir, device=device).to(torch.bfloat16)
    start = time.monotonic()
    high = sr.sample(embeds, mask, lowres=low, sampler=sampler, generator=generator)
    check("SR export upsamples the base samples in bf16", high.dtype == torch.float32
          and bool(torch.isfinite(high).all()) and high.shape[-1] == sr.config.image_size,
          f"{tuple(low.shape)} -> {tuple(high.shape)}, {time.monotonic() - start:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["demo", "m100"], default="demo")
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--sr-steps", type=int, default=200)
    parser.add_argument("--micro-batch", type=int, default=32, help="per GPU")
    parser.add_argument("--zero", type=int, choices=[1, 2, 3], default=2)
    parser.add_argument("--lr", type=float, default=None, help="peak lr (default 5e-4 demo, 2e-4 m100)")
    parser.add_argument("--rows", type=int, default=2048, help="generated training rows")
    parser.add_argument("--out", default="/tmp/gpu_smoke")
    args = parser.parse_args()
    if args.lr is None:
        args.lr = 5e-4 if args.size == "demo" else 2e-4

    start = time.monotonic()
    gpus = environment()
    if gpus == 0:
        return report(start)
    from bench_gpu import stages_for
    from bench_train import write_demo_embeddings

    base, sr = stages_for(args.size, 64)  # 64: the tiny T5's width, the embeddings written below
    attempt("SDPA probe", sdpa_kernels, (base, sr))

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    write_demo_embeddings(out / "data", args.rows, sr.image_size)
    check("training data in the embed step's format", any((out / "data").glob("*.parquet")),
          f"{args.rows} rows at {sr.image_size} px, tiny-T5 embeddings, {time.monotonic() - t0:.0f} s")

    from pipelines.ray_env import RayConfig, init_ray

    init_ray(RayConfig())
    import ray

    check("Ray sees the GPUs", ray.cluster_resources().get("GPU", 0) >= gpus,
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs, {ray.cluster_resources().get('CPU', 0):g} CPUs")
    base_export = attempt("base training", train_and_resume, base, out / "data", out / "base", args.base_steps, gpus,
                          args)
    sr_export = attempt("SR training", train_and_resume, sr, out / "data", out / "sr", args.sr_steps, gpus, args)
    if base_export is not None:
        attempt("sampling", sample_exports, base_export, sr_export)
    return report(start)


def report(start: float) -> int:
    width = max(len(name) for name, _, _ in CHECKS) if CHECKS else 10
    print(f"\nGPU smoke test, {time.monotonic() - start:.0f} s")
    print(f"{'check':<{width}}  result  figures")
    for name, ok, figures in CHECKS:
        print(f"{name:<{width}}  {'PASS' if ok else 'FAIL':<6}  {figures}")
    failed = sum(not ok for _, ok, _ in CHECKS)
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    return 1 if failed or not CHECKS else 0


if __name__ == "__main__":
    sys.exit(main())
