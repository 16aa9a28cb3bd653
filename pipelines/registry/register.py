"""Register a trained stage (`<name>-<stage>`) and a cascade (`<name>`) in the MLflow model registry.

A stage version carries its checkpoint (model.safetensors + config.json, sha256-recorded) as a pyfunc artifact,
a code-logged pyfunc wrapper (no pickle), explicit pip requirements (MLflow would otherwise spend seconds
inferring them) and a signature. Tags record where it came from: dataset manifest hash, config hash, git commit,
training run, weights sha256 and the metrics known at registration. The new version gets the alias `challenger`;
`promote` decides whether it becomes `champion`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import mlflow

from imagen_core.stage import StageConfig
from pipelines import storage
from pipelines.registry.checkpoints import copy_stage_files, local_stage_files, read_manifest, weights_sha256
from pipelines.registry.loading import (
    CHECKPOINT_ARTIFACT,
    KIND_TAG,
    WEIGHTS_SHA_TAG,
    ModelRef,
    resolve,
    stage_model_name,
)
from pipelines.registry.metrics import METRIC_TAG_PREFIX
from pipelines.registry.pyfunc_model import CASCADE_MODEL_CODE, STAGE_MODEL_CODE, prompt_signature
from pipelines.registry.promote import CHAMPION, CHALLENGER, PREVIOUS_CHAMPION_TAG
from pipelines.step import canonical_json

CASCADE_SPEC_TAG = "cascade_spec_sha256"
"""Tag of a cascade version: the hash of what it chains (stages, alias, sampling defaults)."""
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
"""The checkout root when the package runs from one (in an installed package: site-packages, not a checkout)."""
DISTRIBUTION = "imagen-cluster"
GIT_COMMIT_ENV = "IMAGEN_GIT_COMMIT"
"""Environment variable naming the commit of the running code (wins over everything else)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class RegisterConfig:
    """Where and with what provenance a stage or cascade is registered."""

    experiment: str = "imagen-registry"
    """Experiment of the registration run when no training run is given (created if missing)."""
    artifact_location: str | None = None
    """Artifact root of that experiment if it has to be created (None: the tracking server's default)."""
    training_run_id: str | None = None
    """The stage's training run: the model is logged into it, its `val_loss` becomes the version's `train_val_loss`."""
    dataset_manifest: str | None = None
    """The training data's step manifest (manifest.json, local or a URL); its sha256 is recorded."""
    git_commit: str | None = None
    """Commit of the code that trained the stage; None: `current_git_commit()` ($IMAGEN_GIT_COMMIT, the installed
    package's record, or this checkout's HEAD with "-dirty" if modified)."""
    metrics: tuple[tuple[str, float], ...] = ()
    """Extra (name, value) metrics to record as `metric.<name>` tags."""
    device: str = "cpu"
    """Device the pyfunc model loads onto (mlflow.pyfunc.load_model(..., model_config={"device": ...}) overrides)."""

    def __post_init__(self) -> None:
        if self.dataset_manifest is not None and not storage.path(self.dataset_manifest).is_file():
            raise ValueError(f"RegisterConfig.dataset_manifest: no file at {self.dataset_manifest}")


def pip_requirements() -> list[str]:
    """What the pyfunc models import, pinned to what is installed here (given explicitly: no inference)."""
    pinned = ("mlflow", "transformers", "open-clip-torch", "safetensors", "sentencepiece", "imagen-cluster")
    floor = ("torch", "torchvision", "numpy", "pandas", "pillow")
    version = importlib.metadata.version
    return [f"{p}=={version(p)}" for p in pinned] + [f"{p}>={version(p).split('+')[0]}" for p in floor]


def current_git_commit() -> str:
    """The commit of the code running here, from the first that knows it (never raises):
    1. $IMAGEN_GIT_COMMIT (the Dockerfile sets it from its GIT_COMMIT build argument);
    2. the installed package: a "+g<sha>" local version (setuptools-scm style builds) or the commit pip recorded
       for a VCS install (`pip install git+https://...@<rev>`: direct_url.json);
    3. git, only when the package runs from a checkout (the directory above it holds .git and pyproject.toml):
       HEAD, "-dirty" when tracked files changed.
    Otherwise "unknown (...)" with the installed version and what to set."""
    if os.environ.get(GIT_COMMIT_ENV, "").strip():
        return os.environ[GIT_COMMIT_ENV].strip()
    try:
        from_package = _package_commit()
    except Exception:  # noqa: BLE001 - provenance must never fail a registration
        from_package = None
    if from_package:
        return from_package
    if not ((REPO_ROOT / ".git").exists() and (REPO_ROOT / "pyproject.toml").is_file()):
        return f"unknown ({_installed_version()} not run from a git checkout; set {GIT_COMMIT_ENV})"
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            why = head.stderr.strip().splitlines()[-1] if head.stderr.strip() else "git rev-parse failed"
            return f"unknown ({why}; set {GIT_COMMIT_ENV})"
        status = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown (git unavailable: {error}; set {GIT_COMMIT_ENV})"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def _installed_version() -> str:
    try:
        return f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}"
    except Exception:  # noqa: BLE001 - not installed or unreadable metadata: still no failure
        return f"{DISTRIBUTION} (version unknown)"


