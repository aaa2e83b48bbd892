"""The concurrent-admission harness: gateway processes on one storage, many more simultaneous
requests than a limit or a balance allows fired at them at once, then a wait until every hold
is released so the books can be read. The no-overspend tests on one Redis
(test_balance_concurrency) and on a Redis Cluster (test_storage_scaleout) both use it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from ratelimit_gw.accounts import AccountStore

from .processes import gateway_processes, mock_gateway_toml


@contextmanager
def gateway_processes_on(
    tmp_path: Path, upstream_url: str, storage_url: str, count: int = 2, *, model_extra: str = ""
) -> Iterator[list[str]]:
    """``count`` gateway processes sharing ``storage_url``; yields their base URLs."""
    config = tmp_path / "gateway.toml"
    config.write_text(mock_gateway_toml(upstream_url, storage_url, model_extra=model_extra))
    with gateway_processes(config, count, tmp_path / "gateways.log") as urls:
        yield urls


async def fire(
    urls: list[str], key: str, count: int, body: bytes, *, latency_ms: int = 0
) -> list[int]:
    """``count`` chat completions with ``body``, all at once, spread round-robin over
    ``urls``, each held ``latency_ms`` at the mock upstream; their statuses, in order."""
    headers = {
        "Authorization": f"Bearer {key}",
        "content-type": "application/json",
        "x-mock-latency-ms": str(latency_ms),
    }
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> int:
            url = urls[i % len(urls)] + "/v1/chat/completions"
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def holds_released(accounts: AccountStore, account: str, within_s: float = 20) -> None:
    """Wait until ``account`` has no live hold: every admitted request is settled."""
    deadline = time.monotonic() + within_s
    while (await accounts.get_account(account)).holds_live:
        assert time.monotonic() < deadline, "holds were not released"
        await asyncio.sleep(0.05)
