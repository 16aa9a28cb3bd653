"""Fast samplers against the ancestral sampler on the demo's champion cascade (issue: 25 steps within tolerance).

For ancestral-250 (the DDPM posterior, Ho et al. 2020), DDIM-50 (Song et al. 2021, eta 0) and DPM-Solver++(2M)-25
(Lu et al. 2022) it samples each registered stage of a finished demo run with the evaluate step's own code
(pipelines.registry.evaluate.compute_metrics): the base stage on the run's unseen prompts, the SR stage on the
held-out images' low-res versions. It counts U-Net calls (a forward hook: classifier-free guidance batches the
conditional and unconditional pass into one call) and wall time, and prints the demo's validation metrics:
background and every named colour right (pipelines/demo/colour.py), CLIP score with the demo's fitted CLIP, and
the SR stage's PSNR against the ground truth (bicubic alongside).

    .venv/bin/python bench/bench_samplers.py [--run-dir runs/bench-demo] [--num-samples 16]

The run directory is what `bench/bench_demo.py` (or `imagen demo --run-dir ...`) leaves: its MLflow database
holds the champion stages, heldout/ the held-out pairs, clip/ the fitted CLIP, summary.json the unseen prompts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

from common import machine  # noqa: E402 - bench/ is on sys.path when a script here runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLERS = (("ancestral", 250, 0), ("ancestral", 250, 1), ("ddim", 50, 0), ("dpmpp_2m", 25, 0))
"""(kind, steps, seed offset): ancestral-250 twice, with another seed, to show how far re-seeding alone moves
each figure."""
TOLERANCE = {"background": 0.125, "colours": 0.125, "clip_score": 2.0, "psnr": 1.0}
"""How far the 25-step sampler may fall below ancestral-250: two prompts of 16 for the accuracies, 2 CLIP score
points, 1 dB."""


def count_calls(module) -> list[int]:
    """A counter of `module`'s forward calls (one element, incremented in place)."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def main() -> None:
    import mlflow
    import torch

    from imagen_core.diffusion.samplers import SamplerConfig
    from pipelines.clip_model import ClipConfig
    from pipelines.demo.colour import background_accuracy
    from pipelines.registry.evaluate import EvalConfig, compute_metrics
    from pipelines.registry.loading import ModelRef, load_registered_stage, stage_model_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench-demo"))
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = pathlib.Path(args.run_dir)
    if not (run / "summary.json").is_file():
        raise SystemExit(f"{run} holds no finished demo (no summary.json): run bench/bench_demo.py first")
    summary = json.loads((run / "summary.json").read_text())
    model_name = summary["model_uri"].split("/")[1].split("@")[0]
    torch.set_num_threads(2)
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow"], registry_uri=summary["mlflow"])
    clip = ClipConfig.tiny(run / "clip")
    stages = {}
    for name in ("base", "sr1"):
        stage, version = load_registered_stage(ModelRef(stage_model_name(model_name, name), alias="champion"),
                                               client=client)
        stages[name] = (stage.eval(), version.version, count_calls(stage.unet))
    print(f"machine: {machine()}\ndate: {datetime.date.today()}; run: {run}; {args.num_samples} samples per stage, "
          f"seed {args.seed}; torch threads 2\n")
    rows = []
    for kind, steps, offset in SAMPLERS:
        row = {"sampler": f"{kind}-{steps}" + (f" (seed +{offset})" if offset else "")}
        for name, (stage, _, calls) in stages.items():
            config = EvalConfig(metrics=("clip_score", "psnr", "colour_accuracy"), clip=clip,
                                heldout_dir=str(run / "heldout"), prompts=tuple(summary["prompts"]),
                                num_samples=args.num_samples, sampler=SamplerConfig(kind=kind, steps=steps),
                                seed=args.seed + offset, batch_size=args.num_samples)
            calls[0] = 0
            started = time.perf_counter()
            result = compute_metrics(stage, config)
            row[f"{name}_seconds"] = time.perf_counter() - started
            row[f"{name}_calls"] = calls[0]
            row[f"{name}_clip_score"] = result.metrics.get("clip_score")
            if name == "base":
                prompts = [summary["prompts"][i % len(summary["prompts"])] for i in range(args.num_samples)]
                row["background"] = background_accuracy(result.samples, prompts)[0]
                row["colours"] = result.metrics.get("colour_accuracy")
            else:
                row["psnr"], row["psnr_bicubic"] = result.metrics["psnr"], result.metrics["psnr_bicubic"]
        rows.append(row)
        print(f"  {row['sampler']}: {row['base_seconds'] + row['sr1_seconds']:.1f}s", file=sys.stderr, flush=True)

    print("| sampler | U-Net calls (base / SR) | seconds (base / SR) | background right | every colour right "
          "| CLIP score (base / SR) | SR PSNR dB (bicubic) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['base_calls']} / {r['sr1_calls']} | {r['base_seconds']:.1f} / "
              f"{r['sr1_seconds']:.1f} | {r['background']:.2f} | {r['colours']:.2f} | {r['base_clip_score']:.1f} / "
              f"{r['sr1_clip_score']:.1f} | {r['psnr']:.2f} ({r['psnr_bicubic']:.2f}) |")
    reference, fast = rows[0], rows[-1]
    speedup = (reference["base_seconds"] + reference["sr1_seconds"]) / (fast["base_seconds"] + fast["sr1_seconds"])
    gaps = {"background": reference["background"] - fast["background"],
            "colours": reference["colours"] - fast["colours"],
            "clip_score": reference["base_clip_score"] - fast["base_clip_score"],
            "psnr": reference["psnr"] - fast["psnr"]}
    verdict = all(gaps[k] <= TOLERANCE[k] for k in TOLERANCE)
    print(f"\n{fast['sampler']} vs {reference['sampler']}: {speedup:.1f}x faster; {reference['sampler']} minus "
          f"{fast['sampler']} (positive: the fast sampler is worse) "
          + ", ".join(f"{k} {v:+.3f} (tolerance {TOLERANCE[k]})" for k, v in gaps.items())
          + f": {'within tolerance' if verdict else 'NOT within tolerance'}")
    print(json.dumps({"rows": rows, "gaps": gaps, "within_tolerance": verdict,
                      "versions": {n: v for n, (_, v, _) in stages.items()}}, default=float))


if __name__ == "__main__":
    main()
