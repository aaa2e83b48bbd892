"""Storage failures (§11): bounded timeouts, the circuit breaker, ``on_error`` and recovery.

Each test runs its own redis-server (with an fsync-always AOF, so a restarted server has its
data back) and a gateway with short storage timeouts, puts it under concurrent load, then
kills, freezes (SIGSTOP) or restarts Redis. Every request must finish within a bound derived
from the timeouts: never a hang. Afterwards the gateway must recover by itself.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from ratelimit_gw.accounts import AccountStore, LedgerEntry
from ratelimit_gw.app import create_app
from ratelimit_gw.money import parse_usd
from ratelimit_gw.serve import make_runner
from ratelimit_gw.services import SERVICES
from ratelimit_gw.settings import ConfigError, StorageSettings, build_settings
from ratelimit_gw.storage import Storage, StorageError, open_storage
from ratelimit_gw.storage.breaker import Breaker

from .conftest import ADMIN_TOKEN, UPSTREAM_KEY, Gateway, Upstream, gateway_config
from .redis_process import RedisProcess, start_redis

COMMAND_TIMEOUT_S = 0.3
CONNECT_TIMEOUT_S = 0.3
BREAKER_COOLDOWN_S = 0.5
# A request makes at most three storage calls before it is answered (key lookup: GET +
# HGETALL on a cold cache; admission), each bounded by the command timeout; the rest is the
# mock upstream and the loopback. Anything slower than this is a hang.
REQUEST_BOUND_S = 3 * COMMAND_TIMEOUT_S + 1.0
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")
BODY = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Outcome:
    status: int
    duration_s: float
    headers: Mapping[str, str]  # case-insensitive
    body: dict[str, Any]
    request_id: str


@dataclass
class Redis:
    """A restartable private redis-server: same port, same data directory."""

    first: RedisProcess
    later: list[RedisProcess] = field(default_factory=list)

    @property
    def current(self) -> RedisProcess:
        return self.later[-1] if self.later else self.first

    @property
    def url(self) -> str:
        return self.first.url

    def kill(self) -> None:
        self.current.process.kill()
        self.current.process.wait(5)

    def restart(self) -> None:
        self.later.append(start_redis(self.first.port, "--dir", self.first.directory, *DURABLE))

    def stop(self) -> None:
        for server in [*self.later, self.first]:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGCONT)  # a frozen server cannot stop
            server.stop()


@pytest.fixture
def redis() -> Iterator[Redis]:
    server = Redis(start_redis(None, *DURABLE))
    try:
        yield server
    finally:
        server.stop()


def short_timeouts(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": url,
        "command_timeout_s": COMMAND_TIMEOUT_S,
        "connect_timeout_s": CONNECT_TIMEOUT_S,
        "breaker_failures": 5,
        "breaker_cooldown_s": BREAKER_COOLDOWN_S,
        **extra,
    }


@asynccontextmanager
async def gateway_on(
    upstream: Upstream, redis: Redis, on_error: str = "reject", **extra: Any
) -> AsyncIterator[Gateway]:
    storage_settings = short_timeouts(redis.url, on_error=on_error, **extra)
    storage = open_storage(StorageSettings(**storage_settings))
    runner, gateway = await start_gateway_with(upstream, storage, storage_settings)
    try:
        yield gateway
    finally:
        await runner.cleanup()
        await storage.close()


async def start_gateway_with(
    upstream: Upstream, storage: Storage, storage_settings: dict[str, Any]
) -> tuple[web.AppRunner, Gateway]:
    """conftest.start_gateway, with a whole [storage] section (it only takes the URL)."""
    env = {"RLGW_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "RLGW_ADMIN_TOKEN": ADMIN_TOKEN}
    config = gateway_config(upstream.url, storage.url, storage=storage_settings)
    settings = build_settings(config, env)
    runner = make_runner(create_app(settings, storage))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return runner, Gateway(url, settings, storage, AccountStore(storage), upstream, runner.app)


async def post(session: aiohttp.ClientSession, gw: Gateway, key: str, rid: str) -> Outcome:
    started = time.monotonic()
    async with session.post(
        gw.url + "/v1/chat/completions",
        json=BODY,
        headers={"Authorization": f"Bearer {key}", "x-request-id": rid},
        timeout=aiohttp.ClientTimeout(total=20),
    ) as response:
        body = await response.json()
        return Outcome(
            response.status, time.monotonic() - started, response.headers.copy(), body, rid
        )


async def load(
    gw: Gateway,
    key: str,
    *,
    seconds: float,
    workers: int = 8,
    during: Callable[[float], None] | None = None,
) -> list[Outcome]:
    """``workers`` callers in a loop for ``seconds``; ``during(elapsed)`` runs between calls."""
    outcomes: list[Outcome] = []
    started = time.monotonic()
    counter = 0
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal counter
            while (elapsed := time.monotonic() - started) < seconds:
                if during is not None:
                    during(elapsed)
                counter += 1
                outcomes.append(await post(session, gw, key, f"req-load-{counter}"))

        await asyncio.gather(*(worker() for _ in range(workers)))
    return outcomes


async def until_passes(
    gw: Gateway, key: str, within_s: float, poll_s: float = 0.05
) -> tuple[Outcome, float]:
    """Send one request after another until one gets a 200; return it and the time taken."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        i = 0
        while True:
            i += 1
            outcome = await post(session, gw, key, f"req-probe-{i}-{time.monotonic_ns()}")
            if outcome.status == 200:
                return outcome, time.monotonic() - started
            assert time.monotonic() - started < within_s, (
                f"the gateway did not recover within {within_s}s: last {outcome.status} "
                f"{outcome.body}"
            )
            await asyncio.sleep(poll_s)


