"""Webhooks (SPEC §15; docs/webhooks.md) delivered to a real HTTP receiver.

Events go to a durable outbox in storage under deterministic ids, are claimed by one
deliverer at a time, signed the Standard Webhooks way and retried with backoff for their
lifetime; a dead receiver never slows a request. Tests that need two instances run them on
one Redis (two storage clients) and on ``memory://`` (one storage shared by two apps: one
process by definition).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ratelimit_gw import webhook_delivery
from ratelimit_gw.management import iso
from ratelimit_gw.services import SERVICES
from ratelimit_gw.settings import ConfigError, parse_settings
from ratelimit_gw.storage import Storage
from ratelimit_gw.upstream_pool import PoolStore, pool_of
from ratelimit_gw.webhook_delivery import signature

from .cli_helpers import cli, cli_json
from .conftest import ADMIN_TOKEN, Gateway, Upstream, another_client, start_gateway

SECRET = "whsec_" + base64.b64encode(b"a-test-secret-of-32-bytes-length").decode()
ENV = {"WEBHOOK_SECRET": SECRET}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
FAST_DELIVERY = {
    "poll_interval_s": 0.02,
    "first_retry_s": 0.05,
    "max_retry_s": 0.2,
    "timeout_s": 2.0,
    "lifetime_s": 60.0,
    "key_scan_interval_s": 0.1,
}


@pytest.fixture(autouse=True)
def fast_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook_delivery, "UPSTREAM_SCAN_S", 0.05)
    monkeypatch.setattr(webhook_delivery, "ENDPOINTS_REFRESH_S", 0.05)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


@dataclass
class Receiver:
    """A webhook receiver: records every POST, answers ``status`` (or hangs while ``hang``)."""

    url: str = ""
    status: int = 200
    hang: bool = False
    calls: list[Received] = field(default_factory=list)
    delivered: list[Received] = field(default_factory=list)  # the calls answered 2xx

    async def handle(self, request: web.Request) -> web.Response:
        call = Received(dict(request.headers), await request.read())
        self.calls.append(call)
        if self.hang:
            await asyncio.sleep(3600)
        if 200 <= self.status < 300:
            self.delivered.append(call)
        return web.Response(status=self.status)

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.delivered) < count:
            assert time.monotonic() < deadline, f"{len(self.delivered)} of {count} delivered"
            await asyncio.sleep(0.02)
        return self.delivered


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hook", state.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield state
    finally:
        await runner.cleanup()


def webhooks_config(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    hook = {
        "url": receiver.url,
        "secret_env": "WEBHOOK_SECRET",
        "events": ["balance.low", "key.expiring", "upstream_key.unhealthy"],
        "balance_below_usd": "0.99999",
        "key_expiring_within_s": 3600,
    }
    return {"webhooks": [hook], "webhook_delivery": {**FAST_DELIVERY, **extra}}


@asynccontextmanager
async def gateway_on(
    upstream: Upstream, storage: Storage, receiver: Receiver, **extra: Any
) -> AsyncIterator[Gateway]:
    runner, gw = await start_gateway(upstream, storage, ENV, **webhooks_config(receiver, **extra))
    try:
        yield gw
    finally:
        await runner.cleanup()


def verify(received: Received, secret: str = SECRET) -> bool:
    """What a receiver does (docs/webhooks.md): the Standard Webhooks check."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, timestamp = received.headers["webhook-id"], received.headers["webhook-timestamp"]
    signed = f"{msg_id}.{timestamp}.".encode() + received.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [s.partition(",")[2] for s in received.headers["webhook-signature"].split()]
    return any(hmac.compare_digest(expected, sig) for sig in offered)


async def chat(http: aiohttp.ClientSession, gw: Gateway, key: str) -> tuple[int, Any, float]:
    started = time.monotonic()
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        body = await response.json()
        return response.status, body, time.monotonic() - started


