"""Upstream keys back to health, and the key-state gauges (SPEC §14; upstream_probe.py).

A key an upstream 401 marked unhealthy is probed with its own credential on the protocol's
free model list, at most once per ``probe_interval_s`` across instances, and marked healthy
when it answers 2xx; the gauges show every key's state and headroom. Every test runs on
``memory://`` and on a real Redis (the ``storage`` fixture); a second "instance" is a second
storage client of the same server (on ``memory://``, the same one: one process by definition).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from ratelimit_gw import upstream_probe
from ratelimit_gw.app import WATCHER_STOP_S
from ratelimit_gw.metrics import UPSTREAM_ATTEMPT_OUTCOMES, create_metrics
from ratelimit_gw.services import SERVICES
from ratelimit_gw.settings import Provider, Settings, build_settings
from ratelimit_gw.storage import Storage, StorageError
from ratelimit_gw.testing.mock_upstream import MockSettings, MockState
from ratelimit_gw.upstream_client import UpstreamClient
from ratelimit_gw.upstream_key_gauges import KeyStateGauges
from ratelimit_gw.upstream_pool import Pool, PoolStore, pool_of
from ratelimit_gw.upstream_probe import UpstreamProbe, probe_request

from .conftest import UPSTREAM_KEY, Gateway, Upstream, another_client, start_gateway

KEYS = {"KEY_A": "sk-key-a-0123456789", "KEY_B": "sk-key-b-0123456789"}
CREDENTIAL_HEADER = {
    "openai": "Authorization",
    "anthropic": "x-api-key",
    "gemini": "x-goog-api-key",
}
MODELS_PATH = {"openai": "/v1/models", "anthropic": "/v1/models", "gemini": "/v1beta/models"}


@pytest.fixture(autouse=True)
def fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_probe, "TICK_S", 0.02)


@dataclass
class Probed:
    at: float  # monotonic
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class KeyedUpstream:
    """An upstream's model list that answers 200 to the secrets it accepts, else 401 (or
    never, while ``hang`` is set)."""

    url: str = ""
    accepted: set[str] = field(default_factory=set)
    hang: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)  # ends the hanging answers
    probes: list[Probed] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.probes.append(
            Probed(time.monotonic(), request.method, request.path, dict(request.headers))
        )
        if self.hang:
            await self.released.wait()
        credential = next(
            (request.headers[h] for h in CREDENTIAL_HEADER.values() if h in request.headers), ""
        )
        if credential.removeprefix("Bearer ") in self.accepted:
            return web.json_response({"data": []})
        return web.json_response({"error": {"message": "invalid key"}}, status=401)


@pytest.fixture
async def keyed() -> AsyncIterator[KeyedUpstream]:
    upstream = KeyedUpstream()
    app = web.Application()
    app.router.add_get("/{path:.*}", upstream.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield upstream
    finally:
        upstream.released.set()
        await runner.cleanup()


def pool_settings(
    base_url: str, protocol: str = "openai", probe_interval_s: float = 30, **key_b: Any
) -> Settings:
    """One provider ``main`` with keys ``a`` (ceilings rpm 10, tpm 1000) and ``b``."""
    provider = {
        "name": "main",
        "protocol": protocol,
        "base_url": base_url,
        "probe_interval_s": probe_interval_s,
        "timeout_s": 5,
        "keys": [
            {"name": "a", "api_key_env": "KEY_A", "rpm": 10, "tpm": 1000},
            {"name": "b", "api_key_env": "KEY_B", **key_b},
        ],
    }
    return build_settings({"providers": [provider]}, KEYS)


@asynccontextmanager
async def probing(
    storage: Storage, providers: Callable[[], Iterable[Provider]]
) -> AsyncIterator[UpstreamProbe]:
    """A probe loop running, as one gateway instance runs it; stopped at the end."""
    client = UpstreamClient()
    pools = PoolStore(storage)
    probe = UpstreamProbe(providers, pools, client, KeyStateGauges(create_metrics(None), pools))
    task = asyncio.create_task(probe.run())
    try:
        yield probe
    finally:
        probe.stop()
        task.cancel()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
        await client.close()


async def until(what: str, ready: Callable[[], Any], timeout_s: float = 5) -> None:
    """Wait for ``ready()`` (a bool, or an awaitable of one) to be true."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = ready()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, f"never {what}"
        await asyncio.sleep(0.02)


def probe_tasks() -> list[asyncio.Task[Any]]:
    """The probes in flight in this process."""
    return [t for t in asyncio.all_tasks() if "UpstreamProbe._probe" in repr(t.get_coro())]


