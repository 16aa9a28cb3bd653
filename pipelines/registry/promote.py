"""Champion/challenger promotion with recorded decisions, rollback, and a listing of what is registered.

`promote` compares the `challenger` version of `<name>-<stage>` with its `champion` on one metric (the direction
is part of the metric spec) and moves `champion` only when the challenger improves by at least `min_abs` and by
at least `min_rel` of the champion's value, or when there is no champion yet. Either way the decision and its
numbers are written as `promotion.*` tags on the challenger version; a promoted version also records the
champion it replaced (`promotion.previous_champion`), which is what `rollback` restores.
"""
from __future__ import annotations

import dataclasses
import datetime
import getpass
from typing import Any, Literal

import mlflow
import pandas as pd

from pipelines.registry.loading import KIND_TAG, ModelRef, resolve, stage_model_name
from pipelines.registry.metrics import METRIC_TAG_PREFIX, MetricSpec, metric_spec

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION_TAG = "promotion.previous_champion"
"""On a champion version: the version it replaced ("none" for the first)."""

Outcome = Literal["promoted", "first_champion", "refused", "forced"]


@dataclasses.dataclass(frozen=True)
class PromotionDecision:
    """What `promote` decided and the numbers it decided on."""

    model: str
    metric: MetricSpec
    outcome: Outcome
    challenger_version: str
    challenger_value: float | None
    champion_version: str | None
    champion_value: float | None
    abs_improvement: float | None
    """Better-is-positive difference (champion - challenger for "min" metrics)."""
    rel_improvement: float | None
    """abs_improvement / |champion value|."""
    min_abs: float
    min_rel: float
    rule_accepts: bool
    """What the rule alone said (differs from `promoted` only when forced)."""
    who: str
    reason: str | None
    at: str

    @property
    def promoted(self) -> bool:
        return self.outcome != "refused"

    def summary(self) -> str:
        if self.champion_version is None:
            numbers = f"{self.metric.name}={_fmt(self.challenger_value)}, no champion before"
        else:
            numbers = (
                f"{self.metric.name} ({self.metric.direction} is better): challenger v{self.challenger_version} "
                f"{_fmt(self.challenger_value)} vs champion v{self.champion_version} {_fmt(self.champion_value)}; "
                f"improvement {_fmt(self.abs_improvement)} abs, {_fmt(self.rel_improvement)} rel "
                f"(needs >= {self.min_abs:g} abs and >= {self.min_rel:g} rel)"
            )
        forced = f", forced by {self.who}: {self.reason}" if self.outcome == "forced" else ""
        return f"{self.model}: {self.outcome}{forced}; {numbers}"

    def tags(self) -> dict[str, str]:
        values = {
            "outcome": self.outcome,
            "metric": self.metric.name,
            "direction": self.metric.direction,
            "challenger_value": _fmt(self.challenger_value),
            "champion_version": self.champion_version or "none",
            "champion_value": _fmt(self.champion_value),
            "abs_improvement": _fmt(self.abs_improvement),
            "rel_improvement": _fmt(self.rel_improvement),
            "min_abs": repr(self.min_abs),
            "min_rel": repr(self.min_rel),
            "rule_accepts": str(self.rule_accepts).lower(),
            "by": self.who,
            "reason": self.reason or "",
            "at": self.at,
        }
        return {f"promotion.{k}": v for k, v in values.items()}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else repr(value)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _metric_value(version: Any, spec: MetricSpec) -> float | None:
    raw = version.tags.get(spec.tag)
    return None if raw is None else float(raw)


def _rule(
    spec: MetricSpec, challenger: float, champion: float, min_abs: float, min_rel: float
) -> tuple[float, float, bool]:
    gain, rel = spec.improvement(challenger, champion)
    return gain, rel, gain > 0 and gain >= min_abs and rel >= min_rel


def _aliases(client: Any, model: str) -> dict[str, str]:
    """alias -> version, versions as strings (the sqlite store gives ints, the REST one strings)."""
    return {alias: str(version) for alias, version in client.get_registered_model(model).aliases.items()}


