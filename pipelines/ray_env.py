"""Starting or joining Ray with the environment every worker needs."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
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
    "TORCH_DISTRIBUTED_DEBUG",
    "IMAGEN_CACHE_DIR",
    # Where the object store is (not who may use it: credentials come from each node's own environment, a
    # Kubernetes Secret or an instance role, and never travel in a job's runtime_env, which the dashboard shows).
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
)
FORWARDED_PREFIXES = (
    "NCCL_",        # NCCL itself: NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_IB_*, NCCL_PROTO, NCCL_TIMEOUT...
    "TORCH_NCCL_",  # PyTorch's NCCL process group: TORCH_NCCL_ASYNC_ERROR_HANDLING, TORCH_NCCL_BLOCKING_WAIT...
    "FI_",          # libfabric, the EFA transport on AWS: FI_PROVIDER=efa, FI_EFA_USE_DEVICE_RDMA, FI_EFA_FORK_SAFE...
    "OFI_NCCL_",    # the aws-ofi-nccl plugin (NCCL over libfabric): OFI_NCCL_DISABLE_GDR_REQUIRED_CHECK...
    "RDMAV_",       # rdma-core: RDMAV_FORK_SAFE (EFA with forking data loaders)
    "GLOO_",        # gloo's interface for CPU collectives: GLOO_SOCKET_IFNAME
)
"""Prefixes of collective-communication settings forwarded to the workers (where the NCCL communicators live):
set them once where the driver runs (`ray job submit`'s shell, the RayJob's runtimeEnvYAML) instead of on every
node. Node-specific values (an interface name that differs between the CPU head and the GPU nodes) belong in the
nodes' own environment instead: a forwarded value replaces the node's. CUDA_VISIBLE_DEVICES is never forwarded
(Ray assigns it per worker)."""
LOCAL_RAY_ENV = {
    # Ray Data's Parquet reader lists the files of every execution of a dataset (each training epoch, each data
    # step) through a pool of FooterReader actors, 32 by default: each a worker process that imports Ray (about
    # 1 s of CPU), most of them started only to be killed when the few local footers are read. Measured with 6
    # local files, 3 reads on a 2-CPU Ray: 8 FooterReaders + 11 other short-lived workers and 79 s of CPU with
    # 32, 3 + 2 and 39 s with 1.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    # Ray Train's preemption watcher, an actor per fit polling for node drains: one machine is never drained.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The Train controller polls its workers every 2 s by default; a finished fit waited for the next poll.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
"""Settings for a local Ray that init_ray starts (never for a cluster it joins, where Ray's defaults suit many
nodes and many files), handed to its workers unless this process's environment sets them."""
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray in the driver of a submitted job: its job config, whose runtime_env.env_vars reach every worker."""


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver variables init_ray hands to every worker: FORWARDED_ENV by name, FORWARDED_PREFIXES by prefix.

    Inside a submitted Ray job (`ray job submit`, a KubeRay RayJob) the variables the job's own runtime_env sets
    already reach the workers and are left out: Ray refuses a driver runtime_env repeating a job's variable."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k in FORWARDED_ENV or k.startswith(FORWARDED_PREFIXES)}
    return {k: v for k, v in sorted(env.items()) if k not in _job_env_vars(environ)}


def _job_env_vars(environ: Mapping[str, str]) -> set[str]:
    try:
        job_config = json.loads(environ.get(JOB_CONFIG_ENV) or "{}")
        return set(((job_config.get("runtime_env") or {}).get("env_vars") or {}))
    except (ValueError, AttributeError):
        return set()


@dataclass(kw_only=True, frozen=True)
class RayConfig:
    address: str | None = None
    """Ray cluster address ("auto" on a cluster node, "ray://host:10001" for a client); None starts a local Ray."""
    num_cpus: int | None = None
    """CPUs of a local Ray (None: all of this machine's)."""


def init_ray(config: RayConfig = RayConfig()) -> None:
    """Start a local Ray or join a cluster, forwarding the offline/accelerator/NCCL environment to workers
    (`forwarded_env`); a local Ray's workers also get LOCAL_RAY_ENV."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    env_vars = forwarded_env()
    if config.address is None and not os.environ.get("RAY_ADDRESS"):
        env_vars = {**{k: v for k, v in LOCAL_RAY_ENV.items() if k not in os.environ}, **env_vars}
    ray.init(
        address=config.address,
        num_cpus=config.num_cpus if config.address is None else None,
        runtime_env={"env_vars": env_vars},
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )
