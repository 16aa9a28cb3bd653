"""`imagen plan`: the capacity table from the unit-cost file the benchmarks write."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagen_core.config_io import ConfigError
from pipelines.plan import PlanCommand, load_unit_costs, parse_count, plan

ROOT = Path(__file__).resolve().parents[1]


def _line(lines, step):
    return next(line for line in lines if line.step == step)


def test_plan_prints_the_paper_table_in_a_second():
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "plan", "--pairs", "400M", "--stages", "paper"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < 3.0, elapsed  # the interpreter's start included; the plan itself is arithmetic
    rows = [line.split()[0] + (" " + line.split()[1] if line.startswith("train") else "")
            for line in done.stdout.splitlines()[2:]]
    assert rows == ["ingest", "curate", "embed", "train paper_base_2b", "train paper_sr256_600m",
                    "train paper_sr1024_400m", "storage", "total"], done.stdout
    assert "400M pairs" in done.stdout and "stated:" in done.stdout and "counted:" in done.stdout


def test_the_unit_costs_come_from_the_file(tmp_path):
    costs = load_unit_costs()
    lines, _ = plan(PlanCommand(pairs="400M"))
    costs["gpu_bf16_peak_tflops"]["value"] *= 2
    costs["download_samples_per_s_per_node"]["value"] /= 2
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(costs))
    faster, _ = plan(PlanCommand(pairs="400M", unit_costs=str(path)))
    for step in ("train paper_base_2b", "embed"):
        assert _line(faster, step).days == pytest.approx(_line(lines, step).days / 2)
    assert _line(faster, "ingest").days == pytest.approx(_line(lines, "ingest").days * 2)
    costs["train_mfu"]["value"] /= 2  # what bench/bench_gpu.py --record writes after a GPU run
    path.write_text(json.dumps(costs))
    slower, totals = plan(PlanCommand(pairs="400M", unit_costs=str(path)))
    assert totals["mfu"] == pytest.approx(load_unit_costs()["train_mfu"]["value"] / 2)
    assert _line(slower, "train paper_base_2b").days == pytest.approx(_line(faster, "train paper_base_2b").days * 2)
    del costs["stages"]
    path.write_text(json.dumps(costs))
    with pytest.raises(ConfigError, match="bench_unit_costs.py"):
        plan(PlanCommand(unit_costs=str(path)))


def test_the_shipped_flop_counts_are_the_recipes_of_today():
    """The file is stale when a recipe changed after the benchmark counted it: recount the tiny cascade."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_unit_costs import train_flops_per_image

    for stage in load_unit_costs()["stages"]["tiny"]:
        flops, params = train_flops_per_image(stage["recipe"])
        assert (flops, params) == (stage["train_flops_per_image"], stage["params"]), stage


def test_a_gpu_run_records_its_peak_and_mfu(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_gpu import UNIT_COSTS, record_unit_costs

    path = tmp_path / "unit_costs.json"
    path.write_text(UNIT_COSTS.read_text())
    record_unit_costs(700e12, 0.41, "bench/bench_gpu.py --size m100, test GPU", path)
    lines, totals = plan(PlanCommand(unit_costs=str(path)))
    assert totals["mfu"] == 0.41 and load_unit_costs(str(path))["gpu_bf16_peak_tflops"]["value"] == 700.0
    assert "MFU 41% measured: bench/bench_gpu.py" in _line(lines, "train paper_base_2b").source


def test_plan_agrees_with_published_runs():
    # img2dataset downloaded LAION-5B in about a week on 10 nodes
    lines, _ = plan(PlanCommand(pairs="5B", download_nodes=10))
    assert 4 <= _line(lines, "ingest").days <= 8
    # the paper's base stage: 2.5M steps x 2048 images; more GPUs or a better MFU shorten it in proportion
    lines, totals = plan(PlanCommand(pairs="400M", gpus=256))
    doubled, _ = plan(PlanCommand(pairs="400M", gpus=512))
    assert _line(doubled, "train paper_base_2b").days == pytest.approx(_line(lines, "train paper_base_2b").days / 2,
                                                                      rel=0.02)
    train = [line for line in lines if line.step.startswith("train")]
    assert max(t.days for t in train) / min(t.days for t in train) < 1.1  # GPUs split so the stages end together
    assert totals["dollars"] == pytest.approx(sum(line.dollars for line in lines))
    assert totals["tb"] > 0


def test_bad_input_is_named():
    assert parse_count("400M") == 400_000_000 and parse_count("5B") == 5_000_000_000 and parse_count("1e6") == 10**6
    for bad in ("40x", "", "0"):
        with pytest.raises(ConfigError, match="pairs"):
            parse_count(bad)
    for field, value in (("mfu", 1.5), ("keep_fraction", 0.0)):
        with pytest.raises(ConfigError, match=field):
            plan(dataclasses.replace(PlanCommand(), **{field: value}))
    with pytest.raises(ConfigError, match="bench_unit_costs.py --cascades nope"):
        plan(PlanCommand(stages="nope"))
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "plan", "--set", "gpus=0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "gpus" in done.stderr, done.stderr