def promote(
    name: str,
    stage: str,
    metric: str | MetricSpec,
    min_abs: float = 0.0,
    min_rel: float = 0.0,
    force: bool = False,
    reason: str | None = None,
    who: str | None = None,
) -> PromotionDecision:
    """Decide whether `<name>-<stage>@challenger` replaces `@champion`, move the alias if so, record the decision."""
    spec = metric_spec(metric)
    if min_abs < 0 or min_rel < 0:
        raise ValueError(f"min_abs and min_rel are required improvements, >= 0; got {min_abs}, {min_rel}")
    if force and not (reason and reason.strip()):
        raise ValueError("force=True needs a reason: it is recorded on the version with who asked")
    client = mlflow.MlflowClient()
    model = stage_model_name(name, stage)
    challenger = resolve(ModelRef(model, alias=CHALLENGER), client)
    champion_version = _aliases(client, model).get(CHAMPION)
    if champion_version == str(challenger.version):
        raise ValueError(f"{model} v{challenger.version} is already the champion; register a new challenger first")
    champion = client.get_model_version(model, champion_version) if champion_version else None
    challenger_value = _metric_value(challenger, spec)
    champion_value = _metric_value(champion, spec) if champion else None
    gain = rel = None
    if champion is None:
        rule_accepts, outcome = True, "first_champion"
    elif challenger_value is None or champion_value is None:
        if not force:
            pairs = ((challenger, challenger_value), (champion, champion_value))
            missing = [f"v{v.version}" for v, x in pairs if x is None]
            raise ValueError(
                f"{model}: no {spec.tag} tag on {', '.join(missing)}; run evaluate_stage on it first "
                "(or force=True with a reason)"
            )
        rule_accepts, outcome = False, "forced"
    else:
        gain, rel, rule_accepts = _rule(spec, challenger_value, champion_value, min_abs, min_rel)
        outcome = "promoted" if rule_accepts else ("forced" if force else "refused")
    decision = PromotionDecision(
        model=model, metric=spec, outcome=outcome, challenger_version=str(challenger.version),
        challenger_value=challenger_value, champion_version=champion_version, champion_value=champion_value,
        abs_improvement=gain, rel_improvement=rel, min_abs=min_abs, min_rel=min_rel, rule_accepts=rule_accepts,
        who=who or getpass.getuser(), reason=reason, at=_now(),
    )
    _record(client, decision)
    return decision


def _record(client: Any, decision: PromotionDecision) -> None:
    model, version = decision.model, decision.challenger_version
    for key, value in decision.tags().items():
        client.set_model_version_tag(model, version, key, value)
    if not decision.promoted:
        return
    client.set_model_version_tag(model, version, PREVIOUS_CHAMPION_TAG, decision.champion_version or "none")
    if decision.champion_version:
        client.set_model_version_tag(model, decision.champion_version, "promotion.replaced_by", version)
    client.set_registered_model_alias(model, CHAMPION, version)
    # It is the champion now; the next registration will be the challenger.
    client.delete_registered_model_alias(model, CHALLENGER)


@dataclasses.dataclass(frozen=True)
class RollbackRecord:
    model: str
    from_version: str
    to_version: str
    who: str
    reason: str | None
    at: str


def rollback(name: str, stage: str | None = None, reason: str | None = None, who: str | None = None) -> RollbackRecord:
    """Point `champion` back at the version the current champion replaced (stage None: the cascade `<name>`)."""
    client = mlflow.MlflowClient()
    model = stage_model_name(name, stage) if stage else name
    current = resolve(ModelRef(model, alias=CHAMPION), client)
    previous = current.tags.get(PREVIOUS_CHAMPION_TAG, "none")
    if previous == "none":
        raise ValueError(
            f"{model}: champion v{current.version} replaced no earlier champion; there is nothing to roll back to"
        )
    record = RollbackRecord(model=model, from_version=str(current.version), to_version=previous,
                            who=who or getpass.getuser(), reason=reason, at=_now())
    tags = {
        "rollback.to": previous, "rollback.by": record.who, "rollback.reason": reason or "", "rollback.at": record.at
    }
    for key, value in tags.items():
        client.set_model_version_tag(model, current.version, key, value)
    client.set_model_version_tag(model, previous, "rollback.restored_from", current.version)
    client.set_registered_model_alias(model, CHAMPION, previous)
    return record


def list_stages(name: str) -> pd.DataFrame:
    """One row per version of `<name>` and `<name>-*`: kind, aliases, metrics (one column each), promotion outcome."""
    client = mlflow.MlflowClient()
    rows = []
    for model in client.search_registered_models(filter_string=f"name LIKE '{name}%'"):
        if model.name != name and not model.name.startswith(f"{name}-"):
            continue
        by_version: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(filter_string=f"name = '{model.name}'"):
            metrics = {
                k[len(METRIC_TAG_PREFIX):]: float(v) for k, v in version.tags.items() if k.startswith(METRIC_TAG_PREFIX)
            }
            rows.append({
                "model": model.name,
                "kind": model.tags.get(KIND_TAG, "?"),
                "version": int(version.version),
                "aliases": ",".join(sorted(by_version.get(str(version.version), []))),
                **metrics,
                "promotion": version.tags.get("promotion.outcome", ""),
                "run_id": version.run_id,
            })
    if not rows:
        return pd.DataFrame(columns=["model", "kind", "version", "aliases", "promotion", "run_id"])
    return pd.DataFrame(rows).sort_values(["model", "version"]).reset_index(drop=True)

