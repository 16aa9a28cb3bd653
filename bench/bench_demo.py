"""The default-size demo end to end, as a user runs it (`imagen demo`), with the figures the README quotes.

Prints the wall time of every step (from the run's pipeline_state.json), the learning figures of the champion
cascade on prompts unseen in training (background colour, every named colour), the SR stage's PSNR against
bicubic upsampling, and what the terminal showed (line count, the most repeated line and its count).

    .venv/bin/python bench/bench_demo.py [--run-dir runs/bench-demo] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from common import machine  # noqa: E402 - bench/ is on sys.path when a script here runs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench-demo"))
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    run_dir = pathlib.Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = [sys.executable, "-m", "jobs.cli", "demo", "--run-dir", str(run_dir), *(a for s in args.set for a in ("--set", s))]
    print(f"machine: {machine()}\n$ imagen demo --run-dir {run_dir} {' '.join('--set ' + s for s in args.set)}")
    started = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    terminal = (done.stdout + done.stderr).splitlines()
    if done.returncode != 0:
        print("\n".join(terminal[-40:]))
        raise SystemExit(f"imagen demo failed with exit code {done.returncode}")
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    samples = json.loads((run_dir / "samples.json").read_text())
    evaluate = json.loads((run_dir / "registry" / "evaluate" / "manifest.json").read_text())
    print(f"\nwall time {wall / 60:.1f} min (set-up excluded)\n\n| step | seconds |\n|---|---|")
    for name in state["order"]:
        print(f"| {name} | {state['steps'][name].get('seconds', '')} |")
    print(f"\nunseen prompts: {samples['prompts']}; background right {samples['cascade_background_accuracy']:.2f}, "
          f"every named colour {samples['cascade_colour_accuracy']:.2f}, shapes in their cell "
          f"{samples['cascade_position_accuracy']:.2f} (base alone: {samples['base_background_accuracy']:.2f}, "
          f"{samples['base_colour_accuracy']:.2f}, {samples['base_position_accuracy']:.2f})")
    for shard in evaluate["shards"]:
        metrics = shard["metrics"]
        if "psnr" in metrics:
            print(f"{shard['shard_id']}: PSNR {metrics['psnr']:.2f} dB vs bicubic {metrics['psnr_bicubic']:.2f} dB")
    line, count = collections.Counter(terminal).most_common(1)[0]
    print(f"terminal: {len(terminal)} lines; most repeated ({count}x): {line[:120]!r}\ngrid: {samples['grid']}")


if __name__ == "__main__":
    main()
