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

ASSETS = pathlib.Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def assets_dir() -> pathlib.Path:
    return ASSETS