async def storage_back(gw: Gateway, within_s: float = 5) -> None:
    """Wait until storage answers again (which also closes the breaker)."""
    deadline = time.monotonic() + within_s
    while not await gw.storage.ping():
        assert time.monotonic() < deadline, "storage did not come back"
        await asyncio.sleep(0.05)


async def metric(gw: Gateway, name: str) -> float:
    """A metric's value from /metrics, summed over its label sets (0 when absent)."""
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as response:
        text = await response.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def assert_storage_unavailable(outcome: Outcome) -> None:
    assert outcome.status == 503
    assert outcome.body["error"]["type"] == "api_error"
    assert outcome.body["error"]["code"] == "503"
    assert outcome.body["error"]["reason"] == "storage_unavailable"
    assert int(outcome.headers["retry-after"]) >= 1
    assert int(outcome.headers["retry-after-ms"]) >= 1000
    assert outcome.headers["x-request-id"] == outcome.request_id


async def whole_ledger(gw: Gateway, account: str) -> list[LedgerEntry]:
    """Every ledger entry, read on a storage of the test's own with a roomy timeout.

    This is the check, not the system under test: the gateway's storage here has a 0.3 s
    command timeout, which reading thousands of entries can exceed on a loaded CI machine.
    memory:// lives inside the gateway's own storage object, so it is read there (no socket).
    """
    if gw.storage.url.startswith("memory://"):
        return await gw.accounts.ledger(account, limit=100_000)
    reader = open_storage(StorageSettings(url=gw.storage.url, command_timeout_s=10.0))
    try:
        return await AccountStore(reader).ledger(account, limit=100_000)
    finally:
        await reader.close()


async def charged_nano(gw: Gateway, account: str = "acme") -> int:
    """Σ cost of every settlement in the ledger."""
    ledger = await whole_ledger(gw, account)
    return sum(parse_usd(e.cost_usd or "0") for e in ledger if e.type in ("charge", "release"))


async def charged_request_ids(gw: Gateway, account: str = "acme") -> list[str]:
    ledger = await whole_ledger(gw, account)
    return [e.request_id or "" for e in ledger if e.type in ("charge", "release")]


# ---------------------------------------------------------------- kill, freeze, restart


