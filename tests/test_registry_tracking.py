"""An unreachable or misconfigured tracking URI is reported within seconds, naming the URI and what to check."""
from __future__ import annotations

import http.server
import socket
import sqlite3
import threading
import time

import pytest
from s3_server import free_port as _free_port

from pipelines.tracking import TrackingUnavailable, check_tracking




def _timed_failure(uri: str, timeout_s: float) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as error:
        check_tracking(uri, timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    print(f"{uri}: reported in {elapsed:.2f} s: {error.value}")
    return str(error.value), elapsed


def test_nothing_listening_is_reported_at_once():
    uri = f"http://127.0.0.1:{_free_port()}"
    message, elapsed = _timed_failure(uri, timeout_s=5)
    assert elapsed < 2
    assert uri in message and "connection refused" in message and "mlflow server" in message


def test_a_server_that_never_answers_is_reported_after_the_timeout():
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        message, elapsed = _timed_failure(uri, timeout_s=1)
    assert elapsed < 3
    assert uri in message and "no answer" in message and "within 1 s" in message and "firewall" in message


def test_a_web_server_that_is_not_mlflow_is_named():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        message, elapsed = _timed_failure(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5)
    finally:
        server.shutdown()
        server.server_close()
    assert elapsed < 2 and "not an MLflow server" in message and "--static-prefix" in message


def test_sqlite_paths_are_checked(tmp_path):
    message, _ = _timed_failure(f"sqlite:///{tmp_path}/missing/dir/mlflow.db", timeout_s=1)
    assert f"{tmp_path}/missing/dir does not exist" in message
    (tmp_path / "notes.db").write_text("not a database")
    message, _ = _timed_failure(f"sqlite:///{tmp_path}/notes.db", timeout_s=1)
    assert "is not an SQLite database" in message
    message, _ = _timed_failure("sqlite://", timeout_s=1)
    assert "sqlite:////ABSOLUTE/path.db" in message
    sqlite3.connect(tmp_path / "ok.db").close()
    status = check_tracking(f"sqlite:///{tmp_path}/ok.db")
    assert status.kind == "sqlite" and str(tmp_path / "ok.db") in status.detail


def test_unknown_scheme_and_unreachable_database_are_named():
    message, _ = _timed_failure("htp://127.0.0.1:5000", timeout_s=1)
    assert "scheme 'htp'" in message and "typo" in message
    message, elapsed = _timed_failure(f"postgresql://user:secret@127.0.0.1:{_free_port()}/mlflow", timeout_s=2)
    assert elapsed < 3 and "secret" not in message and "***" in message and "postgresql server" in message
