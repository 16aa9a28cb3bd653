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


MLFLOW_PROCESS_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
"""mlflow.set_tracking_uri / set_registry_uri / set_experiment also write these into os.environ (for child
processes); one test's store must not become the default of a later test's subprocesses. In this process
mlflow keeps its own copy, so taking them back after each test changes nothing for the test's fixtures."""
MLFLOW_ENV_AT_START = {k: os.environ.get(k) for k in MLFLOW_PROCESS_ENV}


@pytest.fixture(autouse=True)
def _mlflow_env_per_test():
    yield
    for key, value in MLFLOW_ENV_AT_START.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One S3-compatible server (moto) on 127.0.0.1 for the session."""
    from s3_server import S3Server

    server = S3Server(str(tmp_path_factory.mktemp("s3") / "moto.log"))
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the loopback S3 server, with this process's (and its children's) AWS_* set to reach it.
    Yields (server, bucket name)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    yield s3_server, s3_server.create_bucket()


@pytest.fixture(scope="session")
def s3_auth_server(tmp_path_factory):
    """A second loopback S3 server (moto) that enforces signatures and IAM policies: every request must be signed
    by a key made through its IAM API. `env`/`client()` carry an admin key; `restricted_user(prefix)` makes a
    bucket and a user for whom that prefix is read-only."""
    from s3_server import S3Server

    server = S3Server(str(tmp_path_factory.mktemp("s3-auth") / "moto.log"), authenticate=True)
    yield server
    server.stop()
