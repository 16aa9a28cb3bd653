"""The data ledger and worker status: what each rank trained on, and which process it is.

Each optimiser step gets one ledger line per rank: the step, epoch, the keys of each micro-batch and their losses.

- On a local (or shared POSIX) output_dir, `ledger/rank<r>.jsonl` is appended and flushed every step, so a
  kill loses at most the line being written.
- On an object store (an s3:// output_dir), which cannot append, the lines are buffered and written as whole
  segment objects `ledger/rank<r>/<first_step:09d>-<last_step:09d>.jsonl`: before every checkpoint is reported
  (`Ledger.flush`, called by the loop) and at the end. Lines after the last checkpoint can be lost on a kill;
  those steps are redone after the restore and logged again.

Steps redone after a failure are logged again; `read_ledger` keeps the last line per (rank, step), which is what
the final model trained on. `ledger_steps` counts a rank's lines cheaply (a progress bar's poll).
`workers/rank<r>.json` holds the worker's pid, host and attempt (operators find the process to inspect; the
recovery test kills it).
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.step import atomic_write_json
from pipelines.storage import StoragePath

LEDGER_DIR = "ledger"
SEGMENT = re.compile(r"^(?P<first>\d+)-(?P<last>\d+)\.jsonl$")


def ledger_path(output_dir: str | os.PathLike | StoragePath, rank: int) -> Path | StoragePath:
    """The rank's append-only file on a local output_dir (a pathlib.Path, as before); on an object store the
    StoragePath of the folder that holds its segments."""
    root = storage.path(output_dir)
    if root.is_local:
        return root.local / LEDGER_DIR / f"rank{rank}.jsonl"
    return segment_dir(root, rank)


def segment_dir(output_dir: str | os.PathLike | StoragePath, rank: int) -> StoragePath:
    return storage.path(output_dir) / LEDGER_DIR / f"rank{rank}"


def segment_name(first_step: int, last_step: int) -> str:
    return f"{first_step:09d}-{last_step:09d}.jsonl"


class Ledger:
    """Per-rank JSON lines: appended and flushed every step locally; buffered and written as segments on a store."""

    def __init__(self, output_dir: str | os.PathLike | StoragePath, rank: int) -> None:
        root = storage.path(output_dir)
        self.rank = rank
        self._file = None
        self._segments: StoragePath | None = None
        self._buffer: list[tuple[int, str]] = []
        if root.is_local:
            path = ledger_path(root, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")
        else:
            self._segments = segment_dir(root, rank)

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._buffer.append((int(entry["step"]), line))

    def flush(self) -> StoragePath | None:
        """Write the buffered lines as one segment object (object stores; locally every line is already on
        disk). Returns the segment written, if any."""
        if self._segments is None or not self._buffer:
            return None
        segment = self._segments / segment_name(self._buffer[0][0], self._buffer[-1][0])
        segment.write_text("".join(line for _, line in self._buffer))
        self._buffer.clear()
        return segment

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            self.flush()


def _parse_lines(text: str, entries: dict[tuple[int, int], dict[str, Any]]) -> None:
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = (entry["rank"], entry["step"])
        held = entries.get(key)
        # The later of two lines for a step wins: file order, and across segments their time (a step redone
        # after a fallback to an older checkpoint is in a segment written later).
        if held is None or not ("time" in held and "time" in entry and entry["time"] < held["time"]):
            entries[key] = entry


def read_ledger(output_dir: str | os.PathLike | StoragePath) -> dict[tuple[int, int], dict[str, Any]]:
    """(rank, step) -> the last entry written for it (a torn last line from a killed worker is ignored), from
    the local files and the segments, whichever the output_dir holds."""
    root = storage.path(output_dir) / LEDGER_DIR
    entries: dict[tuple[int, int], dict[str, Any]] = {}
    if root.is_local:
        for path in sorted(root.local.glob("rank*.jsonl")):
            _parse_lines(path.read_text(encoding="utf-8"), entries)
        segments = sorted(root.local.glob("rank*/*.jsonl"))
        for path in segments:
            _parse_lines(path.read_text(encoding="utf-8"), entries)
        return entries
    for segment in root.files("rank*/*.jsonl", recursive=True):
        _parse_lines(segment.read_text(), entries)
    for file in root.files("rank*.jsonl"):
        _parse_lines(file.read_text(), entries)
    return entries


def ledger_steps(output_dir: str | os.PathLike | StoragePath, rank: int = 0) -> int:
    """How many ledger lines rank `rank` has written, in whichever form: the lines of the local file (a step
    redone after a restart counts again), or on an object store the steps its segments cover, from one
    listing and the segments' names (no reads; buffered lines count once their segment is written, at each
    checkpoint). 0 when nothing is there yet."""
    root = storage.path(output_dir)
    if root.is_local:
        path = ledger_path(root, rank)
        count = 0
        if path.exists():
            with open(path, "rb") as f:
                count = sum(1 for _ in f)
        local_segments = root.local / LEDGER_DIR / f"rank{rank}"
        if local_segments.is_dir():
            count += _covered_steps(p.name for p in local_segments.glob("*.jsonl"))
        return count
    return _covered_steps(f.name for f in segment_dir(root, rank).files("*.jsonl"))


def _covered_steps(names: Any) -> int:
    steps: set[int] = set()
    for name in names:
        match = SEGMENT.match(name)
        if match:
            steps.update(range(int(match["first"]), int(match["last"]) + 1))
    return len(steps)


def status_path(output_dir: str | os.PathLike | StoragePath, rank: int) -> StoragePath:
    return storage.path(output_dir) / "workers" / f"rank{rank}.json"


def write_status(output_dir: str | os.PathLike | StoragePath, rank: int, **fields: Any) -> None:
    """Record (or update) this worker's status: pid, host, and the given fields."""
    path = status_path(output_dir, rank)
    current = path.read_json() if path.exists() else {}
    if current.get("pid") != os.getpid():
        current = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                   "attempt": current.get("attempt", 0) + 1}
    atomic_write_json(path, {**current, **fields, "updated_at": time.time()})
