"""A real Ray cluster on this machine for tests: `ray start --head` (and optionally a second node with `ray start
--address`) on 127.0.0.1, each node with its own --temp-dir, so neither the other tests' local Rays nor a bare
`ray.init()` elsewhere on the machine can find it.

Token authentication: Ray 2.60 enables it for a `ray start --head` only when a token exists (~/.ray/auth_token),
and clients (`ray job submit`, the state API) send the token only with RAY_AUTH_MODE=token. The test makes its own
token and sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH for every process it starts; in this process it
passes the token as an `Authorization: Bearer` header instead, leaving this process's Ray settings alone.

Stopping: `ray stop` would stop every Ray on the machine (the other tests' too), so each node is stopped by
signalling the processes whose command line names its temp dir and everything under them (SIGTERM, then
SIGKILL), as `ray stop` does to all of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping

from s3_server import free_port

BIN = pathlib.Path(sys.executable).parent
RAY = str(BIN / "ray")


def node_processes(marker: str) -> list:
    """Every process whose command line names `marker` (a node's temp dir), and all processes under them."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(marker in arg for arg in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_node(marker: str, grace_s: float = 10.0) -> int:
    """`ray stop` for one node: SIGTERM its processes, SIGKILL what is left after `grace_s`."""
    import psutil

    procs = node_processes(marker)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    return len(procs)


class Cluster:
    """The nodes' settings and the clients a test talks to them with. `env` is what every process of the cluster
    (and `ray` commands) runs with: this process's environment, its MLflow settings taken out, plus `extra_env`."""

    def __init__(self, base: pathlib.Path, head_cpus: float, second_cpus: float | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.base, self.head_cpus, self.second_cpus = base, head_cpus, second_cpus
        self.head_dir, self.second_dir = base / "head", base / "second"
        token = base / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.token = token.read_text()
        # a job's MLflow store is what its config says: no tracking URI from this process
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("MLFLOW_")}
        self.env.update(extra_env or {})
        self.env.update(PATH=f"{BIN}{os.pathsep}{self.env.get('PATH', '')}", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=str(base / "tmp"), RAY_USAGE_STATS_ENABLED="0")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    def ray(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    def start(self) -> None:
        self.ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
                 "--num-cpus", str(self.head_cpus), "--resources", json.dumps({"head_node": 1}),
                 "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(self.dashboard_port), "--dashboard-agent-listen-port", str(free_port()),
                 "--temp-dir", str(self.head_dir), "--disable-usage-stats")
        if self.second_cpus is None:
            return
        self.ray("start", "--address", self.gcs, "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.second_cpus),
                 "--resources", json.dumps({"second_node": 1}), "--dashboard-agent-listen-port", str(free_port()),
                 "--temp-dir", str(self.second_dir), "--disable-usage-stats")

    def jobs(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers=self.headers)

    def state(self, resource: str, **filters: str) -> list[dict]:
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(address=self.dashboard, headers=self.headers)
        options = ListApiOptions(limit=10_000, detail=True, timeout=60,
                                 filters=[(k, "=", v) for k, v in filters.items()])
        return [s if isinstance(s, dict) else s.__dict__ for s in
                client.list(StateResource(resource), options=options, raise_on_missing_output=False)]

    def raylet_of(self, marker: pathlib.Path) -> tuple[object, dict[str, str]]:
        """A node's raylet process and its flags (the node id, its static resources)."""
        for proc in node_processes(str(marker)):
            cmdline = proc.cmdline()
            if cmdline and pathlib.Path(cmdline[0]).name == "raylet":
                return proc, dict(a[2:].split("=", 1) for a in cmdline[1:] if a.startswith("--") and "=" in a)
        raise AssertionError(f"no raylet runs with {marker}")

    def stop(self) -> None:
        for marker in (self.second_dir, self.head_dir):
            stop_node(str(marker))


@contextlib.contextmanager
def ray_cluster(head_cpus: float, second_cpus: float | None = None,
                extra_env: Mapping[str, str] | None = None) -> Iterator[Cluster]:
    """A started cluster (a head, and a second node when `second_cpus` is given), stopped and removed after."""
    from ray._private.utils import get_dashboard_dependency_error

    if (missing := get_dashboard_dependency_error()) is not None:  # the job server is part of the dashboard
        raise AssertionError(f"Ray Jobs need the dashboard, which needs ray[default] ({missing}): the project's "
                             "dependency should be ray[default,data,train]")
    # The node's sockets live under <temp-dir>/session_<date>_<pid>/sockets/: pytest's tmp_path is too long for
    # a Unix socket path (108 bytes), so the cluster's temp dirs are a short directory under /tmp.
    base = pathlib.Path(tempfile.mkdtemp(prefix="imagen-ray-", dir="/tmp"))
    cluster = Cluster(base, head_cpus, second_cpus, extra_env)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