async def unhealthy(storage: Storage, pool: Pool) -> set[str]:
    return await PoolStore(storage).unhealthy(pool)


# --- the probe ---------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["openai", "anthropic", "gemini"])
async def test_an_unhealthy_key_is_probed_with_its_own_credential_and_healthy_on_2xx(
    storage: Storage, keyed: KeyedUpstream, protocol: str
) -> None:
    settings = pool_settings(keyed.url, protocol)
    pool = pool_of(settings.providers["main"])
    await PoolStore(storage).mark_unhealthy(pool, "b")
    keyed.accepted = {KEYS["KEY_B"]}
    async with probing(storage, lambda: settings.providers.values()):

        async def healthy() -> bool:
            return await unhealthy(storage, pool) == set()

        await until("marked b healthy", healthy)
    (probe,) = keyed.probes  # only the unhealthy key, once
    assert (probe.method, probe.path) == ("GET", MODELS_PATH[protocol])
    sent = {name.lower(): value for name, value in probe.headers.items()}
    credential = CREDENTIAL_HEADER[protocol].lower()
    assert sent[credential].removeprefix("Bearer ") == KEYS["KEY_B"]
    assert KEYS["KEY_A"] not in str(probe.headers)
    if protocol == "anthropic":
        assert sent["anthropic-version"] == "2023-06-01"