def _package_commit() -> str | None:
    """The commit the installed distribution records, if any (see current_git_commit)."""
    distribution = importlib.metadata.distribution(DISTRIBUTION)
    local = distribution.version.partition("+")[2]
    for part in local.split("."):
        if len(part) >= 8 and part[0] == "g" and all(c in "0123456789abcdef" for c in part[1:]):
            return part[1:] + ("-dirty" if "dirty" in local else "")
    direct_url = distribution.read_text("direct_url.json")
    if direct_url:
        commit = json.loads(direct_url).get("vcs_info", {}).get("commit_id")
        if commit:
            return str(commit)
    return None


def file_sha256(path: str | os.PathLike | storage.StoragePath) -> str:
    """sha256 of a local file or an object (a URL)."""
    where = storage.path(path)
    return hashlib.sha256(where.local.read_bytes() if where.is_local else where.read_bytes()).hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the stage config as canonical JSON (sorted keys): equal configs, equal hashes."""
    return hashlib.sha256(canonical_json(json.loads(json.dumps(config))).encode()).hexdigest()


@contextlib.contextmanager
def _quiet_log_model() -> Iterator[None]:
    """log_model warns when no input_example is given; the signature is explicit here, and an example would make
    MLflow load the model and sample at registration just to validate it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        yield


def _experiment_id(config: RegisterConfig) -> str:
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(config.experiment, artifact_location=config.artifact_location)


def _start_run(config: RegisterConfig, run_name: str) -> mlflow.ActiveRun:
    if config.training_run_id:
        # start_run(run_id=...) refuses a run of another experiment than the process's active one (set by any
        # earlier set_experiment in this process): make the training run's experiment the active one.
        mlflow.set_experiment(experiment_id=mlflow.get_run(config.training_run_id).info.experiment_id)
        return mlflow.start_run(run_id=config.training_run_id)
    return mlflow.start_run(experiment_id=_experiment_id(config), run_name=run_name)


def _training_metrics(config: RegisterConfig) -> dict[str, float]:
    """The training run's latest val_loss, if it logged one."""
    if not config.training_run_id:
        return {}
    metrics = mlflow.MlflowClient().get_run(config.training_run_id).data.metrics
    return {"train_val_loss": metrics["val_loss"]} if "val_loss" in metrics else {}


def _provenance_tags(
    checkpoint_dir: str | os.PathLike | storage.StoragePath, stage_config: dict[str, Any], config: RegisterConfig
) -> dict[str, str]:
    metrics = {**_training_metrics(config), **dict(config.metrics)}
    return {
        "stage": stage_config["name"],
        WEIGHTS_SHA_TAG: weights_sha256(checkpoint_dir),
        "config_hash": config_hash(stage_config),
        "dataset_manifest_hash": file_sha256(config.dataset_manifest) if config.dataset_manifest else "none given",
        "git_commit": config.git_commit or current_git_commit(),
        "training_run_id": config.training_run_id or "none given",
        **{METRIC_TAG_PREFIX + k: repr(float(v)) for k, v in metrics.items()},
    }


def registered_version(client: Any, model_name: str, tag: str, value: str) -> str | None:
    """The version of `model_name` tagged `tag=value`, if one exists: what makes registering idempotent."""
    if not client.search_registered_models(filter_string=f"name = '{model_name}'"):
        return None
    versions = client.search_model_versions(filter_string=f"name = '{model_name}' and tags.`{tag}` = '{value}'")
    return str(min(int(v.version) for v in versions)) if versions else None


