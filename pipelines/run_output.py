"""What a person sees during a long run: a line per step start and end, progress with an ETA, nothing else.

Ray (the driver's own logs and what it forwards from every worker), DeepSpeed, MLflow and the other libraries
write to file descriptors 1 and 2; while a run is captured those go to the run's log file, and only this module's
lines reach the terminal (a saved copy of the original stdout).
"""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from pipelines import storage
from pipelines.storage import StoragePath


class RunOutput:
    """The terminal side of a run and the log file beside it."""

    def __init__(self, log_path: str | os.PathLike, console: TextIO | None = None) -> None:
        self.log_path = pathlib.Path(log_path)
        self.console = console
        self._lock = threading.Lock()
        self._progress: dict[str, threading.Event] = {}
        self._capturing = False

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Send fds 1 and 2 (and Python logging) to the log file; lines of this object go to the terminal.
        Re-entrant: an inner capture of the same output (a run inside the demo) changes nothing."""
        if self._capturing:
            yield
            return
        self._capturing = True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved_out, saved_err = os.dup(1), os.dup(2)
        console = self.console or os.fdopen(os.dup(saved_out), "w", buffering=1)
        self.console = console
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        root = logging.getLogger()
        handler = logging.StreamHandler(open(self.log_path, "a", buffering=1))
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        old_handlers, old_level = root.handlers[:], root.level
        self.line(f"logs of Ray, DeepSpeed and the libraries: {self.log_path}")
        try:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            root.handlers = [handler]
            root.setLevel(logging.INFO)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for event in self._progress.values():
                event.set()
            root.handlers, root.level = old_handlers, old_level
            handler.close()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            for fd in (saved_out, saved_err, log_fd):
                os.close(fd)
            self._capturing = False

    def line(self, text: str) -> None:
        with self._lock:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.console or sys.stdout, flush=True)

    def start(self, step: str) -> None:
        self.line(f"{step} ...")

    def done(self, step: str, seconds: float, headline: str = "", *, skipped: bool = False) -> None:
        self._stop_progress(step)
        what = "already done" if skipped else f"done in {_duration(seconds)}"
        self.line(f"{step} {what}" + (f": {headline}" if headline else ""))

    def failed(self, step: str, error: BaseException) -> None:
        self._stop_progress(step)
        self.line(f"{step} FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
                  f"(details in {self.log_path})")

    def progress(self, step: str, total: int, unit: str, poll: Callable[[], int], every_s: float = 5.0) -> None:
        """Progress with an ETA for `step`, fed by polling `poll()` (done units) until the step ends: a bar on a
        terminal, else a line a minute (a log or CI output gets no carriage-return spam)."""
        stop = threading.Event()
        self._progress[step] = stop
        tty = bool(getattr(self.console, "isatty", lambda: False)())
        threading.Thread(target=self._bar if tty else self._lines, args=(step, total, unit, poll, stop, every_s),
                         name=f"progress-{step}", daemon=True).start()

    def _bar(self, step: str, total: int, unit: str, poll: Callable[[], int], stop: threading.Event,
             every_s: float) -> None:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"  {step}", unit=unit, file=self.console, mininterval=every_s, ncols=100,
                   leave=False)
        while not stop.wait(every_s):
            with contextlib.suppress(OSError, ValueError):
                bar.update(max(0, min(total, poll()) - bar.n))
        bar.close()

    def _lines(self, step: str, total: int, unit: str, poll: Callable[[], int], stop: threading.Event,
               every_s: float) -> None:
        started, last = time.monotonic(), 0
        while not stop.wait(60.0):
            with contextlib.suppress(OSError, ValueError):
                done = min(total, poll())
                if done > last:
                    elapsed = time.monotonic() - started
                    eta = elapsed / done * (total - done)
                    self.line(f"  {step}: {done}/{total} {unit}s, ETA {_duration(eta)}")
                    last = done

    def _stop_progress(self, step: str) -> None:
        event = self._progress.pop(step, None)
        if event is not None:
            event.set()
            time.sleep(0.05)  # let the bar clear its line before the step's end line


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 90 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def count_files(directory: str | os.PathLike | StoragePath, pattern: str) -> Callable[[], int]:
    """A poll for `progress`: how many files match `pattern` in `directory` now."""
    path = storage.path(directory)
    return lambda: len(path.glob(pattern))
