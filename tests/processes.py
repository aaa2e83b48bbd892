"""Gateways as real `ratelimit-gw serve` processes: the one place the tests start, wait for
and stop them (single gateways, several side by side, or a `--workers` pool)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks.local_redis import free_port
from benchmarks.processes import gateway_workers
from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import open_storage

from .conftest import MODELS, UPSTREAM_KEY

_, _, IN_USD, OUT_USD = MODELS[0]


def mock_model_toml(model: str, input_per_mtok: object, output_per_mtok: object) -> str:
    """A ``[[models]]`` table for ``model`` on the mock upstream's provider."""
    return f"""
[[models]]
id = "{model}"
provider = "mock"
input_per_mtok = {input_per_mtok}
output_per_mtok = {output_per_mtok}
"""


def mock_gateway_toml(
    upstream_url: str,
    storage_url: str,
    *,
    server: str = "",
    model_extra: str = "",
    models: str | None = None,
) -> str:
    """A gateway config: ``storage_url``, and gpt-4o-mini at its test prices on the mock
    upstream. ``server``: the lines of a [server] table; ``model_extra``: more lines for the
    model's table; ``models``: other ``[[models]]`` tables instead (``mock_model_toml``)."""
    server_table = f"\n[server]\n{server}\n" if server else ""
    if models is None:
        models = mock_model_toml("gpt-4o-mini", IN_USD, OUT_USD)
    return f"""{server_table}
[storage]
url = "{storage_url}"

[[providers]]
name = "mock"
protocol = "openai"
base_url = "{upstream_url}"
api_key_env = "RLGW_TEST_UPSTREAM_KEY"
{models}{model_extra}"""


async def fresh_account_key(redis_url: str) -> str:
    """Empty the Redis at ``redis_url``, then one account, `acme` ($1,000), and a key on it:
    what a test of `serve` processes calls with."""
    storage = open_storage(StorageSettings(url=redis_url))
    try:
        await storage.call("FLUSHALL")
        accounts = AccountStore(storage)
        await accounts.create_account("acme", balance_nano=10**12)
        return (await accounts.create_key("acme")).key
    finally:
        await storage.close()


def serve_env(*, pool: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment, the mock upstream's key and ``extra``. A ``pool`` gets no
    inherited PROMETHEUS_MULTIPROC_DIR: `serve --workers` makes one of its own."""
    env = {**os.environ, "RLGW_TEST_UPSTREAM_KEY": UPSTREAM_KEY, **extra}
    if pool:
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def serve_command(config: Path, *args: str, port: int | None = None) -> list[str]:
    """``python -m ratelimit_gw serve --config CONFIG [--port PORT] ARGS...``."""
    command = [sys.executable, "-m", "ratelimit_gw", "serve", "--config", str(config)]
    if port is not None:
        command += ["--port", str(port)]
    return [*command, *args]


def start_serve(
    config: Path,
    *args: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """One ``serve`` process (env: ``serve_env()`` unless given; ``popen``: Popen's options,
    such as where its output goes). Stop it with ``stop``."""
    return subprocess.Popen(
        serve_command(config, *args, port=port),
        env=serve_env() if env is None else dict(env),
        **popen,
    )


def stop_all(
    processes: Sequence[subprocess.Popen[Any]],
    timeout_s: float = 10,
    *,
    signum: int = signal.SIGTERM,
    group: bool = False,
) -> list[str]:
    """Send each process still running ``signum`` (to its whole process group with ``group``,
    for one started with ``start_new_session``), wait up to ``timeout_s`` for each and kill
    what is left. Returns each one's stderr, where it was a pipe ("" otherwise)."""

    def send(process: subprocess.Popen[Any], sig: int) -> None:
        if group:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        elif process.poll() is None:
            process.send_signal(sig)

    for process in processes:
        send(process, signum)
    errors = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            send(process, signal.SIGKILL)
            _, err = process.communicate()
        errors.append(err.decode(errors="replace") if isinstance(err, bytes) else err or "")
    return errors


def stop(
    process: subprocess.Popen[Any],
    timeout_s: float = 10,
    *,
    signum: int = signal.SIGTERM,
    group: bool = False,
) -> str:
    """``stop_all`` for one process: its stderr, where that was a pipe."""
    return stop_all([process], timeout_s, signum=signum, group=group)[0]


def run_serve(
    config: Path, *args: str, port: int | None = None, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    """``serve`` to its end (in its own process group, so a pool is killed whole); killed, and
    the test failed, after ``timeout_s``."""
    process = start_serve(
        config,
        *args,
        port=port,
        env=serve_env(pool=True),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"serve did not exit within {timeout_s:g} s; its log:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@contextmanager
def gateway_processes(config: Path, count: int, log: Path) -> Iterator[list[str]]:
    """Start ``count`` gateways on ``config`` (free ports); yield their base URLs."""
    ports = [free_port() for _ in range(count)]
    with log.open("wb") as out:
        processes = [start_serve(config, port=port, stdout=out, stderr=out) for port in ports]
        try:
            yield [f"http://127.0.0.1:{port}" for port in ports]
        finally:
            stop_all(processes)


async def wait_ready(
    urls: list[str],
    # Only how long before giving up: a gateway is ready in ~2 s, but on a 2-core machine
    # busy with other test processes, two starting side by side took over 20 s once.
    timeout_s: float = 60,
    *,
    path: str = "/readyz",
    process: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
) -> None:
    """Wait until every gateway answers ``path`` (/readyz: storage reachable) with 200; with
    ``process``, fail as soon as it has exited. Failures quote ``log`` where there is one."""

    def output() -> str:
        return f"; its log:\n{log.read_text(errors='replace')}" if log is not None else ""

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        for url in urls:
            while True:
                if process is not None:
                    assert process.poll() is None, f"the gateway exited at start-up{output()}"
                try:
                    async with session.get(url + path) as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, f"{url} did not become ready{output()}"
                await asyncio.sleep(0.1)


async def until_each_worker_answers(http: aiohttp.ClientSession, base: str, pool: int) -> set[int]:
    """Ask /metrics of a `serve --workers 2` pool (on a new connection each time, so the kernel
    spreads them) until every worker has answered: the second may bind a moment after the
    first."""
    workers = set(gateway_workers(pool, 2))
    answered: set[int] = set()
    deadline = time.monotonic() + 30
    while answered != workers and time.monotonic() < deadline:
        try:
            async with http.get(f"{base}/metrics") as response:
                answered.add(int(response.headers["X-Rlgw-Worker"]))
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.1)
    assert answered == workers, f"workers {workers}, answered {answered}"
    return workers
