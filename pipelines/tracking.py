"""MLflow tracking shared by every step: check the URI before any work starts, and say plainly what is wrong;
find or create an experiment whose artifacts live beside a local database.

The MLflow client retries an unreachable server with back-off (MLFLOW_HTTP_REQUEST_MAX_RETRIES, up to minutes)
before it fails, deep inside whatever call came first. `check_tracking` probes once with a short timeout and
raises `TrackingUnavailable` naming the URI and what to check.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import pathlib
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

SQLITE_MAGIC = b"SQLite format 3\x00"
"""First 16 bytes of every SQLite database file."""

PARAM_VALUE_LIMIT = 6000
"""MLflow's limit on a param value's length."""

DB_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
"""Database schemes MLflow's SQLAlchemy store accepts (optionally "+driver"), with their default ports."""


class TrackingUnavailable(RuntimeError):
    """The tracking URI cannot be used: the message names the URI, the cause and what to check."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class TrackingStatus:
    """What the probe found at a usable tracking URI."""

    uri: str
    """The URI that was checked."""
    kind: str
    """"http", "sqlite", "database" or "file"."""
    detail: str
    """Server version, database path, ...: one line for a log."""


def resolve_tracking_uri(uri: str | None) -> str:
    """The URI given, else MLFLOW_TRACKING_URI, else MLflow's own default (what the client would use)."""
    if uri:
        return uri
    import mlflow

    return mlflow.get_tracking_uri()


