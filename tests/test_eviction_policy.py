"""A Redis that may evict loses accounts, keys and balances (issue 17): every master's
``maxmemory-policy`` is checked at start-up (refusal unless ``storage.allow_eviction``) and
again while the gateway runs (a metric and a log line, never an unready gateway).

Every Redis here is a private redis-server; the policy is set on its command line or with
CONFIG SET, as an operator (or a failover to a differently configured replica) would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from ratelimit_gw.app import create_app
from ratelimit_gw.serve import make_runner
from ratelimit_gw.services import SERVICES
from ratelimit_gw.settings import Settings, build_settings
from ratelimit_gw.storage.eviction_guard import EvictionPolicyError

from .processes import run_serve, serve_env, start_serve, stop, until_each_worker_answers
from .redis_process import (
    RedisProcess,
    free_port,
    start_redis,
    start_redis_cluster,
    start_sentinel_set,
)
from .test_observability import Samples, scrape, value

pytestmark = pytest.mark.ops  # runs redis-server processes with eviction policies

MAY_EVICT = ("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
POLICY = "rlgw_storage_eviction_policy"
CHECK_INTERVAL_S = 0.05  # the periodic check, shortened (the default is 60 s)


@pytest.fixture
def evicting_redis() -> Iterator[RedisProcess]:
    server = start_redis(None, *MAY_EVICT)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def plain_redis() -> Iterator[RedisProcess]:
    server = start_redis()  # Redis's default: noeviction
    try:
        yield server
    finally:
        server.stop()


def redis_at(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)


def limited_user(server: RedisProcess, *denied: str) -> str:
    """A URL for a user whose ACL denies ``denied`` command categories or commands."""
    with redis_at(server.port) as client:
        client.execute_command(
            "ACL", "SETUSER", "gateway", "on", ">secret", "~*", "&*", "+@all", *denied
        )
    return f"redis://gateway:secret@127.0.0.1:{server.port}/0"


def settings_for(url: str, **storage: Any) -> Settings:
    return build_settings(
        {"server": {"host": "127.0.0.1", "port": 0}, "storage": {"url": url, **storage}}, {}
    )


@asynccontextmanager
async def gateway_on(url: str, **storage: Any) -> AsyncIterator[tuple[str, web.Application]]:
    """The gateway as ``serve`` runs it (storage opened by the app), on a loopback port."""
    runner = make_runner(create_app(settings_for(url, **storage)))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", runner.app
    finally:
        await runner.cleanup()


def policies(samples: Samples) -> dict[str, float]:
    """Masters per policy, as /metrics reports them, summed over any per-worker series
    (policies with no master left out)."""
    found = {labels["policy"] for labels, _ in samples.get(POLICY, [])}
    counts = {policy: value(samples, POLICY, policy=policy) for policy in found}
    return {policy: count for policy, count in counts.items() if count}


async def until_policies(
    http: aiohttp.ClientSession, url: str, expected: dict[str, float], within_s: float = 15
) -> None:
    """Scrape /metrics until the masters per policy are ``expected`` (the periodic check)."""
    deadline = time.monotonic() + within_s
    while (found := policies(await scrape(http, url))) != expected:
        assert time.monotonic() < deadline, f"masters per policy stayed {found}"
        await asyncio.sleep(CHECK_INTERVAL_S)


async def ready(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/readyz") as response:
        return response.status


# --- start-up ----------------------------------------------------------------------------------


async def test_gateway_refuses_to_start_on_a_redis_that_may_evict(
    evicting_redis: RedisProcess,
) -> None:
    runner = make_runner(create_app(settings_for(evicting_redis.url)))
    with pytest.raises(EvictionPolicyError) as refused:
        await runner.setup()
    assert str(refused.value) == (
        f"storage.url: Redis 127.0.0.1:{evicting_redis.port} has maxmemory-policy "
        "allkeys-lru: when its memory fills it deletes keys, and with them accounts, API keys "
        "and balances. Set maxmemory-policy noeviction (CONFIG SET maxmemory-policy "
        "noeviction, and in redis.conf), or set storage.allow_eviction = true to accept the risk"
    )
    # Refused before anything listened: the runner has no server and no site.
    assert runner.server is None and not runner.sites
    await runner.cleanup()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_exits_with_a_one_line_refusal_on_a_redis_that_may_evict(
    evicting_redis: RedisProcess, tmp_path: Path, workers: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[storage]\nurl = "{evicting_redis.url}"\n')
    result = run_serve(config, "--workers", workers, port=free_port())
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"config error: storage.url: Redis 127.0.0.1:{evicting_redis.port} has maxmemory-policy "
        "allkeys-lru: when its memory fills it deletes keys, and with them accounts, API keys "
        "and balances. Set maxmemory-policy noeviction (CONFIG SET maxmemory-policy "
        "noeviction, and in redis.conf), or set storage.allow_eviction = true to accept the risk"
    )
    assert "Traceback" not in result.stderr and "listening on" not in result.stderr


async def test_allow_eviction_starts_and_exports_the_policy(
    evicting_redis: RedisProcess,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ratelimit_gw.storage")
    async with gateway_on(evicting_redis.url, allow_eviction=True) as (url, _app):
        assert await ready(http, url) == 200
        samples = await scrape(http, url)
    assert policies(samples) == {"allkeys-lru": 1}
    # Every policy is exported, zeros included, so a change leaves no stale series behind.
    assert value(samples, POLICY, policy="noeviction") == 0
    assert len(samples[POLICY]) == 9
    assert [r.getMessage() for r in caplog.records] == [
        f"Redis 127.0.0.1:{evicting_redis.port} has maxmemory-policy allkeys-lru: when its "
        "memory fills it deletes keys, accounts and balances (storage.allow_eviction = true)"
    ]


async def test_noeviction_starts_as_before_and_exports_one_safe_master(
    plain_redis: RedisProcess, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimit_gw.storage")
    async with gateway_on(plain_redis.url) as (url, _app):
        assert await ready(http, url) == 200
        assert policies(await scrape(http, url)) == {"noeviction": 1}
    assert [r for r in caplog.records if r.name == "ratelimit_gw.storage"] == []


async def test_memory_storage_has_no_master_to_check(http: aiohttp.ClientSession) -> None:
    async with gateway_on("memory://") as (url, app):
        assert await ready(http, url) == 200
        assert POLICY not in await scrape(http, url)
        assert await app[SERVICES].storage.eviction_policies() == {}


# --- ACLs and managed Redis -------------------------------------------------------------------


async def test_a_user_denied_config_is_checked_through_info_memory(
    evicting_redis: RedisProcess,
) -> None:
    url = limited_user(evicting_redis, "-config")
    with pytest.raises(EvictionPolicyError, match="has maxmemory-policy allkeys-lru"):
        async with gateway_on(url):
            pass


async def test_a_user_denied_config_and_info_starts_with_the_policy_unknown_and_a_warning(
    evicting_redis: RedisProcess,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ratelimit_gw.storage")
    url = limited_user(evicting_redis, "-config", "-info")
    async with gateway_on(url) as (gateway, _app):
        assert await ready(http, gateway) == 200
        samples = await scrape(http, gateway)
    assert policies(samples) == {"unknown": 1}
    # Both asked once; each refusal is an answer, not a failed storage call (no error counted,
    # the breaker untouched), however often the periodic check meets it.
    assert value(samples, "rlgw_storage_duration_seconds_count", operation="config") == 1
    assert value(samples, "rlgw_storage_duration_seconds_count", operation="info") == 1
    assert value(samples, "rlgw_storage_errors_total") == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot read maxmemory-policy of Redis 127.0.0.1:{evicting_redis.port} (CONFIG GET "
        "and INFO memory refused): make sure it is noeviction, or keys, accounts and "
        "balances may vanish"
    ]


# --- while running -----------------------------------------------------------------------------


async def test_a_policy_changed_at_runtime_shows_in_the_metric_and_readyz_stays_ready(
    plain_redis: RedisProcess,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimit_gw.storage")
    node = f"127.0.0.1:{plain_redis.port}"
    async with gateway_on(plain_redis.url, eviction_check_interval_s=CHECK_INTERVAL_S) as (
        url,
        _app,
    ):
        await until_policies(http, url, {"noeviction": 1})
        with redis_at(plain_redis.port) as client:
            client.config_set("maxmemory", "64mb")
            client.config_set("maxmemory-policy", "volatile-lru")
        await until_policies(http, url, {"volatile-lru": 1})
        assert await ready(http, url) == 200  # one Redis setting must not unready every replica
        with redis_at(plain_redis.port) as client:
            client.config_set("maxmemory-policy", "noeviction")
        await until_policies(http, url, {"noeviction": 1})
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            f"Redis {node} has maxmemory-policy volatile-lru: when its memory fills it deletes "
            "keys, accounts and balances; set it to noeviction (CONFIG SET maxmemory-policy "
            "noeviction)",
        ),
        ("INFO", f"Redis {node} has maxmemory-policy noeviction again"),
    ]


async def test_storage_unreachable_at_start_up_starts_and_a_later_check_reads_the_policy(
    http: aiohttp.ClientSession,
) -> None:
    port = free_port()
    async with gateway_on(
        f"redis://127.0.0.1:{port}/0",
        connect_timeout_s=0.2,
        command_timeout_s=0.2,
        breaker_cooldown_s=0.1,
        eviction_check_interval_s=CHECK_INTERVAL_S,
    ) as (url, _app):
        assert await ready(http, url) == 503  # an outage is /readyz's to report, as before
        assert POLICY not in await scrape(http, url)
        server = start_redis(port, *MAY_EVICT)
        try:
            # Found while running: a metric (and the alert), not a refusal or an unready gateway.
            await until_policies(http, url, {"allkeys-lru": 1})
            deadline = time.monotonic() + 10
            while await ready(http, url) != 200:
                assert time.monotonic() < deadline, "the gateway never became ready"
                await asyncio.sleep(CHECK_INTERVAL_S)
        finally:
            server.stop()


# --- scale-out storage -------------------------------------------------------------------------


async def test_a_cluster_with_one_primary_that_may_evict_is_refused() -> None:
    cluster = start_redis_cluster(3)
    try:
        evicting = cluster.nodes[1]
        with redis_at(evicting.port) as client:
            client.config_set("maxmemory", "64mb")
            client.config_set("maxmemory-policy", "allkeys-lfu")
        with pytest.raises(EvictionPolicyError) as refused:
            async with gateway_on(cluster.url):
                pass
        assert str(refused.value).startswith(
            f"storage.url: Redis 127.0.0.1:{evicting.port} has maxmemory-policy allkeys-lfu:"
        )
    finally:
        cluster.stop()


async def test_a_sentinel_failover_to_a_master_that_may_evict_shows_in_the_metric(
    http: aiohttp.ClientSession,
) -> None:
    sentinels = start_sentinel_set(replicas=1)
    try:
        master, replica = sentinels.servers
        with redis_at(replica.port) as client:  # a replica configured apart from its master
            client.config_set("maxmemory", "64mb")
            client.config_set("maxmemory-policy", "allkeys-random")
        async with gateway_on(sentinels.url, eviction_check_interval_s=CHECK_INTERVAL_S) as (
            url,
            app,
        ):
            await until_policies(http, url, {"noeviction": 1})
            assert await app[SERVICES].storage.eviction_policies() == {
                f"127.0.0.1:{master.port}": "noeviction"
            }
            assert await asyncio.to_thread(sentinels.failover) == replica.port
            await until_policies(http, url, {"allkeys-random": 1})
            assert await ready(http, url) == 200
    finally:
        sentinels.stop()


# --- serve --workers ---------------------------------------------------------------------------


async def test_a_worker_pool_reports_each_master_once_not_once_per_worker(
    evicting_redis: RedisProcess, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[storage]\nurl = "{evicting_redis.url}"\nallow_eviction = true\n')
    port = free_port()
    with (tmp_path / "pool.log").open("wb") as log:
        pool = start_serve(
            config,
            "--workers",
            "2",
            port=port,
            env=serve_env(pool=True),
            start_new_session=True,  # a pool is stopped whole
            stdout=log,
            stderr=log,
        )
    try:
        # A new connection per request, so the kernel spreads them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            # Each worker read the master before it listened; both have answered since.
            await until_each_worker_answers(http, f"http://127.0.0.1:{port}", pool.pid)
            samples = await scrape(http, f"http://127.0.0.1:{port}")
    finally:
        stop(pool, 20, group=True)
    # Two workers read the one master: the pool counts it once (the latest reading).
    assert policies(samples) == {"allkeys-lru": 1}, (tmp_path / "pool.log").read_text()
