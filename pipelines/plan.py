"""`imagen plan`: what a run of N pairs through a cascade costs, in nodes x days, TB and dollars.

Arithmetic only, over unit costs read from a file (`pipelines/configs/unit_costs.json`, rewritten by
`bench/bench_unit_costs.py`): each unit cost carries its value and where it came from, either counted or
measured by that script or stated from a published figure, and the table prints the source beside each line.

The model of a run (the steps of `imagen run`):
- ingest: pairs / (samples/s per CPU node x nodes), img2dataset's unit of scale;
- curate: pairs CLIP-scored on GPUs, images/s per GPU;
- embed: the kept pairs' captions through the text encoder, its FLOPs per caption at a stated utilisation;
- train: per stage, steps x global batch images, each the U-Net's training FLOPs per image (forward + backward,
  counted by torch.utils.flop_counter on the meta device, activation recomputation not included: MFU counts model
  FLOPs), at `mfu` of the GPU's dense bf16 peak;
- storage: stored image bytes plus the text embeddings (fp16, only the caption's real tokens) per kept pair.
"""
from __future__ import annotations

import dataclasses
import json
import re
from importlib import resources
from typing import Any

from imagen_core.config_io import ConfigError

UNIT_COSTS_FILE = "unit_costs.json"


@dataclasses.dataclass(kw_only=True, frozen=True)
class Prices:
    gpu_hour: float = 2.50
    """Dollars per GPU-hour (an H100 on a committed-use cloud contract, order of magnitude)."""
    cpu_node_hour: float = 0.68
    """Dollars per hour of a 16-core download node."""
    tb_month: float = 23.0
    """Dollars per TB-month of object storage."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class PlanCommand:
    pairs: str = "400M"
    """Image-text pairs in the URL list: a number, or with a K/M/B suffix (400M, 5B)."""
    stages: str = "paper"
    """A cascade recipe (`paper`, `demo`, `tiny`) whose stages the unit-cost file counted."""
    steps: int = 2_500_000
    """Training steps per stage (the paper: 2.5M)."""
    global_batch: int = 2048
    """Images per training step per stage (the paper: 2048)."""
    keep_fraction: float = 0.7
    """Share of the downloaded pairs curation keeps (cluster/run/paper.toml keeps 0.7 by CLIP-score percentile)."""
    download_success: float = 0.9
    """Share of the URLs that download (LAION-scale lists lose about a tenth to dead links)."""
    mfu: float | None = None
    """Model FLOPs utilisation of training; default: the unit-cost file's `train_mfu` (measured by
    `bench/bench_gpu.py --record` on a GPU, else the stated 0.45, that benchmark's goal on an H100)."""
    download_nodes: int = 10
    """CPU nodes downloading at once."""
    gpus: int = 256
    """GPUs the curation, embedding and training share (the stages train concurrently on them)."""
    months_stored: float = 1.0
    """How long the dataset is kept, for its storage cost."""
    prices: Prices = Prices()
    unit_costs: str | None = None
    """Another unit-cost file (default: the shipped one)."""


def parse_count(text: str) -> int:
    """'400M' -> 400_000_000; '5B', '10K', '1e6', '1_000' also."""
    match = re.fullmatch(r"\s*([0-9_.eE+]+)\s*([kKmMbB]?)\s*", str(text))
    if not match:
        raise ConfigError(f"pairs={text!r} is not a count: give a number, optionally with K, M or B (400M, 5B)")
    value = float(match.group(1).replace("_", "")) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[match.group(2).lower()]
    if value < 1:
        raise ConfigError(f"pairs={text!r}: at least one pair")
    return int(value)


def load_unit_costs(path: str | None = None) -> dict[str, Any]:
    if path is None:
        text = (resources.files("pipelines") / "configs" / UNIT_COSTS_FILE).read_text()
        path = f"pipelines/configs/{UNIT_COSTS_FILE}"
    else:
        try:
            text = open(path).read()
        except OSError as exc:
            raise ConfigError(f"unit_costs={path!r} cannot be read ({exc}); omit it for the shipped file") from exc
    costs = json.loads(text)
    missing = {"download_samples_per_s_per_node", "clip_images_per_s_per_gpu", "text_encoder",
               "gpu_bf16_peak_tflops", "train_mfu", "image_bytes", "stages"} - set(costs)
    if missing:
        raise ConfigError(f"{path} lacks {sorted(missing)}: rerun bench/bench_unit_costs.py to rewrite it")
    return costs


@dataclasses.dataclass(frozen=True)
class Line:
    step: str
    work: str
    resources: str
    days: float
    dollars: float
    source: str


def _days(seconds: float) -> float:
    return seconds / 86_400


