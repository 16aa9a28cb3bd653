"""A cascade stage from an imagen_core checkpoint directory (model.safetensors + config.json, plus the text encoder's
files when it carries them: text_encoder/), verified by sha256.

A checkpoint directory may be local or an object-store URL (a trainer's export at s3://.../export): `read_manifest`
reads its config.json where it is, `local_stage_files` downloads the files a stage needs (never train.safetensors)
into a temporary folder for imagen_core, which reads local files only.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from imagen_core.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    carried_files,
    carry_text_encoder,
    load_checkpoint,
    resolve_text_encoder,
    save_checkpoint,
)
from imagen_core import checkpoint as _checkpoint
from imagen_core.stage import DiffusionStage, StageConfig
from pipelines import storage

STAGE_FILES = (MODEL_FILE, CONFIG_FILE)
"""What a registered stage carries: the sampling (EMA) weights and the manifest, plus the encoder files the
manifest records (`carried_files`). train.safetensors stays behind."""


def read_manifest(directory: str | os.PathLike | storage.StoragePath) -> dict[str, Any]:
    """imagen_core's checked config.json of a checkpoint directory, local or at a URL (only config.json is read)."""
    where = storage.path(directory)
    if where.is_local:
        return _checkpoint.read_manifest(where.local)
    with tempfile.TemporaryDirectory(prefix="manifest_") as tmp:
        source = where / CONFIG_FILE
        if source.is_file():
            (pathlib.Path(tmp) / CONFIG_FILE).write_bytes(source.read_bytes())
        try:
            return _checkpoint.read_manifest(tmp)
        except CheckpointError as error:
            raise CheckpointError(str(error).replace(tmp, str(where))) from None


@contextlib.contextmanager
def local_stage_files(directory: str | os.PathLike | storage.StoragePath) -> Iterator[pathlib.Path]:
    """A checkpoint directory as a local folder for the block: a local one as it is; from an object store its
    config.json, model.safetensors and carried encoder files, downloaded (train.safetensors stays behind)."""
    where = storage.path(directory)
    if where.is_local:
        yield where.local
        return
    manifest = read_manifest(where)
    with tempfile.TemporaryDirectory(prefix="stage_files_") as tmp:
        local = pathlib.Path(tmp)
        for name in (*STAGE_FILES, *sorted(manifest.get(_checkpoint.ENCODER_FILES_KEY, {}))):
            source = where / name
            if source.is_file():  # a missing file is reported by load_checkpoint, naming it
                storage.copy_tree(source, storage.path(local / name))
        yield local


def weights_sha256(directory: str | os.PathLike | storage.StoragePath) -> str:
    """sha256 of model.safetensors as its checkpoint manifest records it."""
    record = read_manifest(directory)["files"].get(MODEL_FILE)
    if record is None:
        raise CheckpointError(f"{storage.path(directory) / CONFIG_FILE} records no {MODEL_FILE}")
    return record["sha256"]


def load_stage(
    directory: str | os.PathLike | storage.StoragePath, *, device: torch.device | str = "cpu",
    expected_sha256: str | None = None,
) -> DiffusionStage:
    """Rebuild a DiffusionStage from its checkpoint alone (a local folder or a URL, downloaded first);
    CheckpointError when a file is missing or altered.

    `expected_sha256` (the registry's record of the weights) must match the manifest's: that catches a manifest
    rewritten together with the weights, which the manifest's own checksum cannot.
    """
    if not storage.path(directory).is_local:
        with local_stage_files(directory) as local:
            return load_stage(local, device=device, expected_sha256=expected_sha256)
    if expected_sha256 is not None and weights_sha256(directory) != expected_sha256:
        raise CheckpointError(
            f"{pathlib.Path(directory) / CONFIG_FILE} records weights sha256 {weights_sha256(directory)} but the "
            f"registry registered {expected_sha256}: the checkpoint was replaced after registration"
        )
    state, config = load_checkpoint(directory, device=device)
    config = resolve_text_encoder(directory, config)  # carried encoder files -> a path on this machine
    try:
        stage_config = StageConfig.from_dict(config)
    except (KeyError, TypeError, ValueError) as error:
        where = pathlib.Path(directory) / CONFIG_FILE
        raise CheckpointError(f"{where} does not hold a StageConfig: {error}") from error
    stage = DiffusionStage(stage_config).to(device)
    # Trainers save either the whole stage ("unet." keys) or the U-Net alone.
    target = stage if all(key.startswith("unet.") for key in state) else stage.unet
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{pathlib.Path(directory) / MODEL_FILE} does not fit the stage its config describes: {error}"
        ) from error
    return stage.eval()


def save_stage(stage: DiffusionStage, directory: str | os.PathLike, *, carry_encoder: bool = True) -> pathlib.Path:
    """Write a stage as the trainer exports one: model.safetensors (whole-stage state) + config.json, and a text
    encoder named by a local path copied in (`carry_text_encoder`) unless `carry_encoder` is False."""
    save_checkpoint(directory, stage.state_dict(), stage.config.to_dict())
    if carry_encoder:
        carry_text_encoder(directory)
    return pathlib.Path(directory)


def copy_stage_files(source: str | os.PathLike, destination: str | os.PathLike) -> pathlib.Path:
    """Copy only the files a registered stage needs, after verifying them; a text encoder the source names by a
    local path is carried into the copy (the registered model must load on machines without that path)."""
    load_checkpoint(source)  # verify before anything is copied into the registry
    source, destination = pathlib.Path(source), pathlib.Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for name in (*STAGE_FILES, *carried_files(source)):
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, destination / name)
    carry_text_encoder(destination)
    return destination