def sample(gw: Gateway, name: str, **labels: str) -> float:
    return gw.app[SERVICES].registry.get_sample_value(name, labels) or 0.0


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        assert time.monotonic() < deadline, "never came true"
        await asyncio.sleep(0.02)


# --- delivery --------------------------------------------------------------------------------


async def test_balance_low_is_delivered_signed(
    upstream: Upstream, storage: Storage, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    async with gateway_on(upstream, storage, receiver) as gw:
        key = await gw.new_key(balance_usd="1.00")
        status, _, _ = await chat(http, gw, key)
        assert status == 200
        (call,) = await receiver.wait_for(1)
        assert verify(call)
        assert not verify(call, "whsec_" + base64.b64encode(b"another").decode())
        payload = call.payload
        assert payload["type"] == "balance.low" and payload["account"] == "acme"
        assert payload["id"] == call.id
        assert call.id.startswith("balance.low:acme:999990000:")
        assert set(payload) == {"id", "type", "created_at", "account", "data"}
        account = await gw.accounts.get_account("acme")
        assert payload["data"]["balance_usd"] == account.balance_usd
        assert payload["data"]["threshold_usd"] == "0.99999"
        assert abs(int(call.headers["webhook-timestamp"]) - time.time()) < 30
        assert call.headers["webhook-signature"] == signature(
            base64.b64decode(SECRET[6:]), call.id, int(call.headers["webhook-timestamp"]), call.body
        )
        await eventually(
            lambda: (
                sample(gw, "rlgw_webhook_deliveries_total", type="balance.low", outcome="delivered")
                == 1
            )
        )
        assert sample(gw, "rlgw_webhook_events_raised_total", type="balance.low") == 1
        status, _, _ = await chat(http, gw, key)  # below already: no second crossing
        await asyncio.sleep(0.3)
        assert len(receiver.calls) == 1


async def test_a_metered_account_never_raises_balance_low(
    upstream: Upstream, storage: Storage, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    async with gateway_on(upstream, storage, receiver) as gw:
        key = await gw.new_key()  # no balance: metered
        for _ in range(3):
            assert (await chat(http, gw, key))[0] == 200
        await asyncio.sleep(0.3)
        assert receiver.calls == []


async def test_a_failing_receiver_is_retried_with_the_same_id_and_body(
    upstream: Upstream, storage: Storage, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    receiver.status = 500
    async with gateway_on(upstream, storage, receiver) as gw:
        key = await gw.new_key(balance_usd="1.00")
        assert (await chat(http, gw, key))[0] == 200
        await eventually(lambda: len(receiver.calls) >= 3)
        receiver.status = 200
        (call,) = await receiver.wait_for(1)
        assert {c.id for c in receiver.calls} == {call.id}
        assert {c.body for c in receiver.calls} == {call.body}
        assert all(verify(c) for c in receiver.calls)
        failed = sample(gw, "rlgw_webhook_deliveries_total", type="balance.low", outcome="failed")
        assert failed == len(receiver.calls) - 1
        await eventually(
            lambda: (
                sample(gw, "rlgw_webhook_deliveries_total", type="balance.low", outcome="delivered")
                == 1
            )
        )
        await eventually(lambda: _depth(gw.storage, 0))


async def _depth(storage: Storage, expected: int) -> bool:
    return int(await storage.call("ZCARD", "rlgw:{wh}:outbox")) == expected


async def test_retries_back_off(
    upstream: Upstream, storage: Storage, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    receiver.status = 503
    async with gateway_on(upstream, storage, receiver, max_retry_s=10.0, first_retry_s=0.1) as gw:
        key = await gw.new_key(balance_usd="1.00")
        assert (await chat(http, gw, key))[0] == 200
        await eventually(lambda: len(receiver.calls) >= 5)
        # Each wait is as long as the event has waited so far: 0.1, 0.1, 0.2, 0.4 (±10 %).
        gaps = [b.at - a.at for a, b in pairwise(receiver.calls)][:4]
        assert gaps[0] >= 0.08
        assert gaps[3] >= 3 * gaps[0]
        assert all(later >= 0.8 * earlier for earlier, later in pairwise(gaps))


async def test_an_event_past_its_lifetime_is_dropped_and_counted(
    upstream: Upstream, storage: Storage, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    receiver.status = 500
    async with gateway_on(upstream, storage, receiver, lifetime_s=0.5) as gw:
        key = await gw.new_key(balance_usd="1.00")
        assert (await chat(http, gw, key))[0] == 200
        await eventually(
            lambda: (
                sample(gw, "rlgw_webhook_deliveries_total", type="balance.low", outcome="dropped")
                == 1
            )
        )
        assert await _depth(gw.storage, 0)
        attempts = len(receiver.calls)
        assert attempts >= 1
        await asyncio.sleep(0.3)
        assert len(receiver.calls) == attempts  # never again


async def test_two_instances_crossing_the_same_threshold_raise_one_event(
    upstream: Upstream, storage: Storage, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    async with (
        gateway_on(upstream, storage, receiver) as first,
        another_client(storage) as other,
        gateway_on(upstream, other, receiver) as second,
    ):
        key = await first.new_key(balance_usd="1.00")
        # ~14 µUSD a request: the first request takes the balance below 0.99999.
        answers = await asyncio.gather(
            *(chat(http, gw, key) for gw in (first, second) for _ in range(12))
        )
        assert all(status == 200 for status, _, _ in answers)
        await receiver.wait_for(1)
        await asyncio.sleep(0.5)  # time for any second event to show up
        assert len({c.id for c in receiver.calls}) == 1
        raised = sum(
            sample(gw, "rlgw_webhook_events_raised_total", type="balance.low")
            for gw in (first, second)
        )
        assert raised == 1


async def test_requests_are_unaffected_while_the_receiver_is_down(
    upstream: Upstream, storage: Storage, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    async with gateway_on(upstream, storage, receiver, timeout_s=5.0) as gw:
        key = await gw.new_key(balance_usd="10.00")
        before = [await chat(http, gw, key) for _ in range(5)]
        receiver.hang = True  # accepts the connection, never answers
        # Just above the threshold (0.99999): the next request crosses it.
        await storage.call("HSET", "rlgw:{a:acme}:account", "balance_nano", 999_995_000)
        during = [await chat(http, gw, key) for _ in range(5)]
        await eventually(lambda: len(receiver.calls) >= 1)
        during += [await chat(http, gw, key) for _ in range(5)]
        assert all(status == 200 for status, _, _ in before + during)
        assert {json.dumps(b["choices"]) for _, b, _ in during} == {
            json.dumps(b["choices"]) for _, b, _ in before
        }
        slowest_before = max(t for _, _, t in before)
        assert max(t for _, _, t in during) < slowest_before + 0.5


async def test_a_crash_before_delivery_loses_nothing(
    upstream: Upstream,
    redis_storage: Storage,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    receiver.status = 503
    async with gateway_on(upstream, redis_storage, receiver) as first:
        key = await first.new_key(balance_usd="1.00")
        assert (await chat(http, first, key))[0] == 200
        await eventually(lambda: len(receiver.calls) >= 1)
    failed_id = receiver.calls[0].id
    assert await _depth(redis_storage, 1)  # the first instance is gone; the event is not
    receiver.status = 200
    async with another_client(redis_storage) as other, gateway_on(upstream, other, receiver):
        (call,) = await receiver.wait_for(1)
        assert call.id == failed_id and verify(call)


async def test_a_lapsed_claim_is_delivered_by_another_instance(storage: Storage) -> None:
    from ratelimit_gw.webhook_outbox import Outbox

    outbox = Outbox(storage)
    assert await outbox.raise_event("global:x", "e1", "balance.low", "acme", {}, 60)
    assert not await outbox.raise_event("global:x", "e1", "balance.low", "acme", {}, 60)
    _, claimed = await outbox.claim(10, 200)
    assert [c.record.event_id for c in claimed] == ["e1"]
    _, again = await outbox.claim(10, 200)
    assert again == []  # leased to the first claimer
    await asyncio.sleep(0.3)  # …which died: its lease lapses
    _, taken_over = await outbox.claim(10, 200)
    assert [c.delivery_id for c in taken_over] == ["global:x/e1"]
    await outbox.delivered("global:x/e1")
    assert await outbox.depth() == 0
    assert not await outbox.raise_event("global:x", "e1", "balance.low", "acme", {}, 60)


# --- scanned events --------------------------------------------------------------------------


async def test_an_unhealthy_upstream_key_raises_one_event_per_episode(
    upstream: Upstream, storage: Storage, receiver: Receiver
) -> None:
    async with (
        gateway_on(upstream, storage, receiver) as first,
        another_client(storage) as other,
        gateway_on(upstream, other, receiver),
    ):
        pool = pool_of(first.settings.providers["mock-openai"])
        pools = PoolStore(storage)
        await pools.mark_unhealthy(pool, "mock-openai")
        await pools.mark_unhealthy(pool, "mock-openai")  # another 401: the same episode
        (call,) = await receiver.wait_for(1)
        payload = call.payload
        assert payload["type"] == "upstream_key.unhealthy" and payload["account"] is None
        assert payload["data"]["provider"] == "mock-openai"
        assert payload["data"]["key"] == "mock-openai"
        # The probe finds the key answers and marks it healthy; a later 401 is a new episode.
        await eventually(lambda: _healthy(pools, pool))
        await pools.mark_unhealthy(pool, "mock-openai")
        calls = await receiver.wait_for(2)
        assert len({c.id for c in calls}) == 2
        await asyncio.sleep(0.3)
        assert len({c.id for c in receiver.calls}) == 2


async def _healthy(pools: PoolStore, pool: Any) -> bool:
    return not await pools.unhealthy(pool)


async def test_a_key_expiring_soon_raises_one_event(
    upstream: Upstream, storage: Storage, receiver: Receiver
) -> None:
    async with (
        gateway_on(upstream, storage, receiver) as first,
        another_client(storage) as other,
        gateway_on(upstream, other, receiver),
    ):
        await first.accounts.create_account("acme")
        soon = await first.accounts.create_key(
            "acme", expires_at=iso(int(time.time() * 1000) + 600_000)
        )
        await first.accounts.create_key(
            "acme", expires_at=iso(int(time.time() * 1000) + 86_400_000)
        )
        await first.accounts.create_key("acme")
        (call,) = await receiver.wait_for(1)
        assert call.payload["type"] == "key.expiring"
        assert call.payload["data"] == {
            "key_id": soon.record.id,
            "expires_at": soon.record.expires_at,
        }
        await asyncio.sleep(0.5)  # several scans later: still one event
        assert len({c.id for c in receiver.calls}) == 1


# --- configuration ---------------------------------------------------------------------------


def _config(**hook: Any) -> str:
    fields = {"url": "https://hooks.example/x", "secret_env": "WEBHOOK_SECRET", **hook}
    lines = ["[[webhooks]]"] + [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ({"events": []}, "webhooks[0].events: name at least one event"),
        ({"events": ["balance.lo"]}, "webhooks[0].events[0]: unknown event 'balance.lo'"),
        ({"events": ["balance.low"]}, "webhooks[0].balance_below_usd: required by the event"),
        (
            {"events": ["key.expiring"], "key_expiring_within_s": 60, "balance_below_usd": "1"},
            "webhooks[0].balance_below_usd: set, but the event 'balance.low' is not in events",
        ),
        (
            {"events": ["upstream_key.unhealthy"], "url": "ftp://x"},
            "webhooks[0].url: must be an http:// or https:// URL",
        ),
        (
            {"events": ["upstream_key.unhealthy"], "secret_env": "UNSET_SECRET"},
            "webhooks[0].secret_env: environment variable UNSET_SECRET is not set",
        ),
        (
            {"events": ["balance.low"], "balance_below_usd": "1.0000000001"},
            "webhooks[0].balance_below_usd:",
        ),
        ({"events": ["upstream_key.unhealthy"], "verb": 1}, "webhooks[0].verb: unknown field"),
    ],
)
def test_bad_webhook_config_names_the_field(hook: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings(_config(**hook), ENV)
    assert str(raised.value).startswith(message), str(raised.value)


def test_retries_cannot_start_above_their_cap() -> None:
    text = "[webhook_delivery]\nfirst_retry_s = 60\nmax_retry_s = 30\n"
    with pytest.raises(ConfigError, match=r"^webhook_delivery.first_retry_s: 60 is above max_r"):
        parse_settings(text, ENV)


def test_two_webhooks_with_one_url_are_refused() -> None:
    text = _config(events=["upstream_key.unhealthy"]) * 2
    with pytest.raises(ConfigError, match=r"webhooks\[1\].url: another webhook has the same URL"):
        parse_settings(text, ENV)


# --- an account's own webhook (admin API and CLI) ----------------------------------------------

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def admin_call(
    http: aiohttp.ClientSession, gw: Gateway, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, gw.url + path, json=body, headers=ADMIN) as response:
        return response.status, await response.json()


async def test_an_account_webhook_gets_its_own_accounts_events_signed_with_its_own_secret(
    upstream: Upstream, storage: Storage, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    env = {**ENV, "RLGW_ADMIN_TOKEN": ADMIN_TOKEN}
    delivery = {"webhook_delivery": FAST_DELIVERY}
    runner, gw = await start_gateway(upstream, storage, env, **delivery)  # no global webhook
    try:
        acme_key = await gw.new_key("acme", balance_usd="1.00")
        other_key = await gw.new_key("other", balance_usd="1.00")
        hook = {
            "url": receiver.url,
            "events": ["balance.low"],
            "balance_below_usd": "0.99999",
        }
        status, made = await admin_call(http, gw, "PUT", "/admin/accounts/acme/webhook", hook)
        assert status == 200, made
        secret = made["webhook"]["secret"]
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
        status, shown = await admin_call(http, gw, "GET", "/admin/accounts/acme/webhook")
        assert status == 200 and shown["webhook"]["secret"] is None
        assert shown["webhook"]["balance_below_usd"] == "0.99999"
        # A change keeps the secret (and does not show it); only new_secret makes another.
        status, changed = await admin_call(
            http,
            gw,
            "PUT",
            "/admin/accounts/acme/webhook",
            {**hook, "balance_below_usd": "0.99999"},
        )
        assert status == 200 and changed["webhook"]["secret"] is None
        await asyncio.sleep(0.5)  # every instance reads accounts' webhooks (here every 0.05 s)
        for key in (acme_key, other_key):
            assert (await chat(http, gw, key))[0] == 200
        (call,) = await receiver.wait_for(1)
        assert call.payload["account"] == "acme"
        assert verify(call, secret) and not verify(call)
        await asyncio.sleep(0.3)
        assert len(receiver.calls) == 1  # "other" has no webhook; the global list is empty
        status, gone = await admin_call(http, gw, "DELETE", "/admin/accounts/acme/webhook")
        assert (status, gone) == (200, {"account": "acme", "webhook": None})
        status, error = await admin_call(http, gw, "DELETE", "/admin/accounts/acme/webhook")
        assert (status, error["error"]["reason"]) == (404, "webhook_not_found")
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"url": "ftp://x", "events": ["balance.low"], "balance_below_usd": "1"}, "url: must be"),
        ({"url": "https://x/h", "events": []}, "events: name at least one event"),
        (
            {"url": "https://x/h", "events": ["upstream_key.unhealthy"]},
            "events[0]: 'upstream_key.unhealthy' is about no account: global webhooks only",
        ),
        (
            {"url": "https://x/h", "events": ["balance.low"]},
            "balance_below_usd: required by the event 'balance.low'",
        ),
        (
            {"url": "https://x/h", "events": ["key.expiring"], "key_expiring_within_s": -1},
            "key_expiring_within_s: must be above 0",
        ),
    ],
)
async def test_a_bad_account_webhook_is_a_400_naming_the_field(
    gateway: Gateway, http: aiohttp.ClientSession, body: dict[str, Any], message: str
) -> None:
    await gateway.accounts.create_account("acme")
    status, answer = await admin_call(http, gateway, "PUT", "/admin/accounts/acme/webhook", body)
    assert status == 400, answer
    assert answer["error"]["message"].startswith(message), answer


async def test_an_unknown_account_has_no_webhook(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    hook = {"url": "https://x/h", "events": ["key.expiring"], "key_expiring_within_s": 60}
    status, answer = await admin_call(http, gateway, "PUT", "/admin/accounts/nobody/webhook", hook)
    assert (status, answer["error"]["reason"]) == (404, "account_not_found")


@pytest.mark.slow  # the CLI as a subprocess
def test_the_cli_sets_shows_and_deletes_an_account_webhook(redis_url: str) -> None:
    storage = ("--storage", redis_url)
    cli_json("accounts", "create", "acme", *storage)
    made = cli_json(
        "webhooks", "set", "acme", "--url", "https://hooks.example/acme",
        "--events", "balance.low,key.expiring", "--balance-below-usd", "5",
        "--key-expiring-within-s", "86400", *storage,
    )  # fmt: skip
    assert made["webhook"]["secret"].startswith("whsec_")
    assert made["webhook"]["events"] == ["balance.low", "key.expiring"]
    text = cli("webhooks", "show", "acme", *storage)
    assert text.returncode == 0 and "https://hooks.example/acme" in text.stdout
    assert "whsec_" not in text.stdout
    again = cli("webhooks", "set", "acme", "--url", "https://h.example/x", "--events",
                "key.expiring", "--key-expiring-within-s", "60", "--new-secret",
                *storage)  # fmt: skip
    assert again.returncode == 0 and "shown once" in again.stdout
    assert cli_json("webhooks", "delete", "acme", *storage) == {"account": "acme", "webhook": None}
    refused = cli("webhooks", "set", "acme", "--url", "https://x/h", "--events", "balance.low",
                  *storage)  # fmt: skip
    assert refused.returncode == 1
    assert "balance_below_usd: required by the event 'balance.low'" in refused.stderr


async def test_an_event_for_a_webhook_not_known_here_yet_waits_for_it(
    upstream: Upstream, storage: Storage, receiver: Receiver
) -> None:
    """Another instance may read an account's new webhook first and raise an event for it:
    this one retries it until it knows the webhook, never drops it at once."""
    from ratelimit_gw.webhook_outbox import AccountWebhook, AccountWebhooks, Outbox

    async with gateway_on(upstream, storage, receiver) as gw:
        await gw.accounts.create_account("late")
        await Outbox(storage).raise_event(
            "account:late", "key.expiring:late:key_x:1", "key.expiring", "late", {}, 60
        )
        await asyncio.sleep(0.3)  # claimed and put back at least once: unknown here
        assert receiver.calls == []
        hook = AccountWebhook(
            url=receiver.url,
            events=("key.expiring",),
            key_expiring_within_s=60,
            secret=SECRET,
        )
        await AccountWebhooks(storage).put("late", hook)
        (call,) = await receiver.wait_for(1)
        assert call.id == "key.expiring:late:key_x:1" and verify(call)
        assert (
            sample(gw, "rlgw_webhook_deliveries_total", type="key.expiring", outcome="dropped") == 0
        )
