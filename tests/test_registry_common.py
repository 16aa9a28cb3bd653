"""Shared helpers and fixtures of the registry tests (no tests here): tiny real stages, held-out data, a registry.

Stages are the tiny recipes shrunk to 8 px (base) and 8 -> 16 px (SR), random-init or briefly trained with a
plain torch loop, saved as imagen_core checkpoints: the objects the trainer exports, not mocks.
"""
from __future__ import annotations

import dataclasses
import pathlib
import random

import mlflow
import pytest
import torch

from imagen_core.diffusion.samplers import SamplerConfig
from imagen_core.recipes import stage_tiny_base, stage_tiny_sr
from imagen_core.stage import DiffusionStage, StageConfig
from imagen_core.text_encoder import build_text_encoder
from pipelines.demo.corpus import random_scene, render
from pipelines.registry.checkpoints import save_stage
from pipelines.registry.images import from_pil

FAST_SAMPLER = SamplerConfig(kind="ddim", steps=3)


def base_config() -> StageConfig:
    cfg = stage_tiny_base()
    return dataclasses.replace(
        cfg, unet=dataclasses.replace(cfg.unet, image_size=8), sampler=FAST_SAMPLER, guidance_scale=2.0
    )


def sr_config() -> StageConfig:
    cfg = stage_tiny_sr()
    return dataclasses.replace(
        cfg, unet=dataclasses.replace(cfg.unet, image_size=16), lowres_size=8, sampler=FAST_SAMPLER, guidance_scale=2.0
    )


def make_stage(config: StageConfig, seed: int) -> DiffusionStage:
    torch.manual_seed(seed)
    return DiffusionStage(config).eval()


def demo_pairs(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Demo-corpus scenes (pipelines/demo/corpus.py) rendered at `size`: images in [-1, 1] and captions."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return torch.cat([from_pil(render(s, 16), size) for s in scenes]), [s.caption() for s in scenes]


def write_heldout(directory: pathlib.Path, n: int = 8, seed: int = 99) -> pathlib.Path:
    """img2dataset-style held-out folder: 000.png + 000.txt, ..."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = random_scene(rng)
        render(scene, 16).save(directory / f"{i:03d}.png")
        (directory / f"{i:03d}.txt").write_text(scene.caption())
    return directory


def train_briefly(stage: DiffusionStage, steps: int = 60, seed: int = 0) -> DiffusionStage:
    """A plain torch loop on demo scenes: enough to pull the loss well below a random init's."""
    torch.manual_seed(seed)
    images, captions = demo_pairs(32, stage.config.image_size, seed)
    embeds, mask = build_text_encoder(stage.config.text_encoder).encode(captions)
    optimizer = torch.optim.Adam(stage.parameters(), lr=3e-3)
    stage.train()
    for _ in range(steps):
        loss = stage(images, embeds, mask).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return stage.eval()


@pytest.fixture(scope="session")
def stage_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Checkpoint dirs: base (random init), base_trained, base_other (another random init), sr (trained briefly).

    The U-Net's output layer starts at zero, so random inits of one config predict the same (eps = 0) and have
    the same loss; training is what makes outputs depend on the prompt and the low-res input."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stages")
    return {
        "base": save_stage(make_stage(base_config(), 0), root / "base"),
        "base_trained": save_stage(train_briefly(make_stage(base_config(), 0)), root / "base_trained"),
        "base_other": save_stage(make_stage(base_config(), 7), root / "base_other"),
        "sr": save_stage(train_briefly(make_stage(sr_config(), 1), steps=30), root / "sr"),
    }


@pytest.fixture(scope="session")
def heldout_dir(tmp_path_factory) -> pathlib.Path:
    return write_heldout(tmp_path_factory.mktemp("heldout"))


@pytest.fixture(scope="session")
def sqlite_registry(tmp_path_factory) -> str:
    """A local sqlite tracking/registry database with an experiment whose artifacts live under the tmp dir."""
    from pipelines.tracking import configure_tracking

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    configure_tracking(uri)
    mlflow.create_experiment("registry-tests", artifact_location=(root / "artifacts").as_uri())
    yield uri
    mlflow.set_tracking_uri(None)


def use_registry(uri: str) -> str:
    """Point MLflow at `uri` (another test may have pointed it elsewhere); the registry follows the tracking URI."""
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture()
def registry(sqlite_registry) -> str:
    """The session's sqlite registry, made current."""
    return use_registry(sqlite_registry)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(ClipConfig, images, captions): the tiny open_clip fitted in-process on 16 demo scenes (memorises them)."""
    from pipelines.clip_model import ClipConfig, TinyClipFit, fit_tiny_clip

    rng = random.Random(5)
    scenes = [random_scene(rng) for _ in range(16)]
    images, captions = [render(s, 64) for s in scenes], [s.caption() for s in scenes]
    checkpoint = fit_tiny_clip(images, captions, tmp_path_factory.mktemp("clip"), TinyClipFit(steps=40, batch_size=16))
    return ClipConfig.tiny(checkpoint), images, captions