def plan(c: PlanCommand) -> tuple[list[Line], dict[str, float]]:
    """The table's lines and its totals (days end to end with the steps one after another, TB, dollars)."""
    costs = load_unit_costs(c.unit_costs)
    pairs = parse_count(c.pairs)
    mfu_cost = costs["train_mfu"] if c.mfu is None else {"value": c.mfu, "source": "given"}
    mfu = mfu_cost["value"]
    for name, value in (("keep_fraction", c.keep_fraction), ("download_success", c.download_success),
                        ("mfu", mfu)):
        if not 0 < value <= 1:
            raise ConfigError(f"{name}={value} is outside (0, 1]")
    if c.stages not in costs["stages"]:
        raise ConfigError(f"stages={c.stages!r}: the unit-cost file counted {sorted(costs['stages'])}; run "
                          f"bench/bench_unit_costs.py --cascades {c.stages} to count it")
    if c.download_nodes < 1 or c.gpus < 1 or c.steps < 0 or c.global_batch < 1:
        raise ConfigError("download_nodes, gpus and global_batch must be at least 1, steps at least 0")
    downloaded = pairs * c.download_success
    kept = downloaded * c.keep_fraction
    lines = []

    rate = costs["download_samples_per_s_per_node"]
    seconds = pairs / (rate["value"] * c.download_nodes)
    lines.append(Line("ingest", f"{_count(pairs)} URLs", f"{c.download_nodes} CPU nodes", _days(seconds),
                      seconds / 3600 * c.download_nodes * c.prices.cpu_node_hour, rate["source"]))

    rate = costs["clip_images_per_s_per_gpu"]
    gpu_seconds = downloaded / rate["value"]
    lines.append(Line("curate", f"{_count(downloaded)} images CLIP-scored", f"{c.gpus} GPUs",
                      _days(gpu_seconds / c.gpus), gpu_seconds / 3600 * c.prices.gpu_hour, rate["source"]))

    peak = costs["gpu_bf16_peak_tflops"]["value"] * 1e12
    encoder = costs["text_encoder"]
    flops = 2 * encoder["params"] * encoder["mean_tokens"]  # a forward pass: 2 FLOPs per weight per token
    gpu_seconds = kept * flops / (peak * encoder["mfu"])
    lines.append(Line("embed", f"{_count(kept)} captions, {encoder['name']}", f"{c.gpus} GPUs",
                      _days(gpu_seconds / c.gpus), gpu_seconds / 3600 * c.prices.gpu_hour, encoder["source"]))

    stages = costs["stages"][c.stages]
    images = c.steps * c.global_batch
    total_flops = sum(s["train_flops_per_image"] for s in stages)
    for stage in stages:
        gpu_seconds = images * stage["train_flops_per_image"] / (peak * mfu)
        share = stage["train_flops_per_image"] / total_flops  # GPUs split by work: the stages end together
        gpus = max(1, round(c.gpus * share))
        per_gpu = peak * mfu / stage["train_flops_per_image"]
        lines.append(Line(f"train {stage['recipe']}", f"{c.steps:,} steps x {c.global_batch} "
                          f"({per_gpu:,.0f} img/s/GPU)", f"{gpus} GPUs", _days(gpu_seconds / gpus),
                          gpu_seconds / 3600 * c.prices.gpu_hour,
                          f"{stage['source']}; MFU {mfu:.0%} {mfu_cost['source']}"))

    image_bytes = costs["image_bytes"]["value"]
    embed_bytes = encoder["mean_tokens"] * encoder["width"] * 2  # fp16, the real tokens only
    tb = kept * (image_bytes + embed_bytes) / 1e12 + downloaded * (1 - c.keep_fraction) * image_bytes / 1e12
    lines.append(Line("storage", f"{tb:,.1f} TB ({_bytes(image_bytes)} image + {_bytes(embed_bytes)} "
                      "embedding per kept pair)", "object store", 0.0, tb * c.prices.tb_month * c.months_stored,
                      costs["image_bytes"]["source"]))
    train_days = max(line.days for line in lines if line.step.startswith("train"))
    totals = {"days": sum(line.days for line in lines if not line.step.startswith("train")) + train_days,
              "tb": tb, "dollars": sum(line.dollars for line in lines), "mfu": mfu}
    return lines, totals


def format_plan(c: PlanCommand, lines: list[Line], totals: dict[str, float]) -> str:
    out = [f"plan: {_count(parse_count(c.pairs))} pairs -> the {c.stages} cascade, {c.steps:,} steps x "
           f"{c.global_batch} per stage at {totals['mfu']:.0%} MFU; ${c.prices.gpu_hour}/GPU-h, "
           f"${c.prices.cpu_node_hour}/node-h, ${c.prices.tb_month}/TB-month",
           f"{'step':<26}{'work':<64}{'on':<16}{'days':>8}{'dollars':>14}  source"]
    for line in lines:
        out.append(f"{line.step:<26}{line.work:<64}{line.resources:<16}{line.days:>8.1f}{line.dollars:>14,.0f}  "
                   f"{line.source}")
    out.append(f"{'total':<26}{'(steps in order; the stages train side by side)':<64}{'':<16}"
               f"{totals['days']:>8.1f}{totals['dollars']:>14,.0f}")
    return "\n".join(out)


def _count(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"

