"""Checks of a whole pipeline config that take seconds and run before any step, each naming the field to fix.

Types and unknown keys are checked when the config is built (imagen_core/config_io.py); this adds what needs
the outside world or several tables at once: the run directory (or bucket) takes writes, the URL list exists and
has its columns, the tracking server answers, each stage's DeepSpeed settings resolve, and each stage's text
encoder is the one the embed step stores, with the width its U-Net expects.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

from imagen_core.config_io import ConfigError
from imagen_core.text_encoder import TextEncoderConfig
from pipelines.pipeline_config import PipelineConfig


def text_encoder_width(config: TextEncoderConfig) -> int | None:
    """The per-token width D of a text encoder, read from its config files (no weights loaded); None when only
    the weights would tell (a hub name that is not cached here: the embed step checks it when it loads)."""
    from imagen_core.text_encoder import _located

    name = _located(config.name)  # "imagen-asset:" names resolved inside the installed package
    if config.kind == "open_clip":
        from pipelines.clip_model import CONFIG_FILE, LOCAL_DIR_PREFIX

        if name.startswith(LOCAL_DIR_PREFIX):
            path = pathlib.Path(name[len(LOCAL_DIR_PREFIX):]) / CONFIG_FILE
            return json.loads(path.read_text())["model_cfg"]["text_cfg"]["width"] if path.is_file() else None
        import open_clip

        model_cfg = open_clip.get_model_config(name)
        return model_cfg["text_cfg"]["width"] if model_cfg else None
    path = pathlib.Path(name) / "config.json"
    if path.is_file():
        return int(json.loads(path.read_text())["d_model"])
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(name, local_files_only=True).d_model)
    except Exception:  # noqa: BLE001 - not cached here; the embed step loads it and checks for real
        return None


def check_stages(config: PipelineConfig) -> None:
    """Each stage's DeepSpeed settings resolve and its text conditioning matches what the embed step stores."""
    from pipelines.train.dsconfig import resolve_deepspeed_config

    width = text_encoder_width(config.embed.text_encoder)
    for name, train in config.train.items():
        where = f"train.{name}"
        try:
            resolve_deepspeed_config(train)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"{where}.scaling: {error}") from None
        if train.stage.text_encoder != config.embed.text_encoder:
            raise ConfigError(
                f"{where}.stage.text_encoder is {train.stage.text_encoder} but embed.text_encoder is "
                f"{config.embed.text_encoder}: a stage must be conditioned on the embeddings the embed step stores "
                "(leave the stage's text_encoder out to use the embed step's)")
        expected = train.stage.unet.text_embed_dim
        if width is not None and width != expected:
            raise ConfigError(
                f"{where}.stage.unet.text_embed_dim is {expected} but embed.text_encoder "
                f"({config.embed.text_encoder.name}) gives {width}-wide token embeddings; set "
                f"{where}.stage.unet.text_embed_dim = {width} or embed with another encoder")


def preflight(config: PipelineConfig) -> dict[str, Any]:
    """Everything that can be checked before the first step; raises with the field to fix."""
    from pipelines.clip_model import check_clip_source
    from pipelines.pipeline_config import run_dir_tracking_uri
    from pipelines.storage import check_writable
    from pipelines.tracking import check_tracking
    from pipelines.url_lists import validate_url_list

    check_stages(config)
    files = validate_url_list(config.ingest.url_list)
    check_writable(config.root, "run_dir")  # a missing bucket, refused credentials, a read-only prefix
    tracking = config.mlflow_uri
    # The default database lives in run_dir, which the run creates after these checks: check_writable covers it.
    if not (config.root.is_local and tracking == run_dir_tracking_uri(config.root) and not config.root.local.exists()):
        tracking = check_tracking(tracking).uri
    check_clip_source(config.curate.score.clip)  # missing CLIP weights named now, not after the download
    if "clip_score" in config.evaluate.metrics and config.evaluate.clip is not None:
        check_clip_source(config.evaluate.clip)
    return {"url_list_files": len(files), "tracking": tracking}