def check_tracking(uri: str | None = None, timeout_s: float = 5.0) -> TrackingStatus:
    """Probe the tracking store at `uri` (None: the configured one) within about `timeout_s` seconds.

    Raises TrackingUnavailable with the URI and what to check when it is unreachable or misconfigured.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    uri = resolve_tracking_uri(uri)
    scheme = urllib.parse.urlparse(uri).scheme.split("+")[0]
    if scheme in ("http", "https"):
        return _check_http(uri, timeout_s)
    if scheme == "sqlite":
        return _check_sqlite(uri)
    if scheme in DB_DEFAULT_PORTS:
        return _check_database(uri, scheme, timeout_s)
    if scheme in ("", "file"):
        return _check_file(uri)
    raise TrackingUnavailable(
        f"tracking URI {uri!r}: scheme {scheme!r} is not one this project checks (http, https, sqlite, "
        f"{', '.join(DB_DEFAULT_PORTS)}, file). Check MLFLOW_TRACKING_URI / --tracking-uri for a typo."
    )


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's REST client would send (MLFLOW_TRACKING_TOKEN or USERNAME/PASSWORD)."""
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _get(url: str, timeout_s: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read(65536)
    except urllib.error.HTTPError as error:
        return error.code, error.read(65536)


def _check_http(uri: str, timeout_s: float) -> TrackingStatus:
    parsed = urllib.parse.urlparse(uri)
    where = f"{parsed.hostname}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"
    base = uri.rstrip("/")
    try:
        status, body = _get(f"{base}/health", timeout_s)
        if status == 404:
            raise TrackingUnavailable(
                f"tracking URI {uri!r}: {where} answers HTTP but has no /health endpoint, so it is not an MLflow "
                "server at this path. Check the port, and the path prefix if the server runs with --static-prefix."
            )
        if status != 200:
            raise TrackingUnavailable(
                f"tracking URI {uri!r}: /health returned HTTP {status} ({body[:200]!r}). Check the server's log "
                "and its backend store (database reachable, migrations applied: `mlflow db upgrade`)."
            )
        version = _get(f"{base}/version", timeout_s)[1].decode(errors="replace").strip()
        # /health is public even on servers with auth on; a real API call checks credentials and the registry.
        status, body = _get(f"{base}/api/2.0/mlflow/registered-models/search?max_results=1", timeout_s)
    except (TimeoutError, socket.timeout):
        raise TrackingUnavailable(
            f"tracking URI {uri!r}: no answer from {where} within {timeout_s:g} s. Check the host is reachable "
            "from here (firewall, VPN, HTTP_PROXY/HTTPS_PROXY/NO_PROXY) and the server is not overloaded."
        ) from None
    except urllib.error.URLError as error:
        raise TrackingUnavailable(_url_error_message(uri, where, error.reason)) from None
    if status in (401, 403):
        raise TrackingUnavailable(
            f"tracking URI {uri!r}: the server refused the request (HTTP {status}). Set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account with access."
        )
    if status != 200:
        raise TrackingUnavailable(
            f"tracking URI {uri!r}: the model-registry API returned HTTP {status} ({body[:200]!r}). Check the "
            "server's log; a server started with --artifacts-only or without a registry cannot be used here."
        )
    json.loads(body or b"{}")  # a proxy's HTML error page would not parse
    return TrackingStatus(uri=uri, kind="http", detail=f"MLflow server {version} at {where}")


def _url_error_message(uri: str, where: str, reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return (
            f"tracking URI {uri!r}: connection refused at {where}: nothing listens there. Start the server "
            f"(`mlflow server --host HOST --port PORT --backend-store-uri ...`) or fix MLFLOW_TRACKING_URI / "
            "--tracking-uri."
        )
    if isinstance(reason, socket.gaierror):
        return f"tracking URI {uri!r}: host name {where.rsplit(':', 1)[0]!r} does not resolve. Check for a typo or DNS."
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"tracking URI {uri!r}: connecting to {where} timed out. Check firewall, VPN and proxy settings."
    return f"tracking URI {uri!r}: cannot reach {where}: {reason}. Check the URI and that the server runs."


def _check_sqlite(uri: str) -> TrackingStatus:
    raw = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not raw or raw == ":memory:":
        raise TrackingUnavailable(
            f"tracking URI {uri!r}: expected sqlite:///RELATIVE/path.db or sqlite:////ABSOLUTE/path.db "
            "(an in-memory database would lose the registry when the process ends)."
        )
    path = pathlib.Path(urllib.parse.unquote(raw)).absolute()
    if not path.parent.is_dir():
        raise TrackingUnavailable(
            f"tracking URI {uri!r}: directory {path.parent} does not exist. Create it or fix the path "
            "(sqlite:/// + relative path, sqlite://// + absolute path)."
        )
    if path.exists():
        with open(path, "rb") as f:
            if path.stat().st_size and f.read(16) != SQLITE_MAGIC:
                raise TrackingUnavailable(f"tracking URI {uri!r}: {path} exists but is not an SQLite database.")
        if not os.access(path, os.W_OK):
            raise TrackingUnavailable(f"tracking URI {uri!r}: {path} is not writable by this user.")
    elif not os.access(path.parent, os.W_OK):
        raise TrackingUnavailable(f"tracking URI {uri!r}: cannot create {path}: {path.parent} is not writable.")
    return TrackingStatus(uri=uri, kind="sqlite", detail=f"SQLite database {path}")


def _check_database(uri: str, scheme: str, timeout_s: float) -> TrackingStatus:
    parsed = urllib.parse.urlparse(uri)
    host, port = parsed.hostname or "localhost", parsed.port or DB_DEFAULT_PORTS[scheme]
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        raise TrackingUnavailable(
            f"tracking URI {_redact(uri)!r}: cannot open a connection to the {scheme} server at {host}:{port} "
            f"({error}). Check the database runs and accepts connections from here."
        ) from None
    return TrackingStatus(uri=_redact(uri), kind="database", detail=f"{scheme} at {host}:{port} accepts connections")


def _redact(uri: str) -> str:
    """The URI without its password, for messages and logs."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.password is None:
        return uri
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@")).geturl()


def _check_file(uri: str) -> TrackingStatus:
    path = pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path) if uri.startswith("file:") else uri)
    existing = path if path.exists() else path.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise TrackingUnavailable(
            f"tracking URI {uri!r}: {existing} is not a writable directory. Create it or fix the path; for a "
            "shared registry use a database (sqlite:///path.db) or an MLflow server (http://host:port)."
        )
    return TrackingStatus(uri=uri, kind="file", detail=f"file store at {path.absolute()}")


def configure_tracking(uri: str | None = None, timeout_s: float = 5.0) -> TrackingStatus:
    """Check the tracking store, then make it MLflow's tracking URI for this process (the registry follows it
    unless MLFLOW_REGISTRY_URI names another)."""
    import mlflow

    status = check_tracking(uri, timeout_s)
    mlflow.set_tracking_uri(resolve_tracking_uri(uri))
    return status


def experiment_id(client: Any, uri: str, name: str) -> str:
    """The id of experiment `name`, created when missing. With a sqlite store its artifacts go beside the database
    (absolute: Ray workers run in other directories than the driver)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        db = pathlib.Path(urllib.parse.unquote(uri[len("sqlite:///"):]))
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def flatten_params(prefix: str, value: Any) -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"} params, values cut to MLflow's limit."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten_params(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: json.dumps(value)[:PARAM_VALUE_LIMIT] if not isinstance(value, str) else value[:PARAM_VALUE_LIMIT]}
