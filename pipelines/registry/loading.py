"""Load stages and cascades from the registry (by alias or version) or from local checkpoint directories.

Nothing here runs code or unpickles anything from the registry: a model version's files are downloaded, its
MLmodel (YAML) is read for the artifact layout and the cascade's stage list, and the weights go through
`load_checkpoint` (sha256-verified safetensors), checked once more against the sha256 the registry recorded.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from imagen_core.cascade import Cascade
from imagen_core.checkpoint import CheckpointError
from imagen_core.stage import DiffusionStage
from pipelines.registry.checkpoints import load_stage

KIND_TAG = "imagen.kind"
"""Registered-model tag: "stage" for `<name>-<stage>` models, "cascade" for `<name>`."""
WEIGHTS_SHA_TAG = "weights_sha256"
"""Model-version tag: sha256 of the registered model.safetensors."""
CHECKPOINT_ARTIFACT = "checkpoint"
"""Name of the pyfunc artifact holding a stage's checkpoint directory."""

def stage_model_name(name: str, stage: str) -> str:
    """Registered model name of one stage: `<name>-<stage>` (the cascade itself is `<name>`)."""
    return f"{name}-{stage}"


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))/?$")


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A registered model version, named by alias or by number."""

    name: str
    """Registered model name: `<name>-<stage>` or the cascade's `<name>`."""
    alias: str | None = None
    """e.g. "champion" or "challenger"; exactly one of alias and version."""
    version: str | None = None
    """Version number as a string."""

    def __post_init__(self) -> None:
        if (self.alias is None) == (self.version is None):
            raise ValueError(f"ModelRef {self.name!r} needs exactly one of alias and version")

    @classmethod
    def parse(cls, uri: str) -> "ModelRef":
        match = _MODEL_URI.match(uri)
        if match is None:
            raise ValueError(f"{uri!r} is not a registry URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
        return cls(match["name"], alias=match["alias"], version=match["version"])

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def _client(tracking_uri: str | None = None):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def resolve(ref: ModelRef, client: Any = None) -> Any:
    """The ModelVersion an alias points to now (or the numbered one), with a clear error when there is none."""
    from mlflow.exceptions import MlflowException

    client = client or _client()
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as error:
        raise LookupError(
            f"{ref.uri} does not resolve: {error.message}. List what exists with `list_stages` "
            "(registered models, versions and aliases)."
        ) from None


def download_version(version: Any, destination: str | os.PathLike, client: Any = None) -> pathlib.Path:
    """All files of a model version (MLmodel, code shim, artifacts) into `destination`."""
    import mlflow

    client = client or _client()
    # Not through a models:/ URI: MLflow resolves those in the process-wide registry (mlflow 3.17 ignores the
    # registry_uri argument there), so a process that never set one, as a rerun of the demo, would look in
    # ./mlruns. The version's own artifact location comes from this client's registry.
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(version.name, version.version),
        dst_path=str(destination),
        tracking_uri=client.tracking_uri,
    )
    return pathlib.Path(path)


def _pyfunc_conf(model_dir: pathlib.Path) -> dict[str, Any]:
    """The python_function flavor of a downloaded model's MLmodel (YAML: safe to read)."""
    from mlflow.models import Model

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise CheckpointError(f"{mlmodel} is missing: the model version's files are incomplete")
    return Model.load(str(mlmodel)).flavors.get("python_function", {})


def checkpoint_dir(model_dir: pathlib.Path) -> pathlib.Path:
    """Where the stage checkpoint lies inside a downloaded stage model (from its MLmodel's artifact table)."""
    artifacts = _pyfunc_conf(model_dir).get("artifacts", {})
    if CHECKPOINT_ARTIFACT not in artifacts:
        raise CheckpointError(f"{model_dir / 'MLmodel'} lists no {CHECKPOINT_ARTIFACT!r} artifact: not a stage model")
    return model_dir / artifacts[CHECKPOINT_ARTIFACT]["path"]


def cascade_model_config(model_dir: pathlib.Path) -> dict[str, Any]:
    """The stage list and defaults a cascade model version stores (its pyfunc model_config)."""
    from mlflow.models.model import MODEL_CONFIG

    config = _pyfunc_conf(model_dir).get(MODEL_CONFIG) or {}
    if "stages" not in config:
        raise ValueError(f"{model_dir / 'MLmodel'} holds no stage list: not a cascade model")
    return config