@pytest.mark.slow  # ~4 s: waits out a killed redis-server
async def test_killed_redis_under_load_gives_typed_503s_then_recovers_by_itself(
    upstream: Upstream, redis: Redis
) -> None:
    async with gateway_on(upstream, redis) as gw:
        key = await gw.new_key(balance_usd="100.00")
        balance_before = (await gw.accounts.get_account("acme")).balance_usd
        killed_at: list[float] = []

        def kill_after_one_second(elapsed: float) -> None:
            if elapsed > 1.0 and not killed_at:
                killed_at.append(time.monotonic())
                redis.kill()

        outcomes = await load(gw, key, seconds=2.5, during=kill_after_one_second)

        assert killed_at, "the load ended before Redis was killed"
        slowest = max(o.duration_s for o in outcomes)
        assert slowest < REQUEST_BOUND_S, f"a request took {slowest:.2f}s"
        assert {o.status for o in outcomes} == {200, 503}
        failed = [o for o in outcomes if o.status == 503]
        for outcome in failed:
            assert_storage_unavailable(outcome)
        # The breaker opened: failures are answered at once, not after a timeout each.
        storage = gw.app[SERVICES].storage
        assert storage.breaker.state in ("open", "half_open")
        assert await metric(gw, "rlgw_breaker_state") >= 1
        assert await metric(gw, "rlgw_storage_errors_total") > 0
        assert await metric(gw, "rlgw_rejections_total") >= len(failed)
        fast = [o for o in failed if o.duration_s < COMMAND_TIMEOUT_S / 3]
        assert len(fast) > len(failed) / 2, "the breaker did not make failures fail fast"

        redis.restart()
        _, recovery_s = await until_passes(gw, key, within_s=5)
        assert recovery_s < 5
        assert storage.breaker.state == "closed"
        assert await metric(gw, "rlgw_breaker_state") == 0

        # Nothing was lost across the outage: every request that got a 200 was charged
        # exactly once (settlements in flight at the kill were retried after the restart).
        await gw.settled(20)
        served = sorted(o.request_id for o in outcomes if o.status == 200)
        charged = await charged_request_ids(gw)
        probe_ids = [rid for rid in charged if rid.startswith("req-probe-")]
        assert sorted(rid for rid in charged if rid.startswith("req-load-")) == served
        assert len(probe_ids) == 1
        balance_after = (await gw.accounts.get_account("acme")).balance_usd
        assert parse_usd(balance_after) == parse_usd(balance_before) - await charged_nano(gw)


@pytest.mark.slow  # ~5 s: waits out a frozen redis-server
async def test_frozen_redis_times_out_within_the_bound_and_recovers_when_it_resumes(
    upstream: Upstream, redis: Redis
) -> None:
    """SIGSTOP: connections still open, but nothing answers. Only timeouts can help."""
    async with gateway_on(upstream, redis) as gw:
        key = await gw.new_key()
        frozen: list[bool] = []

        def freeze_after_half_a_second(elapsed: float) -> None:
            if elapsed > 0.5 and not frozen:
                frozen.append(True)
                redis.current.process.send_signal(signal.SIGSTOP)

        try:
            outcomes = await load(gw, key, seconds=2.5, during=freeze_after_half_a_second)
        finally:
            redis.current.process.send_signal(signal.SIGCONT)

        slowest = max(o.duration_s for o in outcomes)
        assert slowest < REQUEST_BOUND_S, f"a request took {slowest:.2f}s"
        failed = [o for o in outcomes if o.status != 200]
        assert failed, "no request saw the frozen Redis"
        for outcome in failed:
            assert_storage_unavailable(outcome)
        # Some waited the command timeout (that is how a frozen server is noticed)...
        assert any(o.duration_s >= COMMAND_TIMEOUT_S for o in failed)
        # ...then the breaker answered the rest at once.
        assert sum(o.duration_s < COMMAND_TIMEOUT_S / 3 for o in failed) > len(failed) / 2

        _, recovery_s = await until_passes(gw, key, within_s=5)
        assert recovery_s < 5
        await gw.settled(20)


async def test_restarted_empty_redis_reloads_the_scripts(upstream: Upstream, redis: Redis) -> None:
    """A restart (or failover) loses the script cache: NOSCRIPT → the scripts load again."""
    async with gateway_on(upstream, redis) as gw:
        key = await gw.new_key(balance_usd="1.00")
        assert (await until_passes(gw, key, within_s=1))[0].status == 200
        redis.kill()
        redis.restart()
        assert await gw.storage.call("SCRIPT EXISTS", "0" * 40) == [0]
        outcome, _ = await until_passes(gw, key, within_s=5)
        await gw.settled(20)
        assert outcome.request_id in await charged_request_ids(gw)


async def test_script_flush_on_a_live_gateway_is_invisible_to_callers(gateway: Gateway) -> None:
    key = await gateway.new_key(balance_usd="1.00", rpm=100)
    async with aiohttp.ClientSession() as session:
        first = await post(session, gateway, key, "req-before-flush")
        await gateway.storage.call("SCRIPT FLUSH")
        second = await post(session, gateway, key, "req-after-flush")
    assert (first.status, second.status) == (200, 200)
    assert second.headers["x-ratelimit-remaining-requests"] == "98"
    await gateway.settled(20)
    assert sorted(await charged_request_ids(gateway)) == ["req-after-flush", "req-before-flush"]


# ---------------------------------------------------------------- on_error = "allow"


