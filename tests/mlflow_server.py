"""A real `mlflow server` on 127.0.0.1 for tests: its own sqlite store, artifacts proxied to a folder or a bucket."""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

from s3_server import free_port

STARTUP_DEADLINE_S = 120


@contextlib.contextmanager
def mlflow_server(work_dir: pathlib.Path, artifacts_destination: str,
                  env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Start the server (artifacts under `artifacts_destination`: a path or s3://...), yield its URI, stop it."""
    from pipelines.tracking import TrackingUnavailable, check_tracking

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = work_dir / "mlflow-server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{work_dir}/mlflow-server.db",
               "--artifacts-destination", artifacts_destination]
    full_env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    try:
        started = time.monotonic()
        while True:
            try:
                check_tracking(uri, timeout_s=1)
                break
            except TrackingUnavailable:
                try:
                    code = process.wait(timeout=0.25)
                except subprocess.TimeoutExpired:
                    if time.monotonic() - started > STARTUP_DEADLINE_S:
                        raise RuntimeError(f"mlflow server not healthy:\n{log.read_text()[-3000:]}") from None
                    continue
                raise RuntimeError(f"mlflow server exited with {code}:\n{log.read_text()[-3000:]}") from None
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
