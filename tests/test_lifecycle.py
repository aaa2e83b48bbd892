"""Key and account lifecycle (issue 20, item 8): key updates and rotations, listing every
key, disabling, enabling and deleting accounts, manual adjustments; the audit trail of it all.

Over HTTP against real gateways on both backends: two instances on one storage, each with
its own key cache (on Redis, its own connections too), show what is in force on every
instance and how soon. The CLI runs as a subprocess on a real Redis, against a running
gateway too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import pytest

from ratelimit_gw import keyspace
from ratelimit_gw.key_changes import KeyChangeFeed, published
from ratelimit_gw.keys import hash_key
from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.money import format_usd, parse_usd
from ratelimit_gw.services import SERVICES
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import Storage, open_storage

from .cli_helpers import audit_lines, cli, cli_json
from .conftest import ADMIN_TOKEN, Gateway, Upstream, start_gateway
from .http_helpers import auth, call
from .test_admin_cli import Admin, error
from .test_routes import BY_PROTOCOL, assert_error_envelope

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}
AUDIT = "ratelimit_gw.audit"
WITHIN_S = 1.0  # what "in force on every instance within a second" allows


@pytest.fixture
def admin(gateway: Gateway, http: aiohttp.ClientSession) -> Admin:
    return Admin(http, gateway.url)


@pytest.fixture
async def other(gateway: Gateway, upstream: Upstream) -> AsyncIterator[Gateway]:
    """A second gateway instance on the same storage, with its own key cache (on Redis, its
    own client as well; memory:// lives in one process, so there it shares the store)."""
    memory = gateway.storage.url.startswith("memory://")
    storage = gateway.storage if memory else open_storage(StorageSettings(url=gateway.storage.url))
    runner, second = await start_gateway(upstream, storage, {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        yield second
    finally:
        await runner.cleanup()
        if not memory:
            await storage.close()


async def chat(
    http: aiohttp.ClientSession,
    gw: Gateway,
    key: str,
    model: str = "gpt-4o-mini",
    headers: dict[str, str] | None = None,
) -> tuple[int, str | None]:
    """(status, error reason or None) of one chat request (a stuck one fails in 30 s)."""
    async with asyncio.timeout(30):
        reply = await call(
            http,
            gw,
            "/v1/chat/completions",
            {**CHAT, "model": model},
            {**auth("openai", key), **(headers or {})},
        )
    return reply.status, reply.error()["reason"] if reply.status >= 400 else None


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> float:
    """How long until ``check`` holds, polling every 20 ms; fails after ``seconds`` (also
    when the check that finally holds ended later than that)."""
    started = time.monotonic()
    while True:
        held = await check()
        elapsed = time.monotonic() - started
        assert elapsed < seconds, f"not in force after {elapsed:.2f} s"
        if held:
            return elapsed
        await asyncio.sleep(0.02)


async def new_account(admin: Admin, account: str = "acme", **fields: Any) -> dict[str, Any]:
    status, body = await admin.call("POST", "/admin/accounts", {"id": account, **fields})
    assert status == 201, body
    return dict(body)


async def new_key(admin: Admin, account: str = "acme", **fields: Any) -> dict[str, Any]:
    status, body = await admin.call("POST", "/admin/keys", {"account": account, **fields})
    assert status == 201, body
    return dict(body)


def audited(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == AUDIT]


def seconds_until(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339).timestamp() - time.time()


# --- key updates -------------------------------------------------------------------------------


async def test_a_key_update_is_in_force_on_every_instance_within_a_second(
    admin: Admin, gateway: Gateway, other: Gateway, http: aiohttp.ClientSession
) -> None:
    await new_account(admin)
    key = await new_key(admin, models=["gpt-4o-mini"], name="ci")
    secret = key["key"]
    for gw in (gateway, other):  # both instances now have the key in their cache
        assert await chat(http, gw, secret) == (200, None)
        assert await chat(http, gw, secret, "gpt-4o") == (403, "model_not_allowed")

    status, updated = await admin.call(
        "PATCH", f"/admin/keys/{key['id']}", {"models": ["gpt-4o"], "name": "batch"}
    )
    assert status == 200
    assert (updated["id"], updated["models"], updated["name"]) == (key["id"], ["gpt-4o"], "batch")
    for gw in (other, gateway):

        async def switched(gw: Gateway = gw) -> bool:
            return (await chat(http, gw, secret, "gpt-4o"))[0] == 200

        await within(WITHIN_S, switched)
        assert await chat(http, gw, secret) == (403, "model_not_allowed")

    # Limits and expiry are read by the admission script: in force on the next request.
    assert (await admin.call("PATCH", f"/admin/keys/{key['id']}", {"rpm": 1}))[1]["rpm"] == 1
    assert await chat(http, other, secret, "gpt-4o") == (200, None)
    assert await chat(http, gateway, secret, "gpt-4o") == (429, "rpm_exceeded")
    past = {"rpm": None, "expires_at": "2001-01-01T00:00:00Z"}
    assert (await admin.call("PATCH", f"/admin/keys/{key['id']}", past))[0] == 200
    assert await chat(http, other, secret, "gpt-4o") == (401, "key_expired")
    status, cleared = await admin.call(
        "PATCH", f"/admin/keys/{key['id']}", {"expires_at": None, "models": None}
    )
    assert (status, cleared["expires_at"], cleared["models"], cleared["rpm"]) == (
        200,
        None,
        [],
        None,
    )
    assert await chat(http, other, secret, "gpt-4o") == (200, None)
    listing = (await admin.call("GET", "/admin/keys?account=acme"))[1]["data"]
    assert [(k["id"], k["name"], k["models"]) for k in listing] == [(key["id"], "batch", [])]


@pytest.mark.parametrize(
    ("body", "status", "reason", "message"),
    [
        ({"colour": "red"}, 400, "invalid_request", "Object contains unknown field `colour`"),
        ({"rpm": 0}, 400, "invalid_request", "rpm must be a positive integer or null"),
        (
            {"models": "gpt-4o"},
            400,
            "invalid_request",
            "Expected `array | null`, got `str` - at `$.models`",
        ),
        ({"models": [""]}, 400, "invalid_request", "models must be a list of model ids/globs"),
        ({"name": 5}, 400, "invalid_request", "Expected `str`, got `int` - at `$.name`"),
        ({"expires_at": "soon"}, 400, "invalid_request", "'soon' is not an RFC 3339 time"),
    ],
)
async def test_a_bad_key_update_is_refused_and_changes_nothing(
    admin: Admin, body: dict[str, Any], status: int, reason: str, message: str
) -> None:
    await new_account(admin)
    key = await new_key(admin, rpm=5, name="ci")
    del key["key"]
    type_ = "invalid_request_error"
    assert await admin.call("PATCH", f"/admin/keys/{key['id']}", body) == (
        status,
        error(status, type_, reason, message),
    )
    assert (await admin.call("GET", "/admin/keys?account=acme"))[1]["data"] == [key]


async def test_updating_an_unknown_or_revoked_key_is_refused(admin: Admin) -> None:
    await new_account(admin)
    key = await new_key(admin)
    assert await admin.call("PATCH", "/admin/keys/key_0000000000000000", {"rpm": 5}) == (
        404,
        error(404, "not_found_error", "key_not_found", "key 'key_0000000000000000' not found"),
    )
    await admin.call("DELETE", f"/admin/keys/{key['id']}")
    assert await admin.call("PATCH", f"/admin/keys/{key['id']}", {"rpm": 5}) == (
        409,
        error(409, "conflict_error", "key_revoked", f"key {key['id']!r} is revoked"),
    )


async def test_the_key_change_feed_names_what_changed_or_says_it_cannot_tell(
    storage: Storage,
) -> None:
    feed = KeyChangeFeed(storage)
    first = await feed.read()  # finds where the stream ends: what was cached may predate it
    assert (first.key_ids, first.complete) == (set(), False)
    for key_id in ("key_a", "key_b", "key_a"):
        await storage.call(*published(key_id))
    changes = await feed.read()
    assert (changes.key_ids, changes.complete) == ({"key_a", "key_b"}, True)
    assert ((await feed.read()).key_ids, (await feed.read()).complete) == (set(), True)

    await storage.call_many([published(f"key_{i}") for i in range(2500)])  # several batches
    changes = await feed.read()
    assert (len(changes.key_ids), changes.complete) == (2500, True)

    await storage.call("XTRIM", keyspace.KEY_CHANGES, "MAXLEN", 0)  # trimmed past the cursor
    await storage.call(*published("key_c"))
    changes = await feed.read()
    assert (changes.key_ids, changes.complete) == ({"key_c"}, False)
    await storage.call("DEL", keyspace.KEY_CHANGES)  # wiped
    changes = await feed.read()
    assert (changes.key_ids, changes.complete) == (set(), False)
    await storage.call(*published("key_d"))
    changes = await feed.read()
    assert (changes.key_ids, changes.complete) == ({"key_d"}, True)


# --- key rotation ------------------------------------------------------------------------------


async def test_a_rotated_key_keeps_its_id_limits_and_spend(
    admin: Admin, gateway: Gateway, other: Gateway, http: aiohttp.ClientSession
) -> None:
    await new_account(admin, balance_usd="1.00")
    key = await new_key(admin, rpm=3, name="ci")
    old = key["key"]
    assert await chat(http, gateway, old) == (200, None)
    assert await chat(http, other, old) == (200, None)

    status, rotated = await admin.call("POST", f"/admin/keys/{key['id']}/rotate", {"grace_s": 60})
    assert status == 200
    new = rotated.pop("key")
    assert new != old and new.startswith("rlgw-")
    assert 55 < seconds_until(rotated.pop("old_key_expires_at")) <= 60
    assert rotated == {**{k: v for k, v in key.items() if k != "key"}, "prefix": new[:12]}

    # One key, one bucket: the third request of the minute, then both secrets are refused.
    assert await chat(http, other, new) == (200, None)
    assert await chat(http, gateway, old) == (429, "rpm_exceeded")
    assert await chat(http, gateway, new) == (429, "rpm_exceeded")
    await gateway.app[SERVICES].settler.drain()
    await other.app[SERVICES].settler.drain()
    charges = [e for e in (await admin.call("GET", "/admin/accounts/acme/ledger"))[1]["data"]]
    assert [e["key_id"] for e in charges if e["type"] == "charge"] == [key["id"]] * 3
    account = (await admin.call("GET", "/admin/accounts/acme"))[1]
    assert account["spent_usd"] != "0.00"


async def rotate_a_cached_key(
    admin: Admin, http: aiohttp.ClientSession, gateways: tuple[Gateway, ...], grace_s: int
) -> tuple[str, dict[str, Any]]:
    """A key every instance has used (and cached), rotated: its old secret and the rotation."""
    await new_account(admin)
    key = await new_key(admin)
    for gw in gateways:
        assert await chat(http, gw, key["key"]) == (200, None)
    status, rotated = await admin.call(
        "POST", f"/admin/keys/{key['id']}/rotate", {"grace_s": grace_s}
    )
    assert status == 200
    return key["key"], rotated


async def test_a_rotated_out_secret_stops_when_its_grace_ends_on_every_instance(
    admin: Admin, gateway: Gateway, other: Gateway, http: aiohttp.ClientSession
) -> None:
    old, rotated = await rotate_a_cached_key(admin, http, (gateway, other), grace_s=2)
    for gw in (gateway, other):  # in its grace, on instances that cached it or not
        assert await chat(http, gw, old) == (200, None)
        assert await chat(http, gw, rotated["key"]) == (200, None)
    await asyncio.sleep(max(seconds_until(rotated["old_key_expires_at"]), 0))
    for gw in (gateway, other):

        async def refused(gw: Gateway = gw) -> bool:
            return await chat(http, gw, old) == (401, "invalid_key")

        await within(WITHIN_S, refused)
        assert await chat(http, gw, rotated["key"]) == (200, None)


async def test_a_rotation_without_grace_stops_the_old_secret_within_a_second(
    admin: Admin, gateway: Gateway, other: Gateway, http: aiohttp.ClientSession
) -> None:
    old, rotated = await rotate_a_cached_key(admin, http, (gateway, other), grace_s=0)
    assert seconds_until(rotated["old_key_expires_at"]) <= 0
    for gw in (other, gateway):
        assert await chat(http, gw, rotated["key"]) == (200, None)

        async def refused(gw: Gateway = gw) -> bool:
            return await chat(http, gw, old) == (401, "invalid_key")

        await within(WITHIN_S, refused)
    assert await gateway.storage.call("GET", keyspace.key_by_hash(hash_key(old))) is None


async def test_rotation_defaults_to_a_day_of_grace_and_refuses_what_it_cannot_do(
    admin: Admin,
) -> None:
    await new_account(admin)
    key = await new_key(admin)
    status, rotated = await admin.call("POST", f"/admin/keys/{key['id']}/rotate")  # no body
    assert status == 200
    assert 86_390 < seconds_until(rotated["old_key_expires_at"]) <= 86_400
    for grace, message in (
        (-1, "grace_s must be 0 to 2592000"),
        (30 * 86_400 + 1, "grace_s must be 0 to 2592000"),
    ):
        assert await admin.call("POST", f"/admin/keys/{key['id']}/rotate", {"grace_s": grace}) == (
            400,
            error(400, "invalid_request_error", "invalid_request", message),
        )
    status, body = await admin.call("POST", f"/admin/keys/{key['id']}/rotate", {"grace_s": 1.5})
    assert (status, body["error"]["reason"]) == (400, "invalid_request")
    status, body = await admin.call("POST", "/admin/keys/key_0000000000000000/rotate", {})
    assert (status, body["error"]["reason"]) == (404, "key_not_found")
    await admin.call("DELETE", f"/admin/keys/{key['id']}")
    status, body = await admin.call("POST", f"/admin/keys/{key['id']}/rotate", {})
    assert (status, body["error"]["reason"]) == (409, "key_revoked")


async def test_a_key_issued_before_keys_named_their_secret_rotates_too(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """Earlier builds kept no secret_sha256 in the key's hash, and an even earlier one indexed
    the key as "account key_id": its secret has a grace, then stops, all the same."""
    old = await gateway.new_key()
    (record,) = await gateway.accounts.list_keys("acme")
    await gateway.storage.call("HDEL", AccountKeys("acme").key(record.id), "secret_sha256")
    await gateway.storage.call("SET", keyspace.key_by_hash(hash_key(old)), f"acme {record.id}")
    assert await chat(http, gateway, old) == (200, None)
    rotated = await gateway.accounts.rotate_key(record.id, grace_s=1)
    assert await gateway.accounts.find_key(old) is not None
    assert await chat(http, gateway, rotated.key) == (200, None)
    await asyncio.sleep(max(seconds_until(rotated.old_key_expires_at), 0) + 0.05)
    assert await gateway.accounts.find_key(old) is None
    assert await chat(http, gateway, old) == (401, "invalid_key")
    assert await chat(http, gateway, rotated.key) == (200, None)


# --- listing every key -------------------------------------------------------------------------


async def test_keys_of_every_account_are_listed_page_by_page(admin: Admin) -> None:
    expected = []
    for account, count in (("beta", 2), ("acme", 3), ("empty", 0), ("zeta", 1)):
        await new_account(admin, account)
        for _ in range(count):
            expected.append((account, (await new_key(admin, account))["id"]))
    expected.sort()

    status, everything = await admin.call("GET", "/admin/keys")
    assert status == 200
    assert [(k["account"], k["id"]) for k in everything["data"]] == expected
    assert everything["next_cursor"] is None
    assert all("key" not in k for k in everything["data"])

    pages, cursor = [], ""
    while True:
        status, page = await admin.call("GET", f"/admin/keys?limit=2{cursor}")
        assert status == 200
        pages.append([(k["account"], k["id"]) for k in page["data"]])
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert pages == [expected[0:2], expected[2:4], expected[4:6]]

    status, one = await admin.call("GET", "/admin/keys?account=acme&limit=2")
    assert [k["account"] for k in one["data"]] == ["acme", "acme"]
    status, rest = await admin.call("GET", f"/admin/keys?account=acme&cursor={one['next_cursor']}")
    assert [(k["account"], k["id"]) for k in one["data"] + rest["data"]] == expected[0:3]
    assert rest["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit must be 1 to 1000"),
        ("limit=1001", "limit must be 1 to 1000"),
        ("limit=ten", "limit must be an integer"),
        ("cursor=nonsense", "cursor 'nonsense' is not valid"),
    ],
)
async def test_bad_key_listing_parameters_are_400(admin: Admin, query: str, message: str) -> None:
    assert await admin.call("GET", f"/admin/keys?{query}") == (
        400,
        error(400, "invalid_request_error", "invalid_request", message),
    )


# --- disabling and enabling accounts -----------------------------------------------------------


async def test_a_disabled_account_is_refused_at_once_on_every_instance_in_each_protocol(
    admin: Admin, gateway: Gateway, other: Gateway, http: aiohttp.ClientSession
) -> None:
    await new_account(admin)
    secret = (await new_key(admin, models=["gpt-4o-mini", "claude-*", "gemini-*"]))["key"]
    for gw in (gateway, other):
        assert await chat(http, gw, secret) == (200, None)

    status, disabled = await admin.call("POST", "/admin/accounts/acme/disable")
    assert (status, disabled["status"]) == (200, "disabled")
    for protocol, (_, path, body) in BY_PROTOCOL.items():
        reply = await call(http, other, path, body, auth(protocol, secret))
        message = assert_error_envelope(reply, protocol, 403, "account_disabled")
        assert message == "The account of this API key is disabled."
    # Its state wins over whatever else is wrong with the request, and model lists too.
    assert await chat(http, gateway, secret, "gpt-4o") == (403, "account_disabled")
    listing = await call(http, other, "/v1/models", None, auth("openai", secret), "GET")
    assert (listing.status, listing.error()["reason"]) == (403, "account_disabled")
    assert len(gateway.upstream.state.requests) == 2

    assert (await admin.call("POST", "/admin/accounts/acme/disable"))[0] == 200  # already
    status, enabled = await admin.call("POST", "/admin/accounts/acme/enable")
    assert (status, enabled["status"]) == (200, "active")
    for gw in (other, gateway):
        assert await chat(http, gw, secret) == (200, None)


async def test_disabling_an_unknown_account_is_404(admin: Admin) -> None:
    for verb in ("disable", "enable"):
        assert await admin.call("POST", f"/admin/accounts/ghost/{verb}") == (
            404,
            error(404, "not_found_error", "account_not_found", "account 'ghost' not found"),
        )
    assert await admin.call("GET", "/admin/accounts") == (200, {"data": []})


# --- deleting accounts -------------------------------------------------------------------------


async def in_flight(
    http: aiohttp.ClientSession, gw: Gateway, secret: str, admin: Admin, account: str = "acme"
) -> asyncio.Task[tuple[int, str | None]]:
    """A request held upstream for 1.5 s, once the account shows its live hold."""
    slow = asyncio.ensure_future(chat(http, gw, secret, headers={"x-mock-latency-ms": "1500"}))

    async def holding() -> bool:
        return (await admin.call("GET", f"/admin/accounts/{account}"))[1]["holds_live"] == 1

    await within(5, holding)
    return slow


async def test_deleting_an_account_with_a_balance_or_holds_is_refused_unless_forced(
    admin: Admin, gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await new_account(admin, balance_usd="5.00")
    assert await admin.call("DELETE", "/admin/accounts/acme") == (
        409,
        error(
            409,
            "conflict_error",
            "account_not_empty",
            "account 'acme' still has a balance of $5.00: a forced delete forfeits the "
            "balance (the requests in flight still settle)",
        ),
    )
    await new_account(admin, "postpaid")
    secret = (await new_key(admin, "postpaid"))["key"]
    slow = await in_flight(http, gateway, secret, admin, "postpaid")
    status, body = await admin.call("DELETE", "/admin/accounts/postpaid?force=false")
    assert (status, body["error"]["reason"]) == (409, "account_not_empty")
    assert "1 live hold ($" in body["error"]["message"]
    assert await slow == (200, None)
    await gateway.app[SERVICES].settler.drain()
    status, deleted = await admin.call("DELETE", "/admin/accounts/postpaid")
    assert (status, deleted["forfeited_usd"], deleted["account"]["status"]) == (
        200,
        "0.00",
        "deleted",
    )
    status, body = await admin.call("DELETE", "/admin/accounts/acme?force=maybe")
    assert (status, body["error"]["message"]) == (400, "force must be true or false")
    assert (await admin.call("GET", "/admin/accounts/acme"))[1]["status"] == "active"


async def test_a_forced_delete_forfeits_the_balance_and_stops_the_keys_everywhere(
    admin: Admin, gateway: Gateway, other: Gateway, http: aiohttp.ClientSession
) -> None:
    await new_account(admin, balance_usd="5.00")
    await new_account(admin, "beta")
    key = await new_key(admin)
    beta_key = await new_key(admin, "beta")
    secret = key["key"]
    for gw in (gateway, other):
        assert await chat(http, gw, secret) == (200, None)
    await gateway.app[SERVICES].settler.drain()
    await other.app[SERVICES].settler.drain()
    balance = (await admin.call("GET", "/admin/accounts/acme"))[1]["balance_usd"]
    slow = await in_flight(http, gateway, secret, admin)

    status, deleted = await admin.call("DELETE", "/admin/accounts/acme?force=true")
    assert status == 200
    assert deleted["forfeited_usd"] == balance
    assert (deleted["account"]["status"], deleted["account"]["balance_usd"]) == ("deleted", "0.00")
    for gw in (other, gateway):  # at once, whatever the instance cached
        assert await chat(http, gw, secret) == (401, "key_revoked")
    # The request in flight finishes and is charged, taking no balance below zero.
    assert await slow == (200, None)
    await gateway.app[SERVICES].settler.drain()
    status, account = await admin.call("GET", "/admin/accounts/acme")
    assert (status, account["status"], account["balance_usd"]) == (200, "deleted", "0.00")
    assert (account["overruns"], account["holds_live"], account["held_usd"]) == (0, 0, "0.00")
    ledger = (await admin.call("GET", "/admin/accounts/acme/ledger"))[1]["data"]
    assert [e["type"] for e in ledger[:2]] == ["charge", "forfeit"]
    forfeit = ledger[1]
    assert (forfeit["amount_usd"], forfeit["balance_usd"], forfeit["reason"]) == (
        f"-{balance}",
        "0.00",
        "account deleted",
    )
    assert "cost_usd" not in forfeit

    # The id is never used again; the account leaves the lists; its keys stay, revoked.
    assert await admin.call("POST", "/admin/accounts", {"id": "acme"}) == (
        409,
        error(
            409,
            "conflict_error",
            "account_deleted",
            "account 'acme' was deleted: its id cannot be used again",
        ),
    )
    assert await admin.call("GET", "/admin/accounts") == (200, {"data": ["beta"]})
    everything = (await admin.call("GET", "/admin/keys"))[1]["data"]
    assert [k["id"] for k in everything] == [beta_key["id"]]
    kept = (await admin.call("GET", "/admin/keys?account=acme"))[1]["data"]
    assert [(k["id"], k["revoked"]) for k in kept] == [(key["id"], True)]
    deleted_error = error(409, "conflict_error", "account_deleted", "account 'acme' is deleted")
    for method, path, body in (
        ("PATCH", "/admin/accounts/acme", {"rpm": 5}),
        ("POST", "/admin/accounts/acme/topup", {"amount_usd": "1", "idempotency_key": "t"}),
        (
            "POST",
            "/admin/accounts/acme/adjust",
            {"amount_usd": "1", "reason": "r", "idempotency_key": "a"},
        ),
        ("POST", "/admin/accounts/acme/disable", None),
        ("POST", "/admin/accounts/acme/enable", None),
        ("POST", "/admin/keys", {"account": "acme"}),
    ):
        assert await admin.call(method, path, body) == (409, deleted_error), (method, path)
    assert await admin.call("DELETE", "/admin/accounts/acme?force=true") == (
        409,
        error(409, "conflict_error", "account_deleted", "account 'acme' is already deleted"),
    )
    assert await admin.call("DELETE", "/admin/accounts/ghost") == (
        404,
        error(404, "not_found_error", "account_not_found", "account 'ghost' not found"),
    )


# --- manual adjustments ------------------------------------------------------------------------


def adjustment(amount: str, key: str, reason: str = "support ticket 42") -> dict[str, str]:
    return {"amount_usd": amount, "reason": reason, "idempotency_key": key}


async def test_an_adjustment_credits_or_debits_once_per_idempotency_key(admin: Admin) -> None:
    await new_account(admin, balance_usd="10.00")
    path = "/admin/accounts/acme/adjust"
    status, first = await admin.call("POST", path, adjustment("2.50", "adj-1", "goodwill"))
    assert (status, first["adjusted"], first["account"]["balance_usd"]) == (200, True, "12.50")
    assert first["account"]["topped_up_usd"] == "10.00"  # not a top-up: no rpm tier from it
    status, again = await admin.call("POST", path, adjustment("2.50", "adj-1", "goodwill"))
    assert (status, again["adjusted"], again["account"]["balance_usd"]) == (200, False, "12.50")
    status, debit = await admin.call("POST", path, adjustment("-1.25", "adj-2", "correction"))
    assert (status, debit["adjusted"], debit["account"]["balance_usd"]) == (200, True, "11.25")

    ledger = (await admin.call("GET", "/admin/accounts/acme/ledger"))[1]["data"]
    assert [
        (e["type"], e["amount_usd"], e["balance_usd"], e.get("reason"), e["idempotency_key"])
        for e in ledger
    ] == [
        ("adjustment", "-1.25", "11.25", "correction", "adj-2"),
        ("adjustment", "2.50", "12.50", "goodwill", "adj-1"),
        ("topup", "10.00", "10.00", None, "rlgw:initial-balance:acme"),
    ]
    assert all("cost_usd" not in e for e in ledger)

    conflict = "idempotency_conflict"
    assert await admin.call("POST", path, adjustment("3.00", "adj-1")) == (
        409,
        error(
            409,
            "conflict_error",
            conflict,
            "idempotency key 'adj-1' was already used for an adjustment of $2.50 on account "
            "'acme', not $3.00: use a new key for a new adjustment",
        ),
    )
    topup = {"amount_usd": "2.50", "idempotency_key": "adj-2"}
    assert await admin.call("POST", "/admin/accounts/acme/topup", topup) == (
        409,
        error(
            409,
            "conflict_error",
            conflict,
            "idempotency key 'adj-2' was already used for an adjustment of -$1.25 on account "
            "'acme': use a new key for a top-up",
        ),
    )
    await admin.call("POST", "/admin/accounts/acme/topup", {**topup, "idempotency_key": "inv-9"})
    status, body = await admin.call("POST", path, adjustment("2.50", "inv-9"))
    assert (status, body["error"]["reason"]) == (409, conflict)
    assert (await admin.call("GET", "/admin/accounts/acme"))[1]["balance_usd"] == "13.75"


@pytest.mark.parametrize(
    ("body", "reason", "message"),
    [
        (adjustment("0", "k"), "invalid_amount", "'0' must not be 0"),
        (adjustment("1.5.0", "k"), "invalid_amount", "'1.5.0' is not a decimal amount"),
        (
            adjustment("1", "rlgw:mine"),
            "invalid_request",
            "idempotency keys starting with 'rlgw:' are reserved for the gateway's own top-ups",
        ),
        (adjustment("1", "k", ""), "invalid_request", "reason is required (≤ 500 chars)"),
        (adjustment("1", ""), "invalid_request", "idempotency_key is required (≤ 200 chars)"),
        (
            {"amount_usd": "1", "idempotency_key": "k"},
            "invalid_request",
            "Object missing required field `reason`",
        ),
        (
            {"amount_usd": -1, "reason": "r", "idempotency_key": "k"},
            "invalid_amount",
            'USD amounts are decimal strings, not JSON numbers: send "-1.00" - at `$.amount_usd`',
        ),
    ],
)
async def test_a_bad_adjustment_is_400_and_changes_nothing(
    admin: Admin, body: dict[str, Any], reason: str, message: str
) -> None:
    created = await new_account(admin, balance_usd="1.00")
    refused = error(400, "invalid_request_error", reason, message)
    if "JSON numbers" in message:  # the hint names the field it is about
        refused["error"]["param"] = "amount_usd"
    assert await admin.call("POST", "/admin/accounts/acme/adjust", body) == (400, refused)
    assert await admin.call("GET", "/admin/accounts/acme") == (200, created)


async def test_a_debit_never_takes_the_balance_below_the_live_holds(
    admin: Admin, gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await new_account(admin, balance_usd="1.00")
    secret = (await new_key(admin))["key"]
    slow = await in_flight(http, gateway, secret, admin)
    account = (await admin.call("GET", "/admin/accounts/acme"))[1]
    held, available = parse_usd(account["held_usd"]), parse_usd(account["available_usd"])
    assert held > 0 and available == parse_usd("1.00") - held
    too_much = adjustment(f"-{format_usd(available + 1)}", "debit-1")
    assert await admin.call("POST", "/admin/accounts/acme/adjust", too_much) == (
        409,
        error(
            409,
            "conflict_error",
            "debit_exceeds_available",
            f"a debit of ${format_usd(available + 1)} would take account 'acme' below its "
            f"live holds (balance $1.00, held ${format_usd(held)}): at most "
            f"${format_usd(available)} can be debited now",
        ),
    )
    exact = adjustment(f"-{format_usd(available)}", "debit-1")  # the key was not used up
    status, body = await admin.call("POST", "/admin/accounts/acme/adjust", exact)
    assert (status, body["adjusted"], body["account"]["available_usd"]) == (200, True, "0.00")
    assert await slow == (200, None)
    await gateway.app[SERVICES].settler.drain()
    account = (await admin.call("GET", "/admin/accounts/acme"))[1]
    assert (account["overruns"], account["held_usd"]) == (0, "0.00")
    assert parse_usd(account["balance_usd"]) >= 0


# --- the audit trail ---------------------------------------------------------------------------


async def test_every_change_through_the_admin_api_is_audited_without_secrets(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT)
    await new_account(admin, balance_usd="3.00")
    key = await new_key(admin, name="ci")
    await admin.call("PATCH", f"/admin/keys/{key['id']}", {"name": "batch"})
    _, rotated = await admin.call("POST", f"/admin/keys/{key['id']}/rotate", {"grace_s": 0})
    await admin.call("DELETE", f"/admin/keys/{key['id']}")
    await admin.call("POST", "/admin/accounts/acme/disable")
    await admin.call("POST", "/admin/accounts/acme/disable")  # no change: no line
    await admin.call("POST", "/admin/accounts/acme/enable")
    await admin.call("POST", "/admin/accounts/acme/adjust", adjustment("-1.00", "a-1"))
    await admin.call("POST", "/admin/accounts/acme/adjust", adjustment("-1.00", "a-1"))  # retry
    await admin.call("DELETE", "/admin/accounts/acme?force=true")

    lines = audited(caplog)
    assert [(line["action"], line["target"], line["actor"]) for line in lines] == [
        ("account.create", "acme", "default"),
        ("key.create", key["id"], "default"),
        ("key.update", key["id"], "default"),
        ("key.rotate", key["id"], "default"),
        ("key.revoke", key["id"], "default"),
        ("account.disable", "acme", "default"),
        ("account.enable", "acme", "default"),
        ("account.adjust", "acme", "default"),
        ("account.delete", "acme", "default"),
    ]
    update, rotate, revoke, disable, _, adjust, delete = lines[2:]
    assert (update["before"]["name"], update["after"]["name"]) == ("ci", "batch")
    assert rotate["before"]["prefix"] == key["prefix"]
    assert rotate["after"]["prefix"] == rotated["prefix"]
    assert rotate["after"]["old_key_expires_at"] == rotated["old_key_expires_at"]
    assert (revoke["before"]["revoked"], revoke["after"]["revoked"]) == (False, True)
    assert (disable["before"]["status"], disable["after"]["status"]) == ("active", "disabled")
    assert (adjust["before"]["balance_usd"], adjust["after"]["balance_usd"]) == ("3.00", "2.00")
    assert delete["after"]["forfeited_usd"] == "2.00"
    assert delete["after"]["account"]["status"] == "deleted"
    text = json.dumps(lines)
    for secret in (key["key"], rotated["key"]):
        assert secret not in text and secret[12:] not in text


# --- the CLI (real Redis only) -----------------------------------------------------------------


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_account_lifecycle_with_audit_lines(redis_url: str) -> None:
    store = ("--storage", redis_url)
    created = cli(*("accounts", "create", "acme", "--balance-usd", "5.00", "--json"), *store)
    (line,) = audit_lines(created.stderr)
    assert (line["action"], line["target"], line["before"]) == ("account.create", "acme", None)
    assert line["actor"].startswith("cli:")
    assert line["after"]["balance_usd"] == "5.00"

    disabled = cli("accounts", "disable", "acme", "--json", *store)
    assert json.loads(disabled.stdout)["status"] == "disabled"
    (line,) = audit_lines(disabled.stderr)
    assert (line["action"], line["before"]["status"], line["after"]["status"]) == (
        "account.disable",
        "active",
        "disabled",
    )
    again = cli("accounts", "disable", "acme", "--json", *store)
    assert (again.returncode, audit_lines(again.stderr)) == (0, [])
    assert cli_json("accounts", "enable", "acme", *store)["status"] == "active"

    adjust = ("accounts", "adjust", "acme", "-1.00", "--reason", "refund reversal")
    first = cli(*adjust, "--idempotency-key", "adj-1", "--json", *store)
    assert json.loads(first.stdout)["adjusted"] is True
    (line,) = audit_lines(first.stderr)
    assert (line["action"], line["after"]["balance_usd"]) == ("account.adjust", "4.00")
    retry = cli(*adjust, "--idempotency-key", "adj-1", "--json", *store)
    assert json.loads(retry.stdout) == {**json.loads(first.stdout), "adjusted": False}
    assert audit_lines(retry.stderr) == []
    refused = cli(
        "accounts", "adjust", "acme", "-9.00", "--reason", "x", "--idempotency-key", "a2", *store
    )
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.startswith("error: a debit of $9.00 would take account 'acme' below")

    not_empty = cli("accounts", "delete", "acme", *store)
    assert (not_empty.returncode, not_empty.stderr) == (
        1,
        "error: account 'acme' still has a balance of $4.00: a forced delete forfeits the "
        "balance (the requests in flight still settle)\n",
    )
    deleted = cli("accounts", "delete", "acme", "--force", "--json", *store)
    assert json.loads(deleted.stdout)["forfeited_usd"] == "4.00"
    (line,) = audit_lines(deleted.stderr)
    assert (line["action"], line["after"]["account"]["status"]) == ("account.delete", "deleted")
    ledger = cli_json("accounts", "ledger", "acme", *store)
    assert [(e["type"], e["amount_usd"], e.get("reason")) for e in ledger] == [
        ("forfeit", "-4.00", "account deleted"),
        ("adjustment", "-1.00", "refund reversal"),
        ("topup", "5.00", None),
    ]
    reused = cli("accounts", "create", "acme", *store)
    assert (reused.returncode, reused.stderr) == (
        1,
        "error: account 'acme' was deleted: its id cannot be used again\n",
    )
    assert cli_json("accounts", "list", *store) == []
    assert cli_json("accounts", "show", "acme", *store)["status"] == "deleted"


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_key_lifecycle_with_audit_lines(redis_url: str) -> None:
    store = ("--storage", redis_url)
    cli_json("accounts", "create", "acme", *store)
    cli_json("accounts", "create", "beta", *store)
    made = cli(
        "keys", "create", "acme", "--name", "ci", "--models", "gpt-4o-mini", "--json", *store
    )
    key = json.loads(made.stdout)
    (line,) = audit_lines(made.stderr)
    assert (line["action"], line["target"], line["after"]["name"]) == (
        "key.create",
        key["id"],
        "ci",
    )
    assert key["key"] not in made.stderr

    update = (
        *("keys", "update", key["id"], "--name", "batch", "--models", "gpt-4o,gpt-4o-mini"),
        *("--rpm", "5", "--expires-at", "2999-01-01T00:00:00Z", "--json"),
    )
    updated = cli(*update, *store)
    record = json.loads(updated.stdout)
    assert (record["name"], record["models"], record["rpm"], record["expires_at"]) == (
        "batch",
        ["gpt-4o", "gpt-4o-mini"],
        5,
        "2999-01-01T00:00:00Z",
    )
    (line,) = audit_lines(updated.stderr)
    assert (line["action"], line["before"]["name"], line["after"]["name"]) == (
        "key.update",
        "ci",
        "batch",
    )
    cleared = cli_json(
        "keys", "update", key["id"], "--all-models", "--rpm", "0", "--no-expiry", *store
    )
    assert (cleared["models"], cleared["rpm"], cleared["expires_at"]) == ([], None, None)

    rotation = cli("keys", "rotate", key["id"], "--grace-s", "0", "--json", *store)
    rotated = json.loads(rotation.stdout)
    assert (rotated["id"], rotated["prefix"]) == (key["id"], rotated["key"][:12])
    assert rotated["key"] != key["key"]
    (line,) = audit_lines(rotation.stderr)
    assert line["action"] == "key.rotate"
    assert rotated["key"] not in rotation.stderr and key["key"] not in rotation.stderr

    beta = cli_json("keys", "create", "beta", *store)
    everything = cli_json("keys", "list", *store)
    assert sorted(k["id"] for k in everything) == sorted([key["id"], beta["id"]])
    first = cli("keys", "list", "--limit", "1", "--json", *store)
    (listed,) = json.loads(first.stdout)
    assert first.stderr == f"next cursor: {listed['account']}/{listed['id']}\n"
    rest = cli_json("keys", "list", "--cursor", f"{listed['account']}/{listed['id']}", *store)
    assert [k["id"] for k in [listed, *rest]] == [k["id"] for k in everything]

    revoked = cli("keys", "revoke", key["id"], "--json", *store)
    (line,) = audit_lines(revoked.stderr)
    assert (line["action"], line["before"]["revoked"], line["after"]["revoked"]) == (
        "key.revoke",
        False,
        True,
    )
    again = cli("keys", "rotate", key["id"], *store)
    assert (again.returncode, again.stderr) == (1, f"error: key {key['id']!r} is revoked\n")


@pytest.mark.slow  # runs the CLI as a subprocess
async def test_cli_changes_reach_a_running_gateway(
    redis_url: str, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    store = ("--storage", redis_url)
    cli_json("accounts", "create", "acme", "--balance-usd", "1.00", *store)
    key = cli_json("keys", "create", "acme", *store)
    storage: Storage = open_storage(StorageSettings(url=redis_url))
    runner, gateway = await start_gateway(upstream, storage)
    try:
        assert await chat(http, gateway, key["key"]) == (200, None)
        cli_json("accounts", "disable", "acme", *store)
        assert await chat(http, gateway, key["key"]) == (403, "account_disabled")
        cli_json("accounts", "enable", "acme", *store)
        assert await chat(http, gateway, key["key"]) == (200, None)

        cli_json("keys", "update", key["id"], "--models", "gpt-4o", *store)

        async def restricted() -> bool:
            return await chat(http, gateway, key["key"]) == (403, "model_not_allowed")

        await within(WITHIN_S, restricted)
        rotated = cli_json("keys", "rotate", key["id"], "--grace-s", "0", *store)
        assert await chat(http, gateway, rotated["key"], "gpt-4o") == (200, None)

        async def retired() -> bool:
            return await chat(http, gateway, key["key"], "gpt-4o") == (401, "invalid_key")

        await within(WITHIN_S, retired)
    finally:
        await runner.cleanup()
        await storage.close()
