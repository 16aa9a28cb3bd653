"""Starting or joining Ray with the environment every worker needs."""
from __future__ import annotations

import os
from dataclasses import dataclass

# Variables copied from the driver into every Ray worker: offline switches must reach the workers
# too, or open_clip/transformers there wait on hub retries; DeepSpeed must know it runs on CPU.
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "NO_ALBUMENTATIONS_UPDATE",
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "WANDB_MODE",
    "TOKENIZERS_PARALLELISM",
    "MLFLOW_TRACKING_URI",
)


@dataclass(kw_only=True, frozen=True)
class RayConfig:
    address: str | None = None
    """Ray cluster address ("auto" on a cluster node, "ray://host:10001" for a client); None starts a local Ray."""
    num_cpus: int | None = None
    """CPUs of a local Ray (None: all of this machine's)."""


def init_ray(config: RayConfig = RayConfig()) -> None:
    """Start a local Ray or join a cluster, forwarding the offline/accelerator environment to workers."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    ray.init(
        address=config.address,
        num_cpus=config.num_cpus if config.address is None else None,
        runtime_env={"env_vars": env_vars},
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )
