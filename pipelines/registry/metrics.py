"""Which metrics a stage is judged on, which way is better, and where they live in the registry."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

Direction = Literal["min", "max"]

METRIC_TAG_PREFIX = "metric."
"""Model-version tag holding an evaluation result: `metric.eval_loss` = "0.0123"."""
RUN_METRIC_PREFIX = "eval/"
"""Run metric key of an evaluation result, beside the trainer's own `val_loss`."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class MetricSpec:
    """A metric promotion can compare on."""

    name: str
    """Key of the metric (the tag `metric.<name>` on each model version)."""
    direction: Direction
    """"min": lower is better (eval_loss, FID); "max": higher is better (CLIP score, colour accuracy)."""

    def __post_init__(self) -> None:
        if self.direction not in get_args(Direction):
            raise ValueError(f"MetricSpec.direction must be one of {get_args(Direction)}, got {self.direction!r}")
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"MetricSpec.name must be a non-empty key without spaces, got {self.name!r}")

    @property
    def tag(self) -> str:
        return METRIC_TAG_PREFIX + self.name

    def improvement(self, challenger: float, champion: float) -> tuple[float, float]:
        """(absolute, relative) improvement of challenger over champion; positive = better, in either direction.

        Relative is against |champion|; a champion of exactly 0 gives +-inf for any change (and 0 for none).
        """
        gain = champion - challenger if self.direction == "min" else challenger - champion
        if champion != 0:
            return gain, gain / abs(champion)
        return gain, math.copysign(math.inf, gain) if gain else 0.0


KNOWN_METRICS = {
    "eval_loss": MetricSpec(name="eval_loss", direction="min"),
    "train_val_loss": MetricSpec(name="train_val_loss", direction="min"),
    "psnr": MetricSpec(name="psnr", direction="max"),
    "fid": MetricSpec(name="fid", direction="min"),
    "clip_score": MetricSpec(name="clip_score", direction="max"),
    "colour_accuracy": MetricSpec(name="colour_accuracy", direction="max"),
    "position_accuracy": MetricSpec(name="position_accuracy", direction="max"),
}


def metric_spec(metric: str | MetricSpec) -> MetricSpec:
    """A MetricSpec as given, or the known one by name."""
    if isinstance(metric, MetricSpec):
        return metric
    if metric not in KNOWN_METRICS:
        raise ValueError(
            f"unknown metric {metric!r}: known are {sorted(KNOWN_METRICS)}; for another, pass "
            "MetricSpec(name=..., direction='min' or 'max')"
        )
    return KNOWN_METRICS[metric]
