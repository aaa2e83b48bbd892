"""A budget shared by two real `ratelimit-gw serve` processes on one Redis (SPEC §15): 200
concurrent requests from the official OpenAI SDK never settle more than the cap."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.money import parse_usd
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import open_storage

from .conftest import Upstream
from .processes import gateway_processes, mock_gateway_toml, mock_model_toml, wait_ready
from .redis_process import RedisProcess

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "hello there"}]
# Output at $500 per Mtok and free input: a request capped at 20 tokens holds $0.01 and, with
# the mock's 4 chunks of 5 tokens, really costs $0.01, so settlement frees nothing.
PRICED_MODEL = mock_model_toml("gpt-4o-mini", 0, 500)


async def test_a_daily_budget_is_exact_across_two_gateways(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(mock_gateway_toml(upstream.url, redis_server.url, models=PRICED_MODEL))
    storage = open_storage(StorageSettings(url=redis_server.url))
    await storage.call("FLUSHALL")
    accounts = AccountStore(storage)
    await accounts.create_account("acme")  # metered: the budget is its only cap
    await accounts.update_account("acme", {"budget_usd": "1.00", "budget_period": "day"})
    key = (await accounts.create_key("acme")).key
    log = tmp_path / "serve.log"
    try:
        with gateway_processes(config, 2, log) as urls:
            await wait_ready(urls, log=log)
            clients = [
                openai.AsyncOpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0) for url in urls
            ]

            async def ask(i: int) -> str:
                try:
                    await clients[i % 2].chat.completions.create(
                        model="gpt-4o-mini",
                        messages=MESSAGES,  # type: ignore[arg-type]
                        max_tokens=20,
                        extra_headers={"x-mock-chunks": "4"},
                    )
                except openai.RateLimitError as exc:
                    assert isinstance(exc.body, dict)
                    return str(exc.body["reason"])
                return "ok"

            outcomes = await asyncio.gather(*(ask(i) for i in range(200)))
            for client in clients:
                await client.close()
        assert outcomes.count("ok") == 100
        assert set(outcomes) == {"ok", "budget_exceeded"}
        for _ in range(100):  # settlement runs just after each answer
            entries = await accounts.ledger("acme", limit=1000)
            if len(entries) >= 100:
                break
            await asyncio.sleep(0.05)
        charged = sum(parse_usd(e.cost_usd or "0") for e in entries if e.type == "charge")
        assert len(entries) == 100 and charged == parse_usd("1.00")
        shown = (await accounts.get_account("acme")).budget
        assert shown is not None
        assert (shown.spent_usd, shown.held_usd, shown.remaining_usd) == ("1.00", "0.00", "0.00")
    finally:
        await storage.close()
