"""What every benchmark shares: the machine line it prints, and the demo corpus served on 127.0.0.1.

The scripts run as `python bench/<name>.py`, so this folder is on sys.path and `from common import ...` works.
"""
from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any


UNIT_COSTS = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "unit_costs.json"
"""The unit costs `imagen plan` reads: bench_unit_costs.py writes them, bench_gpu.py --record adds its GPU's."""


def cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor() or "?")


def machine() -> str:
    """CPU, cores, memory, the 1-minute load average (machines of one kind differ 2-3x: say the load)."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu_model()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB; load average {os.getloadavg()[0]:.1f} "
            f"(1 min); Python {platform.python_version()}")


@contextlib.contextmanager
def served_demo_corpus(work: Path, images: int, image_size: int = 256) -> Iterator[Any]:
    """A demo corpus of `images` rows (JPEGs of image_size px, junk included) under work/corpus, served on
    127.0.0.1 while the block runs; yields its DemoCorpusPaths (`.url_list` is what ingest reads)."""
    from pipelines.demo.corpus import DemoCorpusConfig, serve_directory, write_demo_corpus

    (work / "corpus" / "www").mkdir(parents=True)
    with serve_directory(work / "corpus" / "www") as server:
        yield write_demo_corpus(DemoCorpusConfig(num_images=images, image_size=image_size, image_format="jpg"),
                                work / "corpus", server.base_url)
