"""Test-wide settings: nothing here may reach the network except 127.0.0.1."""
import os

# Fail fast instead of waiting on hub retries (open_clip waits ~46 s per try without these).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

from imagen_core.text_encoder import ASSETS_DIR

ASSETS = ASSETS_DIR
"""The package's shipped assets (imagen_core/assets/: the tiny T5), where the installed imagen_core holds them."""


@pytest.fixture(scope="session")
def assets_dir() -> pathlib.Path:
    return ASSETS


@pytest.fixture(scope="module")
def ray_session():
    """A local 2-CPU Ray for one test module (this machine's size), shut down after it."""
    import ray

    from pipelines.ray_env import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()
