"""Shared by the settlement benchmarks: the machine, peak memory, timing."""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import eum  # noqa: E402,F401  (the allocator's default, as `eum` sets it, before polars loads)


def machine() -> dict:
    import polars as pl
    import pyarrow

    mem_kib = 0
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "memory_gib": round(mem_kib / 1024 / 1024, 1),
            "python": platform.python_version(), "polars": pl.__version__, "pyarrow": pyarrow.__version__,
            "polars_threads": pl.thread_pool_size(), "os": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def timed(label: str, into: dict):
    start = time.perf_counter()
    yield
    into[label] = round(time.perf_counter() - start, 3)


def server(url: str | None) -> dict:
    """A PostgreSQL database's server: its version and the settings that shape a
    durable write (as the service benchmarks print them); {} for SQLite or none."""
    if not url or not url.startswith("postgresql"):
        return {}
    import psycopg

    out = {}
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        for setting in ("server_version", "fsync", "synchronous_commit", "wal_sync_method", "shared_buffers",
                        "full_page_writes", "min_wal_size", "max_wal_size", "autovacuum"):
            out[setting] = conn.execute(f"SHOW {setting}").fetchone()[0]
    return out


def show(title: str, settings: dict, figures: dict, targets: dict, database: str | None = None) -> None:
    print(f"== {title}")
    print("machine:  " + ", ".join(f"{k}={v}" for k, v in machine().items()))
    if pg := server(database):
        print("postgresql: " + ", ".join(f"{k}={v}" for k, v in pg.items()))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for key, value in figures.items():
        target = targets.get(key)
        verdict = ""
        if target is not None:
            verdict = f"   (target < {target}: {'met' if value < target else 'MISSED'})"
        print(f"  {key:<34} {value}{verdict}")
