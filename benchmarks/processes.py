"""The benchmark's server processes: started and stopped, their pool workers found, and
what they spend (on-CPU time, memory) measured."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .local_redis import wait_for_port


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


@contextmanager
def server_process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[int]:
    process = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        if not wait_for_port(port, 20):
            raise RuntimeError(f"{' '.join(args)} did not start on port {port}")
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def gateway_workers(pid: int, workers: int, timeout_s: float = 20.0) -> list[int]:
    """The processes serving requests: ``pid`` itself, or the ``workers`` children of a
    ``serve --workers N`` supervisor (multiprocessing's resource tracker is not one)."""
    if workers == 1:
        return [pid]
    deadline = time.monotonic() + timeout_s
    while True:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                except FileNotFoundError:  # exited since the listing
                    continue
                if b"resource_tracker" not in cmdline:
                    found.append(int(child))
        if len(found) >= workers:
            return sorted(found)
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway pool {pid}: {len(found)} of {workers} workers running")
        time.sleep(0.1)


def _process_cpu_clock(pid: int) -> int:
    """Linux's CPU-time clock of another process (clock_getcpuclockid(3) in C: the pid,
    complemented, shifted over the clock type, CPUCLOCK_SCHED = 2)."""
    return (~pid << 3) | 2


def cpu_seconds(pids: list[int]) -> float:
    """Time these processes have spent on a CPU, in seconds: every thread, ended ones too.

    The scheduler's own nanosecond count (where /proc/<pid>/stat rounds to clock ticks, and
    /proc/<pid>/task/*/schedstat forgets threads that have ended)."""
    total_ns = 0
    for pid in pids:
        try:
            total_ns += time.clock_gettime_ns(_process_cpu_clock(pid))
        except OSError as exc:  # EINVAL: no such process any more
            raise RuntimeError(f"process {pid} is gone: it died during the benchmark") from exc
    return total_ns / 1e9


# What a CpuMeter adds to a run's extra: the median over rounds goes in a row.
CPU_FIGURES = ("server_cpu_us", "redis_cpu_us", "upstream_cpu_us")


class CpuMeter:
    """The on-CPU microseconds per request of the server measured and, for (c), of Redis,
    over one measurement (:meth:`start` after any warm-up). They resolve a few per cent,
    where req/s on a shared VM drifts by tens, and show where a fixed-rate row's time went.

    ``upstream``: the mock's process too, where rows that share one mock ask it for
    different answers (the converter's rows: an OpenAI and an Anthropic one)."""

    def __init__(self, server: list[int], redis: int | None, upstream: int | None = None) -> None:
        self._processes = {"server_cpu_us": server}
        if redis is not None:
            self._processes["redis_cpu_us"] = [redis]
        if upstream is not None:
            self._processes["upstream_cpu_us"] = [upstream]
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: cpu_seconds(pids) for name, pids in self._processes.items()}

    def per_request(self, requests: int) -> dict[str, float]:
        if not requests:
            return {}
        return {
            name: round((cpu_seconds(pids) - self._before[name]) * 1e6 / requests, 1)
            for name, pids in self._processes.items()
        }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan
