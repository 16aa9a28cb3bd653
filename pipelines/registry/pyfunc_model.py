"""MLflow pyfunc wrappers: one per stage (`<name>-<stage>`) and one for the cascade (`<name>`).

They are logged as "models from code" (the files in model_code/ name these classes; MLflow copies that two-line
file and runs it at load), so nothing is cloudpickled into the registry and nothing is unpickled from it.
- StageModel: its checkpoint directory is a pyfunc artifact; load_context verifies it (sha256) and rebuilds it.
- CascadeModel: holds no weights, only stage model names and aliases; load_context resolves each alias in the
  registry at that moment, so promoting one stage changes the cascade without re-registering anything.

predict takes a DataFrame with a `prompt` column and optional `guidance`, `steps`, `sampler`, `seed` (and, for a
super-resolution stage, `image`: PNG bytes of the low-resolution input); it returns a DataFrame with `image`
(PNG bytes), `width`, `height`, `seed`. Each row is sampled on its own with its seed (default 0), so a row's image
does not depend on the other rows.
"""
from __future__ import annotations

import math
import pathlib
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from imagen_core.cascade import Cascade
from imagen_core.checkpoint import CheckpointError
from imagen_core.text_encoder import build_text_encoder
from pipelines.registry.checkpoints import load_stage
from pipelines.registry.images import decode_png, png_bytes
from pipelines.registry.loading import CHECKPOINT_ARTIFACT, LoadedCascade, stages_from_cascade_config
from pipelines.registry.sampling import SampleConfig, generate, upscale_tensor

MODEL_CODE_DIR = pathlib.Path(__file__).parent / "model_code"
STAGE_MODEL_CODE = MODEL_CODE_DIR / "stage_model.py"
CASCADE_MODEL_CODE = MODEL_CODE_DIR / "cascade_model.py"

OPTION_COLUMNS = {"guidance": "double", "steps": "long", "sampler": "string", "seed": "long"}
"""Optional per-row sampling options and their MLflow column types."""


def prompt_signature(*, lowres_input: bool = False) -> ModelSignature:
    """Inputs: prompt (+ options, + the low-res PNG for an SR stage); outputs: PNG bytes and its size."""
    inputs = [ColSpec("string", "prompt")] + [ColSpec(t, name, required=False) for name, t in OPTION_COLUMNS.items()]
    if lowres_input:
        inputs.append(ColSpec("binary", "image"))
    outputs = [ColSpec("binary", "image"), ColSpec("long", "width"), ColSpec("long", "height"), ColSpec("long", "seed")]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def _option(row: pd.Series, name: str) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def row_config(row: pd.Series, device: str) -> SampleConfig:
    """A row's options as a SampleConfig (missing or NaN = the model's default)."""
    steps, seed, guidance = _option(row, "steps"), _option(row, "seed"), _option(row, "guidance")
    return SampleConfig(
        sampler=_option(row, "sampler"),
        steps=None if steps is None else int(steps),
        guidance=None if guidance is None else float(guidance),
        seed=0 if seed is None else int(seed),
        device=device,
    )


def _check_input(model_input: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(model_input, pd.DataFrame) or "prompt" not in model_input.columns:
        raise ValueError("predict takes a DataFrame with a 'prompt' column (optional: guidance, steps, sampler, seed)")
    return model_input


def _output_row(image: Any, config: SampleConfig) -> dict[str, Any]:
    return {"image": png_bytes(image), "width": image.shape[-1], "height": image.shape[-2], "seed": config.seed}


class StageModel(mlflow.pyfunc.PythonModel):
    """One stage: a base stage maps prompts to images; a super-resolution stage also takes `image` to upsample."""

    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        self.device = config.get("device", "cpu")
        try:
            stage = load_stage(
                context.artifacts[CHECKPOINT_ARTIFACT], device=self.device, expected_sha256=config["weights_sha256"]
            )
        except CheckpointError as error:
            raise CheckpointError(f"stage model fails verification: {error}") from error
        self.stage = stage
        self.encoder = build_text_encoder(stage.config.text_encoder, self.device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        rows = []
        for _, row in _check_input(model_input).iterrows():
            config = row_config(row, self.device)
            if self.stage.config.is_super_resolution:
                lowres = decode_png(row["image"]).to(self.device)
                image = upscale_tensor(self.stage, self.encoder, lowres, row["prompt"], config)[0]
            else:
                cascade = Cascade([self.stage], {self.stage.config.text_encoder: self.encoder})
                image = generate(cascade, [row["prompt"]], config)[0]
            rows.append(_output_row(image, config))
        return pd.DataFrame(rows)


class CascadeModel(mlflow.pyfunc.PythonModel):
    """The cascade: stage model names and aliases in its model_config, resolved in the registry at load."""

    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        self.device = config.get("device", "cpu")
        stages, sources = stages_from_cascade_config(config, device=self.device)
        self.loaded = LoadedCascade(Cascade.from_stages(stages, self.device), sources, config.get("defaults", {}))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        rows = []
        for _, row in _check_input(model_input).iterrows():
            config = row_config(row, self.device).with_defaults(self.loaded.defaults)
            rows.append(_output_row(generate(self.loaded.cascade, [row["prompt"]], config)[0], config))
        return pd.DataFrame(rows)