def register_stage(checkpoint_dir: str | os.PathLike | storage.StoragePath, name: str,
                   config: RegisterConfig = RegisterConfig()) -> str:
    """Log and register a stage checkpoint as `<name>-<stage>`, aliased `challenger`; returns its version.

    `checkpoint_dir` is a local folder or an object-store URL (a trainer's export at s3://.../export, as
    `TrainResult.export_dir` gives it): from a URL only config.json is read until the version is known to be
    new, then the stage's files (not train.safetensors) are downloaded to a temporary folder and logged from there.

    Idempotent: weights already registered under this name (the same `weights_sha256`) return that version and
    add none, so a pipeline killed mid-registration and rerun does not duplicate versions. The version is created
    with its provenance tags in one call, so no version exists without its weights tag.
    """
    checkpoint_dir = storage.path(checkpoint_dir)
    stage_config = read_manifest(checkpoint_dir)["config"]
    stage = StageConfig.from_dict(stage_config)  # refuse a checkpoint that is not a stage before logging anything
    model_name = stage_model_name(name, stage.name)
    tags = _provenance_tags(checkpoint_dir, stage_config, config)
    client = mlflow.MlflowClient()
    existing = registered_version(client, model_name, WEIGHTS_SHA_TAG, tags[WEIGHTS_SHA_TAG])
    if existing is not None:
        return existing
    with tempfile.TemporaryDirectory(prefix="register_") as tmp, local_stage_files(checkpoint_dir) as source:
        staged = copy_stage_files(source, pathlib.Path(tmp) / CHECKPOINT_ARTIFACT)
        with _start_run(config, f"register-{model_name}"), _quiet_log_model():
            info = mlflow.pyfunc.log_model(
                name=stage.name,
                python_model=str(STAGE_MODEL_CODE),
                artifacts={CHECKPOINT_ARTIFACT: str(staged)},
                model_config={WEIGHTS_SHA_TAG: tags[WEIGHTS_SHA_TAG], "device": config.device},
                pip_requirements=pip_requirements(),
                signature=prompt_signature(lowres_input=stage.is_super_resolution),
            )
            version = _create_version(client, model_name, info, tags)
    client.set_registered_model_tag(model_name, KIND_TAG, "stage")
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def _create_version(client: Any, model_name: str, info: Any, tags: dict[str, str]) -> str:
    """A new version of `model_name` for a logged model, created with its tags."""
    if not client.search_registered_models(filter_string=f"name = '{model_name}'"):
        client.create_registered_model(model_name)
    run_id = mlflow.active_run().info.run_id
    version = client.create_model_version(model_name, info.model_uri, run_id=run_id, tags=tags,
                                          model_id=info.model_id)
    return str(version.version)


@dataclasses.dataclass(kw_only=True, frozen=True)
class CascadeSpec:
    """Which stage models a cascade chains and by which alias, plus its sampling defaults."""

    stages: tuple[str, ...] = ("base", "sr1")
    """Stage names, base first; each is the registered model `<name>-<stage>`."""
    alias: str = CHAMPION
    """Alias every stage is resolved by when the cascade loads."""
    guidance: float | None = None
    """Default guidance for every stage (None: each stage's own)."""
    steps: int | None = None
    """Default steps per stage (None: each stage's own)."""
    sampler: str | None = None
    """Default sampler kind (None: each stage's own)."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("CascadeSpec.stages needs at least the base stage")

    def model_config(self, name: str, device: str) -> dict[str, Any]:
        options = {"guidance": self.guidance, "steps": self.steps, "sampler": self.sampler}
        defaults = {k: v for k, v in options.items() if v is not None}
        stages = [{"model": stage_model_name(name, s), "alias": self.alias} for s in self.stages]
        return {"stages": stages, "defaults": defaults, "device": device}


def register_cascade(name: str, spec: CascadeSpec = CascadeSpec(), config: RegisterConfig = RegisterConfig()) -> str:
    """Register the cascade `<name>` (stage names + aliases, no weights) and make that version its champion.

    Each stage must resolve by the alias now; the previous cascade champion is recorded for `rollback`.
    Idempotent: a cascade of the same spec is registered once (the version tagged with the spec's hash).
    """
    client = mlflow.MlflowClient()
    model_config = spec.model_config(name, config.device)
    for entry in model_config["stages"]:
        resolve(ModelRef(entry["model"], alias=entry["alias"]), client)  # fails clearly if a stage has no such alias
    spec_hash = config_hash(model_config)
    version = registered_version(client, name, CASCADE_SPEC_TAG, spec_hash)
    if version is None:
        previous = client.get_registered_model(name).aliases.get(CHAMPION) if client.search_registered_models(
            filter_string=f"name = '{name}'") else None
        tags = {
            "stages": ",".join(spec.stages),
            "stage_alias": spec.alias,
            "git_commit": config.git_commit or current_git_commit(),
            PREVIOUS_CHAMPION_TAG: previous or "none",
            CASCADE_SPEC_TAG: spec_hash,
        }
        with _start_run(config, f"register-{name}"), _quiet_log_model():
            info = mlflow.pyfunc.log_model(
                name="cascade",
                python_model=str(CASCADE_MODEL_CODE),
                model_config=model_config,
                pip_requirements=pip_requirements(),
                signature=prompt_signature(),
            )
            version = _create_version(client, name, info, tags)
        client.set_registered_model_tag(name, KIND_TAG, "cascade")
    client.set_registered_model_alias(name, CHAMPION, version)
    return version