async def test_a_key_the_upstream_still_refuses_stays_unhealthy_until_the_next_interval(
    storage: Storage, keyed: KeyedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    settings = pool_settings(keyed.url, probe_interval_s=30)
    pool = pool_of(settings.providers["main"])
    await PoolStore(storage).mark_unhealthy(pool, "b")
    caplog.set_level(logging.INFO, "ratelimit_gw.upstream")
    async with probing(storage, lambda: settings.providers.values()):
        await until("probed b", lambda: len(keyed.probes) == 1)
        await asyncio.sleep(0.3)  # many ticks: none probes again within the interval
    assert len(keyed.probes) == 1
    assert await unhealthy(storage, pool) == {"b"}
    (line,) = [r.getMessage() for r in caplog.records if "still unhealthy" in r.getMessage()]
    assert line.startswith("upstream key b of main still unhealthy: its probe (GET ")
    assert "answered 401; probing again in 30s" in line
    assert all(secret not in r.getMessage() for r in caplog.records for secret in KEYS.values())


async def test_a_probe_that_times_out_leaves_the_key_unhealthy(
    storage: Storage,
    keyed: KeyedUpstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(upstream_probe, "PROBE_TIMEOUT_S", 0.2)
    settings = pool_settings(keyed.url)
    pool = pool_of(settings.providers["main"])
    await PoolStore(storage).mark_unhealthy(pool, "b")
    keyed.accepted, keyed.hang = {KEYS["KEY_B"]}, True
    caplog.set_level(logging.INFO, "ratelimit_gw.upstream")
    async with probing(storage, lambda: settings.providers.values()):
        await until("probed b", lambda: len(keyed.probes) == 1)
        await until("gave up on the probe", lambda: not probe_tasks(), timeout_s=2)
    assert await unhealthy(storage, pool) == {"b"}
    assert "its probe (GET" in caplog.text and ") timed out; probing again in 30s" in caplog.text


async def test_two_instances_probe_a_key_once_per_interval(
    storage: Storage, keyed: KeyedUpstream
) -> None:
    interval_s = 0.5
    settings = pool_settings(keyed.url, probe_interval_s=interval_s)
    pool = pool_of(settings.providers["main"])
    await PoolStore(storage).mark_unhealthy(pool, "b")  # refused: stays unhealthy
    async with (
        another_client(storage) as other,
        probing(storage, lambda: settings.providers.values()),
        probing(other, lambda: settings.providers.values()),
    ):
        await asyncio.sleep(interval_s * 3.5)
    times = [p.at for p in keyed.probes]
    assert 3 <= len(times) <= 4
    gaps = [later - earlier for earlier, later in pairwise(times)]
    assert min(gaps) >= interval_s * 0.9, gaps


async def test_a_key_a_reload_removed_is_not_probed_and_an_added_one_is(
    storage: Storage, keyed: KeyedUpstream
) -> None:
    before = pool_settings(keyed.url)
    pools = PoolStore(storage)
    await pools.mark_unhealthy(pool_of(before.providers["main"]), "b")
    only_a = build_settings(
        {
            "providers": [
                {
                    "name": "main",
                    "protocol": "openai",
                    "base_url": keyed.url,
                    "keys": [{"name": "a", "api_key_env": "KEY_A"}],
                }
            ]
        },
        KEYS,
    )
    current = [only_a]
    keyed.accepted = {KEYS["KEY_B"]}
    async with probing(storage, lambda: current[0].providers.values()):
        await asyncio.sleep(0.2)
        assert keyed.probes == []  # b is not in the configuration
        current[0] = before  # a reload adds it back

        async def healthy() -> bool:
            return await unhealthy(storage, pool_of(before.providers["main"])) == set()

        await until("probed the added key", healthy)
    assert len(keyed.probes) == 1


class FailingFirst(PoolStore):
    """Storage that fails the first ``failures`` reads of the unhealthy keys."""

    def __init__(self, storage: Storage, failures: int) -> None:
        super().__init__(storage)
        self.failures = failures

    async def unhealthy(self, pool: Pool) -> set[str]:
        if self.failures:
            self.failures -= 1
            raise StorageError("storage call smembers failed at memory://: timed out")
        return await super().unhealthy(pool)


async def test_storage_errors_delay_the_probe_and_are_logged_once(
    storage: Storage, keyed: KeyedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    settings = pool_settings(keyed.url)
    pool = pool_of(settings.providers["main"])
    await PoolStore(storage).mark_unhealthy(pool, "b")
    keyed.accepted = {KEYS["KEY_B"]}
    pools = FailingFirst(storage, failures=10)
    client = UpstreamClient()
    probe = UpstreamProbe(
        lambda: settings.providers.values(),
        pools,
        client,
        KeyStateGauges(create_metrics(None), pools),
    )
    caplog.set_level(logging.INFO, "ratelimit_gw.upstream")
    task = asyncio.create_task(probe.run())
    try:

        async def healthy() -> bool:
            return await unhealthy(storage, pool) == set()

        await until("probed b once storage answered", healthy)
    finally:
        probe.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
    assert pools.failures == 0
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures == [
        "reading unhealthy upstream keys failed (storage call smembers failed at memory://: "
        "timed out); trying again"
    ]


async def test_stopping_ends_the_loop_and_its_probes_in_flight(
    storage: Storage, keyed: KeyedUpstream
) -> None:
    settings = pool_settings(keyed.url)
    await PoolStore(storage).mark_unhealthy(pool_of(settings.providers["main"]), "b")
    keyed.hang = True  # the probe waits up to PROBE_TIMEOUT_S (10 s)
    client = UpstreamClient()
    pools = PoolStore(storage)
    probe = UpstreamProbe(
        lambda: settings.providers.values(),
        pools,
        client,
        KeyStateGauges(create_metrics(None), pools),
    )
    task = asyncio.create_task(probe.run())
    await until("probed b", lambda: len(keyed.probes) == 1)
    assert len(probe_tasks()) == 1
    started = time.monotonic()
    probe.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert time.monotonic() - started < 1
    assert probe_tasks() == []
    await client.close()


async def test_gateway_shutdown_stops_the_probe_mid_probe(
    storage: Storage, keyed: KeyedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    keyed.hang = True
    runner, gw = await start_gateway(Upstream(keyed.url, MockState(MockSettings())), storage)
    try:
        pool = pool_of(gw.settings.providers["mock-openai"])
        await PoolStore(storage).mark_unhealthy(pool, "mock-openai")
        await until("probed the key", lambda: len(keyed.probes) == 1)
    finally:
        started = time.monotonic()
        await runner.cleanup()
    assert time.monotonic() - started < WATCHER_STOP_S
    assert probe_tasks() == []
    assert "did not stop" not in caplog.text


def test_the_probe_request_sends_the_key_over_the_providers_credential() -> None:
    # A key without a credential of its own relies on the provider's headers (an `api-key`
    # header written in config); a pool key's credential replaces the first key's.
    settings = build_settings(
        {
            "providers": [
                {
                    "name": "azure",
                    "protocol": "openai",
                    "base_url": "https://example.openai.azure.com/openai",
                    "headers": {"api-key": "${AZURE_KEY}", "OpenAI-Organization": "org-1"},
                }
            ]
        },
        {"AZURE_KEY": "azure-secret"},
    )
    azure = settings.providers["azure"]
    assert probe_request(azure, azure.keys[0]) == (
        "https://example.openai.azure.com/openai/v1/models",
        {"api-key": "azure-secret", "OpenAI-Organization": "org-1"},
    )
    main = pool_settings("https://api.example.com", "anthropic").providers["main"]
    url, headers = probe_request(main, main.keys[1])
    assert url == "https://api.example.com/v1/models"
    assert headers == {"anthropic-version": "2023-06-01", "x-api-key": KEYS["KEY_B"]}


# --- the gauges --------------------------------------------------------------------------------


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_the_gauges_show_each_keys_state_and_headroom(storage: Storage) -> None:
    settings = pool_settings("https://api.example.com", tpm=4000)
    provider = settings.providers["main"]
    pool = pool_of(provider)
    pools = PoolStore(storage)
    await pools.refund(pool, "a", -5, -250)  # an extra debit: half its rpm, 3/4 of its tpm
    await pools.cool_down(pool, "b", 60_000)
    registry = CollectorRegistry()
    gauges = KeyStateGauges(create_metrics(registry), pools)
    await gauges.refresh([provider])

    def state(key: str) -> dict[str, float | None]:
        return {
            s: sample(registry, "rlgw_upstream_key_state", provider="main", key=key, state=s)
            for s in ("ok", "cooling", "unhealthy")
        }

    assert state("a") == {"ok": 1, "cooling": 0, "unhealthy": 0}
    assert state("b") == {"ok": 0, "cooling": 1, "unhealthy": 0}
    headroom = "rlgw_upstream_key_headroom"
    assert sample(registry, headroom, provider="main", key="a", ceiling="rpm") == pytest.approx(
        0.5, abs=0.01
    )
    assert sample(registry, headroom, provider="main", key="a", ceiling="tpm") == pytest.approx(
        0.75, abs=0.01
    )
    assert sample(registry, headroom, provider="main", key="b", ceiling="tpm") == 1
    assert sample(registry, headroom, provider="main", key="b", ceiling="rpm") is None
    for outcome in UPSTREAM_ATTEMPT_OUTCOMES:  # from zero, so increase() sees the first
        attempts = {"provider": "main", "key": "b", "outcome": outcome}
        assert sample(registry, "rlgw_upstream_attempts_total", **attempts) == 0

    await pools.mark_unhealthy(pool, "a")
    await gauges.refresh([provider])
    assert state("a") == {"ok": 0, "cooling": 0, "unhealthy": 1}


async def test_a_key_or_ceiling_a_reload_removed_loses_its_series(storage: Storage) -> None:
    registry = CollectorRegistry()
    gauges = KeyStateGauges(create_metrics(registry), PoolStore(storage))
    await gauges.refresh(pool_settings("https://api.example.com").providers.values())
    assert sample(registry, "rlgw_upstream_key_state", provider="main", key="b", state="ok") == 1
    # A reload: key b gone, key a without its tpm ceiling.
    after = build_settings(
        {
            "providers": [
                {
                    "name": "main",
                    "protocol": "openai",
                    "base_url": "https://api.example.com",
                    "keys": [{"name": "a", "api_key_env": "KEY_A", "rpm": 10}],
                }
            ]
        },
        KEYS,
    )
    await gauges.refresh(after.providers.values())
    names = {
        (s.labels.get("key"), s.labels.get("state") or s.labels.get("ceiling"))
        for family in registry.collect()
        if family.name in ("rlgw_upstream_key_state", "rlgw_upstream_key_headroom")
        for s in family.samples
    }
    assert names == {("a", "ok"), ("a", "cooling"), ("a", "unhealthy"), ("a", "rpm")}


async def test_a_running_gateway_probes_its_keys_back(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    # The default gateway: one api_key_env key per provider, named after it, against the mock
    # upstream (whose model list answers any key).
    provider = gateway.settings.providers["mock-anthropic"]
    pool = pool_of(provider)
    await PoolStore(gateway.storage).mark_unhealthy(pool, "mock-anthropic")

    async def healthy() -> bool:
        return await unhealthy(gateway.storage, pool) == set()

    await until("probed the key back", healthy)
    (probe,) = [r for r in gateway.upstream.state.requests if r.method == "GET"]
    assert probe.path == "/v1/models"
    assert probe.headers["x-api-key"] == UPSTREAM_KEY
    assert probe.headers["anthropic-version"] == "2023-06-01"
    metrics = gateway.app[SERVICES].registry

    async def shown_ok() -> bool:
        labels = {"provider": "mock-anthropic", "key": "mock-anthropic", "state": "ok"}
        return metrics.get_sample_value("rlgw_upstream_key_state", labels) == 1

    await until("showed the key ok", shown_ok, timeout_s=upstream_probe.STATE_REFRESH_S + 2)
