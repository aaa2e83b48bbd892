"""The benchmark's CPU meter counts a process's on-CPU time: every thread, ended ones too,
of another process as of this one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from benchmarks.processes import CpuMeter, cpu_seconds


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_seconds_counts_every_thread_even_one_that_ended() -> None:
    before = cpu_seconds([os.getpid()])
    worker = threading.Thread(target=_spin, args=(0.15,))
    worker.start()
    _spin(0.15)
    worker.join()
    spent = cpu_seconds([os.getpid()]) - before
    # 0.3 s of thread CPU in two threads, one gone by now; only a little more besides.
    assert 0.29 <= spent < 0.5


def test_sleeping_costs_no_cpu() -> None:
    meter = CpuMeter([os.getpid()], None)
    meter.start()
    time.sleep(0.3)
    assert meter.per_request(1)["server_cpu_us"] < 30_000


def test_the_meter_divides_by_requests_and_reports_redis_apart() -> None:
    meter = CpuMeter([os.getpid()], os.getpid())
    meter.start()
    _spin(0.2)
    figures = meter.per_request(4)
    assert set(figures) == {"server_cpu_us", "redis_cpu_us"}
    assert 49_000 <= figures["server_cpu_us"] < 70_000  # 0.2 s over 4 requests
    assert meter.per_request(0) == {}  # nothing measured: no figure, not a division by zero


@pytest.mark.slow  # runs a Python subprocess
def test_another_process_is_measured_while_it_runs() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "end = time.process_time() + 0.3\n"
            "while time.process_time() < end: pass\n"
            "print('spun', flush=True)\n"
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "spun\n"
        spent = cpu_seconds([child.pid])
        assert 0.3 <= spent < 1.5  # the spin, and the interpreter's start
        time.sleep(0.2)
        assert cpu_seconds([child.pid]) - spent < 0.02  # blocked on stdin: no CPU
    finally:
        child.communicate("")


@pytest.mark.slow  # runs a Python subprocess
def test_a_process_that_died_is_named_not_counted_as_nothing() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(RuntimeError, match=f"process {child.pid} is gone"):
        cpu_seconds([child.pid])
