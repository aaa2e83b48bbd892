"""Upstream key pools shared by two real `ratelimit-gw serve` processes on one Redis (SPEC §14):
a key's cool-down, its ceilings and its health are in storage, so one process's 429, 401 or
reservation holds for the other too. Callers are the official OpenAI SDK; what the mock
upstream received, by credential, is the evidence.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from benchmarks.local_redis import free_port
from ratelimit_gw.testing.mock_keys import KeyBehaviour

from .conftest import Upstream
from .processes import fresh_account_key, serve_env, start_serve, stop_all, wait_ready
from .redis_process import RedisProcess

pytestmark = pytest.mark.slow

SECRETS = {"k-429": "sk-proc-429", "k-401": "sk-proc-401", "k-ok": "sk-proc-ok"}
NAMES = {secret: name for name, secret in SECRETS.items()}
MESSAGES: Any = [{"role": "user", "content": "hello there"}]


def pool_toml(upstream: Upstream, redis_url: str, keys: str, provider: str = "") -> str:
    return f"""
[storage]
url = "{redis_url}"

[[providers]]
name = "pool"
protocol = "openai"
base_url = "{upstream.url}"
{provider}
{keys}
[[models]]
id = "gpt-4o-mini"
provider = "pool"
input_per_mtok = 0.15
output_per_mtok = 0.60
"""


def key_toml(name: str, extra: str = "") -> str:
    env = f"POOL_{name.upper().replace('-', '_')}"
    return f'[[providers.keys]]\nname = "{name}"\napi_key_env = "{env}"\n{extra}\n'


@contextmanager
def two_gateways(config: Path, log: Path) -> Iterator[list[str]]:
    env = serve_env(
        **{f"POOL_{name.upper().replace('-', '_')}": secret for name, secret in SECRETS.items()}
    )
    ports = [free_port(), free_port()]
    with log.open("wb") as out:
        processes = [
            start_serve(config, port=port, env=env, stdout=out, stderr=out) for port in ports
        ]
        try:
            yield [f"http://127.0.0.1:{port}" for port in ports]
        finally:
            stop_all(processes)


@asynccontextmanager
async def clients(urls: list[str], key: str) -> AsyncIterator[list[openai.AsyncOpenAI]]:
    made = [openai.AsyncOpenAI(api_key=key, base_url=f"{u}/v1", max_retries=0) for u in urls]
    try:
        yield made
    finally:
        for client in made:
            await client.close()


def sent_to(upstream: Upstream) -> Counter[str]:
    """Chat requests the upstream received, by pool key name."""
    found: Counter[str] = Counter()
    for request in upstream.state.requests:
        if request.path == "/v1/chat/completions":
            secret = request.headers["authorization"].removeprefix("Bearer ")
            found[NAMES[secret]] += 1
    return found


async def test_a_429_key_is_not_tried_again_by_any_process_until_its_hint_passes(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    upstream.state.set_key_behaviour(SECRETS["k-429"], KeyBehaviour(status=429, retry_after_s=3))
    config = tmp_path / "gateway.toml"
    config.write_text(pool_toml(upstream, redis_server.url, key_toml("k-429") + key_toml("k-ok")))
    key = await fresh_account_key(redis_server.url)
    with two_gateways(config, tmp_path / "serve.log") as urls:
        await wait_ready(urls, log=tmp_path / "serve.log")
        async with clients(urls, key) as (first, second):

            async def ask(client: openai.AsyncOpenAI) -> None:
                answer = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
                )
                assert answer.choices[0].message.content

            started = time.monotonic()
            for i in range(10):  # the caller never sees the 429
                await ask((first, second)[i % 2])
            assert time.monotonic() - started < 2.5, "the checks must end within the hint"
            assert sent_to(upstream)["k-429"] == 1
            await asyncio.sleep(max(0.0, started + 3.3 - time.monotonic()))
            for i in range(6):  # the hint has passed: its turn comes again (and it cools)
                await ask((first, second)[i % 2])
    assert sent_to(upstream)["k-429"] == 2
    assert sent_to(upstream)["k-ok"] == 16


async def test_per_key_ceilings_hold_under_concurrency_across_two_processes(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    keys = key_toml("k-ok", "rpm = 4") + key_toml("k-429", "rpm = 3")
    config = tmp_path / "gateway.toml"
    config.write_text(pool_toml(upstream, redis_server.url, keys))
    key = await fresh_account_key(redis_server.url)
    with two_gateways(config, tmp_path / "serve.log") as urls:
        await wait_ready(urls, log=tmp_path / "serve.log")
        async with clients(urls, key) as pair:

            async def ask(client: openai.AsyncOpenAI) -> str:
                try:
                    await client.chat.completions.create(
                        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
                    )
                except openai.RateLimitError as exc:
                    body = exc.body
                    assert isinstance(body, dict)
                    return str(body["reason"])
                return "ok"

            outcomes = await asyncio.gather(*(ask(pair[i % 2]) for i in range(20)))
    assert Counter(outcomes) == {"ok": 7, "upstream_quota": 13}
    assert sent_to(upstream) == {"k-ok": 4, "k-429": 3}


def probes_of(upstream: Upstream, name: str) -> int:
    """Model-list requests (the gateway's probes) the upstream received from key ``name``."""
    secret = f"Bearer {SECRETS[name]}"
    return sum(
        1
        for r in upstream.state.requests
        if r.method == "GET" and r.path == "/v1/models" and r.headers["authorization"] == secret
    )


async def test_a_401_key_is_probed_once_per_interval_and_comes_back_when_healed(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    upstream.state.set_key_behaviour(SECRETS["k-401"], KeyBehaviour(status=401))
    keys = key_toml("k-401") + key_toml("k-ok")
    config = tmp_path / "gateway.toml"
    config.write_text(pool_toml(upstream, redis_server.url, keys, "probe_interval_s = 1"))
    key = await fresh_account_key(redis_server.url)
    with two_gateways(config, tmp_path / "serve.log") as urls:
        await wait_ready(urls, log=tmp_path / "serve.log")
        async with clients(urls, key) as pair:

            async def ask_all(count: int) -> None:
                for i in range(count):
                    answer = await pair[i % 2].chat.completions.create(
                        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
                    )
                    assert answer.choices[0].message.content

            await ask_all(6)  # the caller never sees the 401
            assert sent_to(upstream)["k-401"] == 1
            marked = time.monotonic()
            await asyncio.sleep(4)
            probes = probes_of(upstream, "k-401")
            window_s = time.monotonic() - marked
            # Once per interval between both processes (each on its own would make twice as
            # many); no customer request was spent on the revoked key meanwhile.
            assert 2 <= probes <= window_s + 1.5, probes
            assert probes_of(upstream, "k-ok") == 0  # a healthy key is never probed
            await ask_all(4)
            assert sent_to(upstream)["k-401"] == 1

            upstream.state.clear_key_behaviour(SECRETS["k-401"])  # the operator fixed it
            await asyncio.sleep(2.5)
            await ask_all(6)  # healthy again: its turn comes in the rotation
    assert sent_to(upstream)["k-401"] >= 2
