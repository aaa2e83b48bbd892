"""Gateways as real `ratelimit-gw serve` processes, for tests that need several of them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from benchmarks.local_redis import free_port

from .conftest import UPSTREAM_KEY


@contextmanager
def gateway_processes(config: Path, count: int, log: Path) -> Iterator[list[str]]:
    """Start ``count`` gateways on ``config`` (free ports); yield their base URLs."""
    env = {**os.environ, "RLGW_TEST_UPSTREAM_KEY": UPSTREAM_KEY}
    ports = [free_port() for _ in range(count)]
    with log.open("wb") as out:
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ratelimit_gw",
                    "serve",
                    "--config",
                    str(config),
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=out,
                stderr=out,
            )
            for port in ports
        ]
        try:
            yield [f"http://127.0.0.1:{port}" for port in ports]
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(10)


async def wait_ready(urls: list[str], timeout_s: float = 20) -> None:
    """Wait until every gateway answers /readyz with 200 (storage reachable)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        for url in urls:
            while True:
                try:
                    async with session.get(url + "/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, f"{url} did not become ready"
                await asyncio.sleep(0.1)
