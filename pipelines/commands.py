"""The typed config of each single-step `imagen` command: a file (`--config`), then flags, then `--set`.

Each command's config nests the step's own config under the same table name the pipeline config uses
(`[curate]`, `[embed]`, `[evaluate]`, ...), beside the paths and the cluster the command needs. The CLI's
flags are shorthands for fields of these (jobs/cli.py names the field behind each flag). Resource fields (actor
pools, devices, batch sizes) never enter a step's key: changing them reruns nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from pipelines.clip_model import ClipConfig
from pipelines.curate import CurateConfig
from pipelines.embed import EmbedConfig
from pipelines.ingest import IngestConfig
from pipelines.ray_env import RayConfig
from pipelines.registry.evaluate import EvalConfig
from pipelines.registry.register import CascadeSpec, RegisterConfig
from pipelines.registry.sampling import EditConfig, SampleConfig
from pipelines.step import ActorPoolConfig


@dataclasses.dataclass(kw_only=True, frozen=True)
class IngestCommand:
    ingest: IngestConfig
    ray: RayConfig = RayConfig()


@dataclasses.dataclass(kw_only=True, frozen=True)
class CurateCommand:
    ingest_dir: str
    """A finished ingest step's directory."""
    output_dir: str
    """The curation's directory (scores/, decisions/, shards/, report/)."""
    curate: CurateConfig
    pool: ActorPoolConfig = ActorPoolConfig()
    """The CLIP scoring actors (size, CPUs and GPUs each, fractions allowed)."""
    ray: RayConfig = RayConfig()


@dataclasses.dataclass(kw_only=True, frozen=True)
class EmbedCommand:
    curate_dir: str
    """A finished curation's directory."""
    output_dir: str
    """The embed step's directory (shards/)."""
    embed: EmbedConfig
    ray: RayConfig = RayConfig()


@dataclasses.dataclass(kw_only=True, frozen=True)
class ReportCommand:
    curate_dir: str
    ingest_dir: str | None = None
    """Where the images are (default: the one the curation read)."""
    examples: int = 16
    """Rows in each example grid."""
    tracking_uri: str | None = None
    experiment: str = "curation"


@dataclasses.dataclass(kw_only=True, frozen=True)
class SearchCommand:
    data_dir: str
    """A curate (or embed) directory."""
    query: str
    clip: ClipConfig
    """The CLIP the curation scored with."""
    k: int = 20
    out_png: str | None = None
    """Contact sheet (default: <data_dir>/search/<query>.png)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class RegistryCommand:
    """What every registry command needs: the registered name and the tracking server."""

    name: str = "imagen"
    """Registered model name; stages are `<name>-<stage>`."""
    tracking_uri: str | None = None
    """MLflow tracking URI (None: MLFLOW_TRACKING_URI)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class RegisterCommand(RegistryCommand):
    checkpoint: str
    """An exported stage checkpoint directory (train/<stage>/export)."""
    register: RegisterConfig = RegisterConfig()


@dataclasses.dataclass(kw_only=True, frozen=True)
class EvaluateCommand(RegistryCommand):
    stage: str
    version: str = "challenger"
    """An alias or a version number."""
    evaluate: EvalConfig = EvalConfig()


@dataclasses.dataclass(kw_only=True, frozen=True)
class PromoteCommand(RegistryCommand):
    stage: str
    metric: str = "eval_loss"
    direction: Literal["min", "max"] | None = None
    """For a metric not known by name: which way is better."""
    min_abs: float = 0.0
    min_rel: float = 0.0
    force: bool = False
    reason: str | None = None


@dataclasses.dataclass(kw_only=True, frozen=True)
class RollbackCommand(RegistryCommand):
    stage: str | None = None
    """A stage; None: the cascade model."""
    reason: str | None = None


@dataclasses.dataclass(kw_only=True, frozen=True)
class RegisterCascadeCommand(RegistryCommand):
    cascade: CascadeSpec = CascadeSpec()
    register: RegisterConfig = RegisterConfig()


@dataclasses.dataclass(kw_only=True, frozen=True)
class SamplingCommand:
    """The sampling commands: where the model comes from, the sampler, the output check."""

    model: str | None = None
    """A registry URI (models:/NAME@ALIAS, models:/NAME-STAGE/3)."""
    checkpoint: tuple[str, ...] = ()
    """Local exported stage checkpoint directories (instead of model)."""
    output: str
    sample: SampleConfig = SampleConfig()
    safety_clip: ClipConfig | None = None
    """The CLIP that screens outputs for unsafe content (None: no check, said aloud)."""
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        if bool(self.model) == bool(self.checkpoint):
            raise ValueError("give either model (--model models:/NAME@ALIAS) or checkpoint (--checkpoint DIR ...)")


@dataclasses.dataclass(kw_only=True, frozen=True)
class SampleCommand(SamplingCommand):
    prompts: tuple[str, ...]
    output: str = "sample.png"


@dataclasses.dataclass(kw_only=True, frozen=True)
class UpscaleCommand(SamplingCommand):
    image: str
    prompt: str = ""
    output: str = "upscaled.png"


@dataclasses.dataclass(kw_only=True, frozen=True)
class EditCommand(SamplingCommand):
    image: str
    mask: str
    prompt: str
    output: str = "edited.png"
    edit: EditConfig = EditConfig()
