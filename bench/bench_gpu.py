"""Training-step benchmark of the base and SR stages: bf16, SDPA, channels_last, torch.compile; MFU and data wait.

    python bench/bench_gpu.py                                   # CUDA, bf16, the ~100M stages ("m100")
    python bench/bench_gpu.py --device cpu --size tiny --steps 5  # CPU (fp32 unless --dtype bf16), says so

For each stage (base 64 px and SR 64 -> 256 at "m100"; the demo or tiny recipes with --size) it times the
training step the trainer runs under DeepSpeed bf16, in one process without DeepSpeed:
- the weights in --dtype (bf16: as DeepSpeed's bf16 engine holds them) and fp32 master weights stepped by
  AdamW (what DeepSpeed's bf16 optimiser does: bf16 grads -> fp32 masters -> AdamW -> copy back to bf16); with
  --dtype fp32 the weights are the masters;
- `DiffusionStage.forward` (the project's loss: fp32 diffusion maths, the U-Net cast to its weights' dtype,
  attention through F.scaled_dot_product_attention), channels_last weights, the U-Net compiled with
  torch.compile (--no-compile to leave it eager);
- input batches decoded from PNG bytes and collated by the trainer's own code (pipelines.train.data.DecodeImages
  and Collate) in a background thread, two batches ahead, pinned, then copied to the device: the data-wait share
  is the time the step waited for that thread (plus the host-to-device copy) over the step time.

MFU = the U-Net's FLOPs per training step (forward + backward, counted once by torch.utils.flop_counter.
FlopCounterMode on the eager model: matmuls, convolutions, SDPA) x steps/s, over the device's peak measured
here with a loop of large matmuls in --dtype (not the datasheet's number). Prints the machine, the peak, and a
row per stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import queue
import random
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import UNIT_COSTS, cpu_model  # noqa: E402 - bench/ is on sys.path when a script here runs

import numpy as np  # noqa: E402
import torch  # noqa: E402

from imagen_core.stage import DiffusionStage, StageConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# -- stages ------------------------------------------------------------------------------------------------

def m100_stages(text_embed_dim: int = 64) -> tuple[StageConfig, StageConfig]:
    """~100M-parameter base (64 px) and SR (64 -> 256) stages: the paper's shapes scaled down (base 78M, SR 89M
    with 64-dim text, 126M and 108M with T5-XXL's 4096). Shared with bench/gpu_smoke.py."""
    from imagen_core.recipes import tiny_text_encoder
    from imagen_core.unet import UNetConfig

    base = UNetConfig(image_size=64, base_channels=128, channel_mults=(1, 2, 3, 4), num_res_blocks=(2, 2, 2, 2),
                      self_attention=(False, True, True, True), cross_attention=(False, True, True, True),
                      attention_head_dim=64, text_embed_dim=text_embed_dim, cond_dim=512, norm_groups=32)
    sr = UNetConfig(image_size=256, base_channels=64, channel_mults=(1, 2, 4, 8), num_res_blocks=(2, 2, 4, 4),
                    self_attention=(False, False, False, True), cross_attention=(False, False, False, True),
                    attention_every_block=False, attention_head_dim=64, text_embed_dim=text_embed_dim, cond_dim=512,
                    norm_groups=16, lowres_cond=True, memory_efficient=True, scale_skip=True)
    encoder = tiny_text_encoder()
    return (StageConfig(name="base", unet=base, text_encoder=encoder),
            StageConfig(name="sr1", unet=sr, text_encoder=encoder, lowres_size=64))


def stages_for(size: str, text_embed_dim: int) -> tuple[StageConfig, StageConfig]:
    from imagen_core.recipes import stage_demo_base, stage_demo_sr, stage_tiny_base, stage_tiny_sr

    if size == "m100":
        return m100_stages(text_embed_dim)
    if size == "demo":
        return stage_demo_base(), stage_demo_sr()
    return stage_tiny_base(), stage_tiny_sr()


# -- peak ----------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """FLOP/s of a loop of n x n matmuls in `dtype` (2 n^3 each), after a warm-up: the achievable peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        for _ in range(10):
            torch.matmul(a, b, out=out)
        iters += 10
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * iters / elapsed


# -- data ----------------------------------------------------------------------------------------------------

