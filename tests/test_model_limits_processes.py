"""A per-model limit shared by two real `ratelimit-gw serve` processes on one Redis (SPEC §15
item 2): 20 concurrent requests to two models of one pattern, through both, get exactly the
pattern's rpm; a model the pattern does not match is not limited by it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import open_storage

from .conftest import Upstream
from .processes import (
    fresh_account_key,
    gateway_processes,
    mock_gateway_toml,
    mock_model_toml,
    wait_ready,
)
from .redis_process import RedisProcess

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "hello there"}]


async def test_a_key_pattern_is_exact_across_two_gateways(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    models = "".join(mock_model_toml(m, 1, 1) for m in ("gpt-4o", "gpt-4o-mini", "o3-mini"))
    config.write_text(mock_gateway_toml(upstream.url, redis_server.url, models=models))
    key = await fresh_account_key(redis_server.url)
    storage = open_storage(StorageSettings(url=redis_server.url))
    try:
        accounts = AccountStore(storage)
        record = await accounts.find_key(key)
        assert record is not None
        await accounts.update_key(record.id, {"model_limits": {"gpt-4o*": {"rpm": 5}}})
        log = tmp_path / "serve.log"
        with gateway_processes(config, 2, log) as urls:
            await wait_ready(urls, log=log)
            clients = [
                openai.AsyncOpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0) for url in urls
            ]

            async def ask(i: int, model: str) -> str:
                try:
                    await clients[i % 2].chat.completions.create(
                        model=model,
                        messages=MESSAGES,  # type: ignore[arg-type]
                        max_tokens=5,
                    )
                except openai.RateLimitError as exc:
                    assert isinstance(exc.body, dict)
                    return str(exc.body["reason"])
                return "ok"

            limited = await asyncio.gather(
                *(ask(i, "gpt-4o" if i % 3 else "gpt-4o-mini") for i in range(20))
            )
            other = await asyncio.gather(*(ask(i, "o3-mini") for i in range(10)))
            for client in clients:
                await client.close()
        assert limited.count("ok") == 5
        assert set(limited) == {"ok", "rpm_exceeded"}
        assert other == ["ok"] * 10
    finally:
        await storage.close()