def load_registered_stage(
    ref: ModelRef, *, device: torch.device | str = "cpu", client: Any = None
) -> tuple[DiffusionStage, Any]:
    """(stage, ModelVersion) for a registered stage; CheckpointError when its files were altered or are missing."""
    client = client or _client()
    version = resolve(ref, client)
    expected = version.tags.get(WEIGHTS_SHA_TAG)
    if expected is None:
        raise CheckpointError(
            f"{ref.uri} (version {version.version}) has no {WEIGHTS_SHA_TAG} tag: not registered by register_stage"
        )
    with tempfile.TemporaryDirectory(prefix="stage_") as tmp:
        model_dir = download_version(version, tmp, client)
        try:
            stage = load_stage(checkpoint_dir(model_dir), device=device, expected_sha256=expected)
        except CheckpointError as error:
            raise CheckpointError(f"{ref.uri} (version {version.version}) fails verification: {error}") from error
    return stage, version


@dataclasses.dataclass
class LoadedCascade:
    """A cascade and where each of its stages came from."""

    cascade: Cascade
    sources: list[str]
    """Per stage: "models:/demo-base/3 (@champion)" or the local checkpoint directory."""
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Sampling defaults stored with a registered cascade (guidance, steps, sampler)."""

    @property
    def image_size(self) -> int:
        return self.cascade.stages[-1].config.image_size


def stages_from_cascade_config(
    config: dict[str, Any], *, device: torch.device | str = "cpu", client: Any = None
) -> tuple[list[DiffusionStage], list[str]]:
    """Resolve each stage of a cascade config by its alias now: promoting a stage changes the cascade."""
    stages, sources = [], []
    for entry in config["stages"]:
        ref = ModelRef(entry["model"], alias=entry["alias"])
        stage, version = load_registered_stage(ref, device=device, client=client)
        stages.append(stage)
        sources.append(f"models:/{version.name}/{version.version} (@{ref.alias})")
    return stages, sources


def load_stages(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    device: torch.device | str = "cpu",
    tracking_uri: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[DiffusionStage], list[str], dict[str, Any]]:
    """(stages, where each came from, sampling defaults) from a registry URI or local checkpoint directories.

    - "models:/<name>@<alias>" or "models:/<name>/<version>" of a cascade model: its stages, each by its alias now;
    - the same for a single stage model (`<name>-base@champion`): that stage;
    - one or more checkpoint directories (local, or object-store URLs such as a trainer's s3://.../export), base
      first.

    `dtype` is the weights' dtype (checkpoints hold fp32; bf16 halves memory and time on GPU). The samplers stay
    fp32 either way: each U-Net casts its inputs to its weights' dtype.
    """
    stages, sources, defaults = _load_stages(source, device=device, tracking_uri=tracking_uri)
    return [stage.to(dtype) for stage in stages], sources, defaults


def _load_stages(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    device: torch.device | str,
    tracking_uri: str | None,
) -> tuple[list[DiffusionStage], list[str], dict[str, Any]]:
    if isinstance(source, (str, os.PathLike)) and str(source).startswith("models:/"):
        client = _client(tracking_uri)
        ref = ModelRef.parse(str(source))
        version = resolve(ref, client)
        if client.get_registered_model(ref.name).tags.get(KIND_TAG) == "cascade":
            with tempfile.TemporaryDirectory(prefix="cascade_") as tmp:
                config = cascade_model_config(download_version(version, tmp, client))
            stages, sources = stages_from_cascade_config(config, device=device, client=client)
            return stages, sources, config.get("defaults", {})
        stage, version = load_registered_stage(ref, device=device, client=client)
        suffix = f" (@{ref.alias})" if ref.alias else ""
        return [stage], [f"models:/{ref.name}/{version.version}{suffix}"], {}
    directories = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not directories:
        raise ValueError("give a models:/ URI or at least one checkpoint directory")
    # A directory may be an object-store URL (an export at s3://...): load_stage downloads its stage files first.
    sources = [str(d) if "://" in str(d) else str(pathlib.Path(d)) for d in directories]
    return [load_stage(d, device=device) for d in directories], sources, {}


def load_cascade(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    device: torch.device | str = "cpu",
    tracking_uri: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedCascade:
    """A cascade (base first) from a registry URI or local checkpoint directories (sources and `dtype` as in
    `load_stages`)."""
    stages, sources, defaults = load_stages(source, device=device, tracking_uri=tracking_uri, dtype=dtype)
    return LoadedCascade(Cascade.from_stages(stages, device), sources, defaults)