def encoded_rows(stage: StageConfig, rows: int, text_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Embed-step-shaped rows: PNG bytes of demo-corpus scenes at the stage's size, 8-32 fp16 tokens of text
    (random values: the step's cost does not depend on them)."""
    from pipelines.demo.corpus import encode, random_scene, render

    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    images, n_tokens, flat = [], [], []
    for _ in range(rows):
        images.append(encode(render(random_scene(rng), stage.image_size), "png"))
        n = int(gen.integers(8, min(32, stage.text_encoder.max_length) + 1))
        n_tokens.append(n)
        flat.append(gen.standard_normal(n * text_dim).astype(np.float16))
    return {"key": np.array([f"{i:08d}" for i in range(rows)]), "caption": np.array(["a scene"] * rows),
            "image": np.array(images, dtype=object), "n_tokens": np.array(n_tokens, np.int32),
            "text_embedding": np.array(flat, dtype=object)}


class Loader:
    """Batches decoded and collated by the trainer's code in a background thread, `ahead` batches ahead, pinned."""

    def __init__(self, stage: StageConfig, rows: dict[str, np.ndarray], batch: int, pin: bool, ahead: int = 2):
        from pipelines.train.data import Collate, DecodeImages

        self.decode = DecodeImages(stage.image_size, stage.lowres_size)
        self.collate = Collate(stage.unet.text_embed_dim, stage.text_encoder.max_length)
        self.rows, self.batch, self.pin = rows, batch, pin
        self.max_tokens = stage.text_encoder.max_length
        self.queue: queue.Queue = queue.Queue(maxsize=ahead)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        total, start = len(self.rows["key"]), 0
        while not self.stop.is_set():
            index = [(start + i) % total for i in range(self.batch)]
            start = (start + self.batch) % total
            batch = self.collate(self.decode({k: v[index] for k, v in self.rows.items()}))
            # Text padded to the encoder's max_length, not to the batch's longest caption as the trainer does:
            # one static shape, so torch.compile does not recompile (or go dynamic) for every new length.
            pad = self.max_tokens - batch.text_embeds.shape[1]
            batch = dataclasses.replace(
                batch, text_embeds=torch.nn.functional.pad(batch.text_embeds, (0, 0, 0, pad)),
                text_mask=torch.nn.functional.pad(batch.text_mask, (0, pad)))
            if self.pin:
                batch = dataclasses.replace(
                    batch, images=batch.images.pin_memory(), text_embeds=batch.text_embeds.pin_memory(),
                    text_mask=batch.text_mask.pin_memory(),
                    lowres=batch.lowres.pin_memory() if batch.lowres is not None else None)
            while not self.stop.is_set():
                try:
                    self.queue.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next(self, device: torch.device):
        return self.queue.get().to(device, torch.float32)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


# -- the step ------------------------------------------------------------------------------------------------

class MixedPrecisionStep:
    """One training step as DeepSpeed's bf16 optimiser runs it: bf16 weights, fp32 masters, AdamW on the masters."""

    def __init__(self, stage: DiffusionStage, dtype: torch.dtype, device: torch.device, lr: float = 1e-4) -> None:
        self.stage, self.dtype = stage, dtype
        self.params = [p for p in stage.parameters() if p.requires_grad]
        fused = device.type == "cuda"
        if dtype == torch.float32:
            self.masters = self.params
        else:
            self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=0.0, fused=fused)

    def __call__(self, batch, generator: torch.Generator) -> torch.Tensor:
        loss = self.stage(batch.images, batch.text_embeds, batch.text_mask, batch.lowres, generator=generator).mean()
        loss.backward()
        if self.masters is not self.params:
            for master, param in zip(self.masters, self.params):
                master.grad = param.grad.float()
                param.grad = None
        torch.nn.utils.clip_grad_norm_(self.masters, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        return loss.detach()


def counted_flops(stage: DiffusionStage, batch, generator: torch.Generator) -> int:
    """FLOPs of one forward + backward of the stage (the U-Net's matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = stage(batch.images, batch.text_embeds, batch.text_mask, batch.lowres, generator=generator).mean()
        loss.backward()
    stage.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


@dataclasses.dataclass
class Result:
    name: str
    params_m: float
    batch: int
    step_ms: float
    images_per_s: float
    gflop_per_step: float
    achieved_tflops: float
    mfu: float
    data_wait: float
    compile_s: float
    memory_gib: float
    loss_first: float
    loss_last: float


def bench_stage(config: StageConfig, args, device: torch.device, dtype: torch.dtype, peak: float) -> Result:
    from imagen_core.recipes import count_parameters

    torch.manual_seed(0)
    stage = DiffusionStage(config).to(device=device, dtype=dtype)
    if args.channels_last:
        stage = stage.to(memory_format=torch.channels_last)
    params = count_parameters(stage)
    rows = encoded_rows(config, max(args.rows, 2 * args.batch), config.unet.text_embed_dim)
    loader = Loader(config, rows, args.batch, pin=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    try:
        flops = counted_flops(stage, loader.next(device), generator)  # eager: FlopCounterMode sees every op
        step = MixedPrecisionStep(stage, dtype, device)
        compile_s = 0.0
        if args.compile:
            stage.unet.compile(mode=args.compile_mode)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        losses = [float(step(loader.next(device), generator)) for _ in range(args.warmup)]  # compiles here
        sync(device)
        if args.compile:
            compile_s = time.perf_counter() - start
        wait = 0.0
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            before = time.perf_counter()
            batch = loader.next(device)
            wait += time.perf_counter() - before
            losses.append(step(batch, generator))
        sync(device)
        elapsed = time.perf_counter() - start
    finally:
        loader.close()
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    losses = [float(x) for x in losses]
    achieved = flops * args.steps / elapsed
    return Result(name=f"{config.name} {config.image_size}px" + (f" (from {config.lowres_size})"
                                                                 if config.lowres_size else ""),
                  params_m=params / 1e6, batch=args.batch, step_ms=1e3 * elapsed / args.steps,
                  images_per_s=args.batch * args.steps / elapsed, gflop_per_step=flops / 1e9,
                  achieved_tflops=achieved / 1e12, mfu=achieved / peak, data_wait=wait / elapsed,
                  compile_s=compile_s, memory_gib=memory, loss_first=losses[0], loss_last=losses[-1])


def machine(device: torch.device) -> str:
    cpu = cpu_model()
    accel = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU only"
    return (f"{accel}; {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; load average "
            f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights' dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--size", choices=["m100", "demo", "tiny"], default="m100")
    parser.add_argument("--text-dim", type=int, default=4096, help="text width of the m100 stages (T5-XXL: 4096)")
    parser.add_argument("--stages", default="base,sr", help="comma-separated: base, sr")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (torch.compile compiles here)")
    parser.add_argument("--rows", type=int, default=256, help="encoded rows the loader cycles through")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (default: max-autotune-no-cudagraphs on CUDA, where CUDA graphs stay "
                             "off because the step draws noise from a generator; default on CPU)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--peak-size", type=int, default=None, help="matmul side for the peak (8192 CUDA, 1024 CPU)")
    parser.add_argument("--peak-seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch intra-op threads")
    parser.add_argument("--record", action="store_true",
                        help="CUDA bf16: write the measured peak and the lowest stage MFU into "
                             "pipelines/configs/unit_costs.json, the unit costs `imagen plan` reads")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu")
    if args.compile_mode is None:
        args.compile_mode = "max-autotune-no-cudagraphs" if device.type == "cuda" else "default"
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[name]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32, as a cluster run would
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(f"machine: {machine(device)}")
    if device.type == "cpu":
        print(f"CPU run ({name}): figures are this CPU's, MFU against its own measured {name} matmul peak; "
              f"torch.compile {'on (inductor C++ backend)' if args.compile else 'off'}")
    peak_n = args.peak_size or (8192 if device.type == "cuda" else 1024)
    peak = measured_matmul_peak(device, dtype, peak_n, args.peak_seconds)
    print(f"measured {name} matmul peak: {peak / 1e12:.3f} TFLOP/s ({peak_n} x {peak_n}, {args.peak_seconds:.0f} s)")
    print(f"step: weights {name}{' + fp32 masters' if dtype != torch.float32 else ''}, AdamW, fp32 loss, SDPA, "
          f"channels_last {'on' if args.channels_last else 'off'}, torch.compile "
          f"{args.compile_mode if args.compile else 'off'}; batch {args.batch}, {args.warmup} warm-up + "
          f"{args.steps} timed steps")

    base, sr = stages_for(args.size, args.text_dim)
    chosen = {"base": base, "sr": sr}
    results = [bench_stage(chosen[s.strip()], args, device, dtype, peak) for s in args.stages.split(",")]
    header = (f"{'stage':<22}{'params':>9}{'batch':>7}{'step ms':>10}{'img/s':>10}{'GFLOP/step':>12}"
              f"{'TFLOP/s':>10}{'MFU':>8}{'data wait':>11}{'compile s':>11}{'mem GiB':>9}{'loss':>16}")
    print(header)
    for r in results:
        print(f"{r.name:<22}{r.params_m:>8.1f}M{r.batch:>7}{r.step_ms:>10.1f}{r.images_per_s:>10.1f}"
              f"{r.gflop_per_step:>12.1f}{r.achieved_tflops:>10.3f}{r.mfu:>8.1%}{r.data_wait:>11.1%}"
              f"{r.compile_s:>11.1f}{r.memory_gib:>9.2f}{r.loss_first:>8.3f}>{r.loss_last:.3f}")
    if args.record:
        if device.type != "cuda" or dtype != torch.bfloat16:
            parser.error("--record takes a CUDA bf16 run: the planner's unit costs are a GPU's")
        record_unit_costs(peak, min(r.mfu for r in results), f"bench/bench_gpu.py --size {args.size}, {machine(device)}")


def record_unit_costs(peak: float, mfu: float, source: str, path: Path = UNIT_COSTS) -> None:
    """The measured peak and MFU replace the stated ones in the file `imagen plan` reads."""
    import datetime
    import json

    costs = json.loads(path.read_text())
    measured = f"measured: {source}, {datetime.date.today().isoformat()}"
    costs["gpu_bf16_peak_tflops"] = {"value": round(peak / 1e12, 1), "source": measured}
    costs["train_mfu"] = {"value": round(mfu, 3), "source": measured}
    path.write_text(json.dumps(costs, indent=2) + "\n")
    print(f"recorded peak {peak / 1e12:.1f} TFLOP/s and MFU {mfu:.1%} in {path}")


if __name__ == "__main__":
    main()
