"""How fast the demo's base stage learns its task, in one process, without the pipeline around it.

    .venv/bin/python bench/bench_base_learning.py [--steps 600] [--eval-every 0] [--set unet.field=value ...]
                                                  [--set-stage field=value ...] [--threads 2]

A recipe change to the demo base (widths, attention, text conditioning, learning rate, steps) costs a 15-minute
demo run to judge; this trains the same `DiffusionStage` on the same kind of data in a few minutes, so such
changes can be compared. Data: `--rows` scenes of the demo corpus's grammar (pipelines/demo/corpus.py, seed 0),
rendered at 64 px and resized to 32 as the training pipeline does, captions embedded once by the demo's frozen
text encoder (the fitted tiny CLIP's text tower, fitted as `imagen demo` fits it). Training: Adam at `--lr`
with a linear warm-up, global-norm clipping at 1, batch `--batch`, an EMA of the weights. Evaluation: the EMA
weights sample `--prompts` captions no training row has, with DDIM-25 at the recipe's guidance, scored as the
demo scores its cascade (pipelines/demo/colour.py: background right, every named colour shown, each placed
shape in its named 3x3 cell). Baseline: the shipped `demo_base` recipe (no `--set`), same data, seed and steps.

Each run appends one JSON line to `--results` (default runs/bench-base-learning/results.jsonl).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import pathlib
import random
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from common import machine  # noqa: E402 - bench/ is on sys.path when a script here runs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def scenes_tensor(rows: int, encoder, size: int = 32):
    """(images in [-1, 1], text embeddings, masks, captions) of `rows` generated scenes."""
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.demo.corpus import random_scene, render

    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(rows)]
    pixels = [np.asarray(render(s, 64).resize((size, size), Image.Resampling.BICUBIC)) for s in scenes]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    captions = [s.caption() for s in scenes]
    embeds, mask = encoder.encode(captions)
    return images, embeds.float(), mask, captions


def unseen(captions: list[str], count: int) -> list[str]:
    from pipelines.demo.corpus import random_scene

    seen, rng, prompts = set(captions), random.Random(20_000), []
    while len(prompts) < count:
        caption = random_scene(rng).caption()
        if caption not in seen and caption not in prompts:
            prompts.append(caption)
    return prompts


def overrides(pairs: list[str]) -> dict:
    """"field=value" (a Python literal) -> {field: value}."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = ast.literal_eval(value)
    return out


def evaluate(ema, encoder, prompts: list[str], guidance: float) -> dict[str, float]:
    import torch

    from imagen_core.diffusion.samplers import SamplerConfig
    from pipelines.demo.colour import background_accuracy, colour_accuracy, position_accuracy

    embeds, mask = encoder.encode(prompts)
    with torch.no_grad():
        images = ema.sample(embeds.float(), mask, guidance_scale=guidance, sampler=SamplerConfig(kind="ddim", steps=25),
                            generator=torch.Generator().manual_seed(0))
    return {"background": background_accuracy(images, prompts)[0], "colours": colour_accuracy(images, prompts)[0],
            "positions": position_accuracy(images, prompts)[0]}


def main() -> None:
    import torch

    from imagen_core.recipes import stage_demo_base
    from imagen_core.stage import DiffusionStage
    from imagen_core.text_encoder import TextEncoderConfig, build_text_encoder
    from pipelines.demo.run import demo_text_encoder, fit_demo_clip

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2400, help="generated training scenes (the demo keeps ~2,400)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--ema", type=float, default=0.99, help="EMA decay per step")
    parser.add_argument("--set", action="append", default=[], help="UNetConfig field=value (Python literal)")
    parser.add_argument("--set-stage", action="append", default=[], help="StageConfig field=value")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: at the end)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-base-learning"), help="fitted CLIP, data cache")
    parser.add_argument("--results", default=str(ROOT / "runs" / "bench-base-learning" / "results.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clip = fit_demo_clip(work, 0)
    text = TextEncoderConfig(**demo_text_encoder(clip))
    encoder = build_text_encoder(text)
    images, embeds, mask, captions = scenes_tensor(args.rows, encoder)
    prompts = unseen(captions, args.prompts)

    recipe = stage_demo_base()
    config = dataclasses.replace(recipe, unet=dataclasses.replace(recipe.unet, **overrides(args.set)),
                                 text_encoder=text, **overrides(args.set_stage))
    torch.manual_seed(0)
    model = DiffusionStage(config)
    ema = DiffusionStage(config).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / args.warmup))
    generator = torch.Generator().manual_seed(0)
    print(f"machine: {machine()}\n{sum(p.numel() for p in model.parameters()):,} parameters; "
          f"--set {args.set} --set-stage {args.set_stage}", flush=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "argv": sys.argv[1:], "evals": []}
    started, train_s, losses = time.perf_counter(), 0.0, []
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(images), (args.batch,), generator=generator)
        loss = model(images[index], embeds[index], mask[index]).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            for averaged, live in zip(ema.parameters(), model.parameters()):
                averaged.lerp_(live, 1.0 - args.ema)
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step} loss {sum(losses[-100:]) / 100:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
        if step == args.steps or (args.eval_every and step % args.eval_every == 0):
            train_s += time.perf_counter() - started
            scores = {"step": step, **evaluate(ema.eval(), encoder, prompts, config.guidance_scale)}
            record["evals"].append(scores)
            print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()), flush=True)
            started = time.perf_counter()
    record.update(s_per_step=round(train_s / args.steps, 3), final_loss=round(sum(losses[-100:]) / 100, 4))
    print(f"{record['s_per_step']} s per step of {args.batch}")
    results = pathlib.Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
