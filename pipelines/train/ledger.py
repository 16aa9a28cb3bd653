"""The data ledger and worker status: what each rank trained on, and which process it is.

`ledger/rank<r>.jsonl` gets one line per optimiser step: the step, epoch, the keys of each micro-batch and
their losses. Steps redone after a failure are appended again; `read_ledger` keeps the last line per
(rank, step), which is what the final model trained on. `workers/rank<r>.json` holds the worker's pid,
host and attempt (operators find the process to inspect; the recovery test kills it).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from pipelines.step import atomic_write_json


def ledger_path(output_dir: str | os.PathLike, rank: int) -> Path:
    return Path(output_dir) / "ledger" / f"rank{rank}.jsonl"


class Ledger:
    """Append-only per-rank JSON lines, flushed every step (so a kill loses at most the line being written)."""

    def __init__(self, output_dir: str | os.PathLike, rank: int) -> None:
        path = ledger_path(output_dir, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def append(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_ledger(output_dir: str | os.PathLike) -> dict[tuple[int, int], dict[str, Any]]:
    """(rank, step) -> the last entry written for it (a torn last line from a killed worker is ignored)."""
    entries: dict[tuple[int, int], dict[str, Any]] = {}
    for path in sorted((Path(output_dir) / "ledger").glob("rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            entries[(entry["rank"], entry["step"])] = entry
    return entries


def status_path(output_dir: str | os.PathLike, rank: int) -> Path:
    return Path(output_dir) / "workers" / f"rank{rank}.json"


def write_status(output_dir: str | os.PathLike, rank: int, **fields: Any) -> None:
    """Record (or update) this worker's status: pid, host, and the given fields."""
    path = status_path(output_dir, rank)
    current = json.loads(path.read_text()) if path.exists() else {}
    if current.get("pid") != os.getpid():
        current = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                   "attempt": current.get("attempt", 0) + 1}
    atomic_write_json(path, {**current, **fields, "updated_at": time.time()})