async def test_allow_policy_serves_known_keys_without_limits_and_counts_each_bypass(
    upstream: Upstream, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # key_cache_ttl_s = 0: every request looks its key up, so during the outage the key is
    # recognised only from the expired entry of an earlier lookup.
    async with gateway_on(upstream, redis, on_error="allow", key_cache_ttl_s=0) as gw:
        key = await gw.new_key(balance_usd="1.00", rpm=3)
        stranger = await gw.new_key(account="other", balance_usd="1.00")  # never used here
        async with aiohttp.ClientSession() as session:
            warm = await post(session, gw, key, "req-warm")  # the key is now known locally
            assert warm.status == 200
            await gw.settled(20)
            balance_before = (await gw.accounts.get_account("acme")).balance_usd
            redis.kill()
            during = [await post(session, gw, key, f"req-bypass-{i}") for i in range(6)]
            unknown = await post(session, gw, stranger, "req-unknown-key")

        # rpm = 3 would refuse half of these: no limits apply while storage is down.
        assert [o.status for o in during] == [200] * 6
        assert all(o.duration_s < REQUEST_BOUND_S for o in during)
        assert all("x-ratelimit-limit-requests" not in o.headers for o in during)
        assert await metric(gw, "rlgw_storage_bypass_total") == 6
        logged = [
            r.getMessage()
            for r in caplog.records
            if r.name == "ratelimit_gw.storage"
            and r.levelname == "WARNING"
            and r.getMessage().startswith("storage failed; serving")  # not the breaker's
        ]
        assert [m.split()[3] for m in logged] == [f"req-bypass-{i}" for i in range(6)]
        assert all("for account acme without limits or balance" in m for m in logged)
        # A key this process never saw cannot be attributed to anyone: refused.
        assert_storage_unavailable(unknown)

        redis.restart()
        await storage_back(gw)
        async with aiohttp.ClientSession() as session:
            after = await post(session, gw, key, "req-after")
        assert after.status == 200
        assert after.headers["x-ratelimit-limit-requests"] == "3"  # limits apply again
        assert await metric(gw, "rlgw_storage_bypass_total") == 6
        await gw.settled(20)
        # Bypassed requests were never settled: no charge, no ledger entry, no hold.
        assert sorted(await charged_request_ids(gw)) == ["req-after", "req-warm"]
        account = await gw.accounts.get_account("acme")
        assert account.held_usd == "0.00"
        # Only req-after's charge moved the balance.
        ledger = await gw.accounts.ledger("acme")
        after = [e for e in ledger if e.request_id == "req-after"]
        after_cost = sum(parse_usd(e.cost_usd or "0") for e in after)
        assert after_cost > 0
        assert parse_usd(account.balance_usd) == parse_usd(balance_before) - after_cost


async def test_reject_policy_never_serves_without_storage(upstream: Upstream, redis: Redis) -> None:
    async with gateway_on(upstream, redis, on_error="reject") as gw:
        key = await gw.new_key()
        async with aiohttp.ClientSession() as session:
            assert (await post(session, gw, key, "req-warm")).status == 200
            await gw.settled(20)
            redis.kill()
            outcomes = [await post(session, gw, key, f"req-{i}") for i in range(4)]
        for outcome in outcomes:
            assert_storage_unavailable(outcome)
        assert len(upstream.state.requests) == 1  # nothing reached the provider
        assert await metric(gw, "rlgw_storage_bypass_total") == 0


def test_on_error_accepts_reject_and_allow_only() -> None:
    for policy in ("reject", "allow"):
        settings = build_settings({"storage": {"on_error": policy}}, {})
        assert settings.storage.on_error == policy
    with pytest.raises(ConfigError, match=r"^storage.on_error: 'ignore' is not one of"):
        build_settings({"storage": {"on_error": "ignore"}}, {})


def test_wait_replicas_is_refused_where_there_are_no_replicas() -> None:
    with pytest.raises(ConfigError, match=r"^storage.wait_replicas: memory:// has no replicas"):
        open_storage(StorageSettings(url="memory://", wait_replicas=1))
    with pytest.raises(ConfigError, match=r"^storage.wait_replicas: not supported"):
        open_storage(StorageSettings(url="redis+cluster://127.0.0.1:1", wait_replicas=1))


# ---------------------------------------------------------------- the breaker itself


def test_breaker_opens_after_consecutive_failures_and_half_opens_after_cooldown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr("ratelimit_gw.storage.breaker.time.monotonic", lambda: now[0])
    changes: list[str] = []
    breaker = Breaker(failure_threshold=3, cooldown_s=2.0, on_change=changes.append)

    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    breaker.record_success()  # a success in between resets the count
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert breaker.retry_after_s() == 2.0

    now[0] += 1.5
    assert not breaker.allow()
    assert breaker.retry_after_s() == pytest.approx(0.5)
    now[0] += 0.5
    assert breaker.allow()  # the one trial call
    assert breaker.state == "half_open"
    assert not breaker.allow()  # everyone else still fails fast
    breaker.record_failure()  # the trial failed: open again, for a full cooldown
    assert breaker.state == "open"
    assert not breaker.allow()
    now[0] += 2.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow() and breaker.allow()
    assert changes == ["open", "half_open", "open", "half_open", "closed"]


async def test_a_cancelled_trial_call_does_not_wedge_the_breaker_half_open() -> None:
    storage = open_storage(
        StorageSettings(url="memory://", breaker_failures=1, breaker_cooldown_s=0.05)
    )
    try:

        async def failing() -> None:
            raise ConnectionError("down")

        with pytest.raises(StorageError):
            await storage._guarded("test", failing)
        assert storage.breaker.state == "open"
        await asyncio.sleep(0.06)

        async def hanging() -> None:
            await asyncio.sleep(10)

        trial = asyncio.create_task(storage._guarded("test", hanging))
        await asyncio.sleep(0.01)
        assert storage.breaker.state == "half_open"
        trial.cancel()  # the client went away mid-call
        with pytest.raises(asyncio.CancelledError):
            await trial
        # The next call is let through as the new trial, and its success closes the breaker.
        assert await storage.call("PING") in (True, "PONG")
        assert storage.breaker.state == "closed"
    finally:
        await storage.close()


async def test_storage_calls_are_bounded_by_the_command_timeout() -> None:
    storage = open_storage(
        StorageSettings(url="memory://", command_timeout_s=0.1, breaker_failures=100)
    )
    try:

        async def slow() -> None:
            await asyncio.sleep(5)

        started = time.monotonic()
        with pytest.raises(
            StorageError, match=r"^storage call slow failed at memory://: timed out$"
        ):
            await storage._guarded("slow", slow)
        assert time.monotonic() - started < 0.1 + 0.2
    finally:
        await storage.close()


async def test_unreachable_redis_fails_within_the_connect_timeout() -> None:
    # A non-routable address: connect() hangs until the timeout fires.
    storage = open_storage(
        StorageSettings(
            url="redis://10.255.255.1:6379/0", connect_timeout_s=0.2, command_timeout_s=0.2
        )
    )
    try:
        started = time.monotonic()
        with pytest.raises(StorageError):
            await storage.call("PING")
        assert time.monotonic() - started < 0.2 + 0.3
        assert math.isfinite(storage.breaker.retry_after_s())
    finally:
        await storage.close()


async def test_error_replies_do_not_open_the_breaker_but_dead_storage_does() -> None:
    """An error reply (e.g. an integer overflow from an absurd top-up) means Redis is up:
    it must not take the gateway down for everyone by opening the breaker."""
    storage = open_storage(StorageSettings(url="memory://", breaker_failures=3))
    try:
        await storage.call("SET", "n", "9223372036854775807")
        for _ in range(10):
            with pytest.raises(StorageError, match="at memory://: ERR increment or decrement"):
                await storage.call("INCRBY", "n", 1)
        assert storage.breaker.state == "closed"
        assert await storage.call("GET", "n") == "9223372036854775807"

        async def refused() -> None:
            raise ConnectionRefusedError("down")

        for _ in range(3):
            with pytest.raises(StorageError):
                await storage._guarded("test", refused)
        assert storage.breaker.state == "open"
    finally:
        await storage.close()


async def test_retry_after_is_the_time_until_the_breakers_next_trial(
    upstream: Upstream, redis: Redis
) -> None:
    async with gateway_on(upstream, redis, breaker_cooldown_s=3.0) as gw:
        key = await gw.new_key()
        async with aiohttp.ClientSession() as session:
            assert (await post(session, gw, key, "req-warm")).status == 200
            await gw.settled(20)
            redis.kill()
            for i in range(5):  # breaker_failures consecutive failures open it
                closed = await post(session, gw, key, f"req-closed-{i}")
                assert_storage_unavailable(closed)
            assert gw.storage.breaker.state == "open"
            opened = await post(session, gw, key, "req-open")
        assert_storage_unavailable(opened)
        assert 2000 < int(opened.headers["retry-after-ms"]) <= 3000
        assert opened.headers["retry-after"] == "3"
