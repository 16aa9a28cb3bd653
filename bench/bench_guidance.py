"""The demo base stage's task metrics against the classifier-free guidance scale, on a finished demo run.

    .venv/bin/python bench/bench_guidance.py [--run-dir runs/bench-demo] [--scales 1,3,5,7,10] [--prompts 64]

Samples the champion base stage for `--prompts` captions of the demo's grammar that no corpus row has (the
first 16 are the demo's own unseen prompts), once per guidance scale, with the same seed and the stage's
evaluation sampler, and scores them as the demo does (pipelines/demo/colour.py): background right, every named
colour shown, each placed shape in its named 3x3 cell. Baseline: the scale the recipe ships (the stage's
`guidance_scale`), in the same run. Guidance is a sampling-time choice (Ho & Salimans 2022; Imagen Sec 2.3):
the trained weights are the same for every row.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from common import machine  # noqa: E402 - bench/ is on sys.path when a script here runs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    import mlflow
    import torch

    from pipelines.demo.colour import background_accuracy
    from pipelines.demo.run import unseen_prompts
    from pipelines.registry.evaluate import EvalConfig, compute_metrics
    from pipelines.registry.loading import ModelRef, load_registered_stage, stage_model_name

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench-demo"))
    parser.add_argument("--scales", default="1,3,5,7,10")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = pathlib.Path(args.run_dir)
    if not (run / "summary.json").is_file():
        raise SystemExit(f"{run} holds no finished demo (no summary.json): run bench/bench_demo.py first")
    summary = json.loads((run / "summary.json").read_text())
    model_name = summary["model_uri"].split("/")[1].split("@")[0]
    torch.set_num_threads(2)
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow"], registry_uri=summary["mlflow"])
    stage, version = load_registered_stage(ModelRef(stage_model_name(model_name, "base"), alias="champion"),
                                           client=client)
    stage = stage.eval()
    prompts = unseen_prompts(run / "corpus" / "urls.parquet", args.prompts, summary.get("seed", 0))
    assert prompts[: len(summary["prompts"])] == summary["prompts"], "the demo's prompts come first"
    shipped = stage.config.guidance_scale
    scales = sorted({float(s) for s in args.scales.split(",")} | {shipped})
    print(f"machine: {machine()}\ndate: {datetime.date.today()}; run: {run}; base v{version.version}; "
          f"{len(prompts)} unseen prompts, seed {args.seed}; shipped scale {shipped:g}\n")
    print("| guidance | background right | every colour right | shapes in their cell | seconds |\n|---|---|---|---|---|")
    for scale in scales:
        config = EvalConfig(metrics=("colour_accuracy", "position_accuracy"), prompts=tuple(prompts),
                            num_samples=len(prompts), guidance=scale, seed=args.seed, batch_size=len(prompts))
        started = time.perf_counter()
        result = compute_metrics(stage, config)
        seconds = time.perf_counter() - started
        background = background_accuracy(result.samples, prompts)[0]
        mark = " (shipped)" if scale == shipped else ""
        print(f"| {scale:g}{mark} | {background:.2f} | {result.metrics['colour_accuracy']:.2f} | "
              f"{result.metrics['position_accuracy']:.2f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
