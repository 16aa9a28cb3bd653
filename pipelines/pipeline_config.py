"""The pipeline config behind `imagen run`: one TOML file, a table per step, every field typed and checked.

```toml
run_dir = "runs/my-run"             # every step writes under it (or "s3://bucket/runs/my-run")
tracking_uri = "http://mlflow:5000" # default: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
model_name = "imagen"               # registry names: <model_name>-<stage> and the cascade <model_name>
[ray]      address = "auto"
[ingest]   url_list.paths = ["s3://bucket/urls/"] ...     (pipelines.ingest.IngestConfig, less output_dir)
[curate]   score.clip = {...}  select.* ...                (pipelines.curate.CurateConfig)
[embed]    text_encoder = {...}  pool = {...}               (pipelines.embed.EmbedConfig)
[train.base] stage = "paper_base_2b" ...                   (pipelines.train.config.TrainConfig, less paths)
[evaluate] metrics = ["eval_loss", "clip_score"] ...       (pipelines.registry.evaluate.EvalConfig)
[register] ...   [promote] metric = "eval_loss" ...
```

The paths a step reads and writes follow from `run_dir` and are filled in here (a table may still set them);
each training stage gets the embed step's text encoder unless its table names one. `load_pipeline_config`
checks the whole tree before anything runs and names the bad field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from imagen_core.config_io import ConfigError, apply_override, build, load_file
from pipelines import storage
from pipelines.curate import CurateConfig
from pipelines.embed import EmbedConfig
from pipelines.ingest import IngestConfig
from pipelines.ray_env import RayConfig
from pipelines.storage import StoragePath
from pipelines.registry.evaluate import EvalConfig
from pipelines.train.config import TrainConfig

INGEST_DIR, SCORES_DIR, CURATE_DIR, EMBED_DIR, HELDOUT_DIR = "ingest", "scores", "curate", "embed", "heldout"
TRAIN_DIR, REGISTRY_DIR = "train", "registry"


@dataclasses.dataclass(kw_only=True, frozen=True)
class PromoteConfig:
    """Metric-gated promotion of each stage's challenger to champion (pipelines/registry/promote.py)."""

    metric: str = "eval_loss"
    """The evaluation metric that decides (a name from [evaluate] metrics)."""
    min_abs: float = 0.0
    """Minimum absolute improvement over the champion."""
    min_rel: float = 0.01
    """Minimum relative improvement over the champion."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class RegisterStepConfig:
    """Registration of every stage and of the cascade that chains them by alias."""

    experiment: str | None = None
    """Experiment of registration runs without a training run (None: the pipeline's experiment)."""
    cascade_alias: str = "champion"
    """The alias each stage is resolved by when the cascade model loads."""
    device: str = "cpu"
    """Device the registered pyfunc models load onto by default."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class PipelineConfig:
    """The whole run: URL list -> ingest -> curate -> embed -> train every stage -> register, evaluate, promote."""

    run_dir: str
    """Where every step writes (ingest/, scores/, curate/, embed/, train/<stage>/, heldout/, registry/): a local
    or shared path, or an object-store URL (s3://bucket/prefix, gs://...; credentials from the usual AWS_*/GCS
    variables, which Ray forwards to every worker)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: $MLFLOW_TRACKING_URI (a cluster's Secret), else sqlite:///<run_dir>/mlflow.db
    (a local run_dir only: an object-store run needs an MLflow server)."""
    experiment: str = "imagen"
    """MLflow experiment of the pipeline run, its steps and the trainings."""
    model_name: str = "imagen"
    """Registered names: `<model_name>-<stage>` per stage and `<model_name>` for the cascade."""
    seed: int = 0
    """Seeds training (a stage table's own `seed` wins)."""
    log_file: str | None = None
    """Where Ray, DeepSpeed and library logs go (None: <run_dir>/run.log; for an object-store run_dir a local
    file, copied to <run_dir>/run.log when the run ends); the terminal gets a line per step."""
    ray: RayConfig = RayConfig()
    ingest: IngestConfig
    curate: CurateConfig
    embed: EmbedConfig
    train: dict[str, TrainConfig]
    """One table per cascade stage, base first (`[train.base]`, `[train.sr1]`, ...)."""
    evaluate: EvalConfig = EvalConfig()
    register: RegisterStepConfig = RegisterStepConfig()
    promote: PromoteConfig = PromoteConfig()

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("train: give at least one stage table, e.g. [train.base] stage = \"demo_base\"")
        stages = [t.stage for t in self.train.values()]
        if stages[0].is_super_resolution or not all(s.is_super_resolution for s in stages[1:]):
            raise ValueError(f"train: the first stage table must be the base stage and the rest super-resolution "
                             f"stages; got {[(n, 'sr' if s.is_super_resolution else 'base') for n, s in zip(self.train, stages)]}")
        for (low, a), (high, b) in zip(self.train.items(), list(self.train.items())[1:]):
            if b.stage.lowres_size != a.stage.image_size:
                raise ValueError(f"train.{high}.stage.lowres_size is {b.stage.lowres_size} but the stage before it, "
                                 f"train.{low}, makes {a.stage.image_size} px images")
        if self.promote.metric not in self.evaluate.metrics:
            raise ValueError(f"promote.metric {self.promote.metric!r} is not computed: evaluate.metrics is "
                             f"{list(self.evaluate.metrics)}")

    @property
    def root(self) -> StoragePath:
        return storage.path(self.run_dir)

    @property
    def mlflow_uri(self) -> str:
        return default_tracking_uri(self.tracking_uri, self.root)

    @property
    def log_path(self) -> pathlib.Path:
        """A local file (file descriptors are redirected into it)."""
        return pathlib.Path(self.log_file).resolve() if self.log_file else local_dir(self.root) / "run.log"

    def dir(self, name: str) -> StoragePath:
        return self.root / name


def local_dir(root: StoragePath) -> pathlib.Path:
    """The run's folder on this machine: run_dir itself, or for an object-store run_dir a cache folder named by
    its URL (the live log file; the demo's served corpus)."""
    if root.is_local:
        return root.local
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return pathlib.Path(os.environ.get("IMAGEN_CACHE_DIR", "~/.cache/imagen")).expanduser() / "runs" / digest


def default_tracking_uri(given: str | None, root: StoragePath) -> str:
    given = given or os.environ.get("MLFLOW_TRACKING_URI")
    if given:
        return given
    if not root.is_local:
        raise ConfigError(f"tracking_uri: run_dir {root} is in an object store, where an MLflow sqlite database "
                          "cannot live; set tracking_uri (or $MLFLOW_TRACKING_URI) to your MLflow server, e.g. "
                          "http://mlflow:5000")
    return run_dir_tracking_uri(root)


def run_dir_tracking_uri(root: StoragePath) -> str:
    """The default MLflow store of a local run: a sqlite database in run_dir, created with it."""
    return f"sqlite:///{root.local / 'mlflow.db'}"


def _filled(data: dict[str, Any]) -> dict[str, Any]:
    """The config tree with each step's paths (from run_dir) and the links between steps filled in."""
    from imagen_core.recipes import stage_table

    if "run_dir" not in data:
        raise ConfigError("run_dir: missing; the pipeline config needs the directory every step writes under")
    if not isinstance(data["run_dir"], str):
        raise ConfigError(f"run_dir: expected str, got {type(data['run_dir']).__name__}")
    root = storage.path(data["run_dir"])
    out = dict(data)
    tables = {name: out.get(name) for name in ("ingest", "curate", "embed", "train")}
    for name, table in tables.items():
        if table is None:
            raise ConfigError(f"{name}: missing table [{name}]; see the config reference in the README")
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: expected a table, got {type(table).__name__}")
    out["ingest"] = {"output_dir": str(root / INGEST_DIR), **tables["ingest"]}
    uri = default_tracking_uri(data.get("tracking_uri"), root)
    encoder = tables["embed"].get("text_encoder")
    stages = {}
    for name, table in tables["train"].items():
        if not isinstance(table, dict):
            raise ConfigError(f"train.{name}: expected a table of TrainConfig fields, got {type(table).__name__}")
        table = dict(table)
        if "stage" not in table:
            raise ConfigError(f"train.{name}.stage: missing; name a recipe (e.g. stage = \"demo_base\") or give a table")
        stage = {**stage_table(table["stage"]), "name": name}
        if encoder is not None:
            stage["text_encoder"] = encoder  # one source of truth: a stage is conditioned on what embed stores
        table["stage"] = stage
        train_dir = root / TRAIN_DIR / name
        table.setdefault("output_dir", str(train_dir))
        table.setdefault("run_name", name)
        table.setdefault("seed", data.get("seed", 0))
        table["resume"] = True  # a pipeline always continues its own run
        table["data"] = {"paths": [str(root / EMBED_DIR / "shards")], **table.get("data", {})}
        table["checkpoint"] = {"storage_path": str(train_dir / "ray"), **table.get("checkpoint", {})}
        table["tracking"] = {"tracking_uri": uri, "experiment": data.get("experiment", "imagen"),
                             **table.get("tracking", {})}
        stages[name] = table
    out["train"] = stages
    out["evaluate"] = {"heldout_dir": str(root / HELDOUT_DIR), **out.get("evaluate", {})}
    return out


def with_stage_tables(data: dict[str, Any]) -> dict[str, Any]:
    """Each `train.<stage>.stage` given by recipe name expanded to its whole table, so that an override such
    as `train.base.stage.sampler.steps=10` changes one field of the recipe."""
    from imagen_core.recipes import stage_table

    train = data.get("train")
    if not isinstance(train, dict):
        return data
    def expanded(stage: Any) -> dict[str, Any]:  # the text encoder is the embed step's (filled in later)
        return {k: v for k, v in stage_table(stage).items() if k != "text_encoder"}

    tables = {name: {**t, "stage": expanded(t["stage"])} if isinstance(t, dict) and "stage" in t else t
              for name, t in train.items()}
    return {**data, "train": tables}


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`--set dotted.key=value` overrides on a pipeline config's plain data (stage recipes expanded first)."""
    _refuse_stage_encoders(data, overrides)
    data = with_stage_tables(data)
    for assignment in overrides:
        data = apply_override(data, assignment)
    return data


def _refuse_stage_encoders(data: dict[str, Any], overrides: Sequence[str]) -> None:
    """A stage's text encoder is the embed step's; setting one per stage would condition it on other
    embeddings than the ones it trains on."""
    given = [f"train.{name}.stage.text_encoder" for name, t in (data.get("train") or {}).items()
             if isinstance(t, dict) and isinstance(t.get("stage"), dict) and "text_encoder" in t["stage"]]
    given += [a.partition("=")[0] for a in overrides if ".stage.text_encoder" in a.partition("=")[0]]
    if given:
        raise ConfigError(f"{given[0]}: a stage takes the embed step's text encoder; set embed.text_encoder instead")


def pipeline_config_from_dict(data: dict[str, Any], overrides: Sequence[str] = ()) -> PipelineConfig:
    """Build and check a PipelineConfig from plain data plus `dotted.key=value` overrides."""
    return build(PipelineConfig, _filled(apply_overrides(data, overrides)))


def load_pipeline_config(path: str, overrides: Sequence[str] = ()) -> PipelineConfig:
    """A pipeline config file (TOML/JSON) with `--set` overrides, checked; errors name the field."""
    return pipeline_config_from_dict(load_file(path), overrides)
