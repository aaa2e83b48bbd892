"""The self-view, GET /v1/key and under each protocol's prefix (SPEC §15, docs/admin.md):
each protocol's credential forms, nothing consumed, 200 over the limits, the key refusals in
the caller's envelope, the admin API's figures, models resolved from globs, no secret.

Raw HTTP against a gateway on a real socket; every test runs on memory:// and real Redis.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.limiter import AdmissionRequest, Limiter

from .conftest import ADMIN_TOKEN, Gateway
from .http_helpers import Reply, auth, call
from .test_balance_http import _settled
from .test_observability import access_lines
from .test_routes import CHAT, MESSAGES, assert_error_envelope, key_id

ALL_MODELS = ["claude-sonnet-4-6", "gemini-2.5-flash", "gpt-4o", "gpt-4o-mini"]
# path, credential form (how the key is sent) → the protocol whose envelope errors come in
CREDENTIAL_FORMS = [
    ("/v1/key", "bearer", "openai"),
    ("/v1/key", "x-api-key", "anthropic"),
    ("/v1/key", "x-goog-api-key", "gemini"),
    ("/v1/key", "query", "gemini"),
    ("/openai/v1/key", "bearer", "openai"),
    ("/anthropic/v1/key", "x-api-key", "anthropic"),
    ("/anthropic/v1/key", "bearer", "anthropic"),
    ("/v1beta/key", "x-goog-api-key", "gemini"),
    ("/v1beta/key", "query", "gemini"),
    ("/gemini/v1beta/key", "x-goog-api-key", "gemini"),
    ("/gemini/v1beta/key", "query", "gemini"),
    ("/gemini/v1/key", "bearer", "gemini"),
]
# One path and credential per protocol, for behaviour every form shares.
BY_PROTOCOL = {
    "openai": ("/v1/key", "bearer"),
    "anthropic": ("/anthropic/v1/key", "x-api-key"),
    "gemini": ("/gemini/v1beta/key", "x-goog-api-key"),
}
FORMS = [pytest.param(p, f, protocol, id=f"{p}-{f}") for p, f, protocol in CREDENTIAL_FORMS]


async def show(
    http: aiohttp.ClientSession, gw: Gateway, key: str, path: str = "/v1/key", form: str = "bearer"
) -> Reply:
    headers = {
        "bearer": {"Authorization": f"Bearer {key}"},
        "x-api-key": {"x-api-key": key, "anthropic-version": "2023-06-01"},
        "x-goog-api-key": {"x-goog-api-key": key},
        "query": {},
    }[form]
    if form == "query":
        path += f"?key={key}"
    return await call(http, gw, path, None, headers, method="GET")


async def admin(
    http: aiohttp.ClientSession, gw: Gateway, method: str, path: str, body: Any = None
) -> Any:
    reply = await call(http, gw, path, body, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, method)
    assert reply.status < 300, reply.body
    return reply.json()


@pytest.mark.parametrize(("path", "form", "protocol"), FORMS)
async def test_each_credential_form_on_each_path_shows_the_callers_own_key(
    gateway: Gateway, http: aiohttp.ClientSession, path: str, form: str, protocol: str
) -> None:
    key = await gateway.new_key()
    await gateway.new_key("other", rpm=5)  # another account's key: never shown
    reply = await show(http, gateway, key, path, form)
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    view = reply.json()
    assert view["key"]["id"] == await key_id(gateway, key)
    assert view["account"]["id"] == "acme"
    assert key not in reply.body.decode()
    assert "other" not in reply.body.decode()


async def test_the_answer_has_the_documented_shape(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(
        balance_usd="5.00",
        name="ci",
        rpm=60,
        concurrency=2,
        models=["gpt-*"],
        expires_at="2099-01-01T00:00:00Z",
        account_tpm=100_000,
    )
    reply = await show(http, gateway, key)
    assert reply.status == 200, reply.body
    view = reply.json()
    assert set(view) == {"object", "key", "account", "remaining", "allowed_models"}
    assert view["object"] == "key"
    record = await gateway.accounts.find_key(key)
    assert record is not None
    assert view["key"] == {
        "id": record.id,
        "name": "ci",
        "prefix": key[:12],
        "models": ["gpt-*"],
        "rpm": 60,
        "tpm": None,
        "concurrency": 2,
        "expires_at": "2099-01-01T00:00:00Z",
        "created_at": record.created_at,
        "budget": None,
        "model_limits": {},
    }
    assert view["account"] == {
        "id": "acme",
        "prepaid": True,
        "balance_usd": "5.00",
        "held_usd": "0.00",
        "available_usd": "5.00",
        "rpm": None,
        "tpm": 100_000,
        "concurrency": None,
        "rpm_policy": "fixed",
        "timezone": "UTC",
        "budget": None,
        "model_limits": {},
    }
    assert view["remaining"] == {
        "requests": {"limit": 60, "remaining": 60, "reset_ms": 0},
        "tokens": {"limit": 100_000, "remaining": 100_000, "reset_ms": 0},
        "concurrency": {"limit": 2, "in_use": 0, "remaining": 2},
    }
    assert view["allowed_models"] == ["gpt-4o", "gpt-4o-mini"]
    # The rate-limit headers every authenticated answer carries, from the same peek.
    assert reply.headers["x-ratelimit-remaining-requests"] == "60"


async def test_an_account_that_is_not_prepaid_shows_no_balance(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    view = (await show(http, gateway, key)).json()
    assert view["account"]["prepaid"] is False
    assert [view["account"][f] for f in ("balance_usd", "held_usd", "available_usd")] == [None] * 3
    assert view["remaining"] == {"requests": None, "tokens": None, "concurrency": None}
    assert view["allowed_models"] == ALL_MODELS
    assert "budgets" not in view["key"] and "budgets" not in view["account"]


async def test_it_consumes_nothing_and_an_rpm_1_key_still_makes_its_one_call(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(
        balance_usd="1.00", rpm=1, tpm=5000, concurrency=1, account_rpm=1, account_concurrency=1
    )
    record = await gateway.accounts.find_key(key)
    assert record is not None
    limiter = Limiter(gateway.storage)
    stored = AccountKeys("acme")
    hashes = [("HGETALL", stored.account), ("HGETALL", stored.key(record.id))]
    before = await limiter.peek("acme", record.id), await gateway.storage.call_many(hashes)
    for path, form, _ in CREDENTIAL_FORMS:
        reply = await show(http, gateway, key, path, form)
        assert reply.status == 200, reply.body
        assert reply.json()["remaining"]["requests"]["remaining"] == 1
    # Not a bucket level or time stamp written, let alone a token taken.
    after = await limiter.peek("acme", record.id), await gateway.storage.call_many(hashes)
    assert after == before
    account = await gateway.accounts.get_account("acme")
    assert (account.holds_live, account.held_usd, account.spent_usd) == (0, "0.00", "0.00")
    assert [entry.type for entry in await gateway.accounts.ledger("acme")] == ["topup"]
    assert gateway.upstream.state.requests == []

    first = await call(http, gateway, "/v1/chat/completions", CHAT, auth("openai", key))
    assert first.status == 200, first.body
    second = await call(http, gateway, "/v1/chat/completions", CHAT, auth("openai", key))
    assert_error_envelope(second, "openai", 429, "rpm_exceeded")
    over = await show(http, gateway, key)  # over its rpm: LLM calls get 429, this answers
    assert over.status == 200, over.body
    assert over.json()["remaining"]["requests"]["remaining"] == 0


async def test_it_answers_200_while_the_key_is_over_every_limit(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(rpm=5, concurrency=1)
    record = await gateway.accounts.find_key(key)
    assert record is not None
    # A request in flight: the key's one concurrency slot taken.
    admitted = await Limiter(gateway.storage).admit(
        AdmissionRequest(
            account_id="acme",
            key_id=record.id,
            request_id="req-in-flight",
            estimated_tokens=10,
            hold_nano=0,
            ttl_ms=60_000,
        )
    )
    assert admitted.allowed
    refused = await call(http, gateway, "/v1/chat/completions", CHAT, auth("openai", key))
    assert_error_envelope(refused, "openai", 429, "concurrency_exceeded")
    broke = await gateway.new_key("broke", balance_usd="0.00")
    no_money = await call(http, gateway, "/v1/chat/completions", CHAT, auth("openai", broke))
    assert no_money.status == 402

    reply = await show(http, gateway, key)
    assert reply.status == 200, reply.body
    remaining = reply.json()["remaining"]
    assert remaining["concurrency"] == {"limit": 1, "in_use": 1, "remaining": 0}
    assert remaining["requests"]["remaining"] == 4
    view = (await show(http, gateway, broke)).json()
    assert view["account"]["available_usd"] == "0.00"


@pytest.mark.parametrize("protocol", BY_PROTOCOL)
async def test_a_disabled_account_is_403_in_the_callers_envelope(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    path, form = BY_PROTOCOL[protocol]
    key = await gateway.new_key()
    assert (await show(http, gateway, key, path, form)).status == 200
    await gateway.accounts.set_disabled("acme", True)
    reply = await show(http, gateway, key, path, form)
    assert_error_envelope(reply, protocol, 403, "account_disabled")


@pytest.mark.parametrize(("path", "form", "protocol"), FORMS)
async def test_missing_unknown_revoked_and_expired_keys_are_401_in_the_callers_envelope(
    gateway: Gateway, http: aiohttp.ClientSession, path: str, form: str, protocol: str
) -> None:
    nothing = await call(http, gateway, path, None, method="GET")
    assert_error_envelope(nothing, "openai" if path == "/v1/key" else protocol, 401, "missing_key")
    unknown = await show(http, gateway, "rlgw-not-a-real-key-at-all-000000000000000", path, form)
    assert_error_envelope(unknown, protocol, 401, "invalid_key")
    revoked = await gateway.new_key()
    assert (await show(http, gateway, revoked, path, form)).status == 200  # cached as valid
    await gateway.accounts.revoke_key(await key_id(gateway, revoked))
    assert_error_envelope(
        await show(http, gateway, revoked, path, form), protocol, 401, "key_revoked"
    )
    expired = await gateway.new_key(create_account=False)
    assert (await show(http, gateway, expired, path, form)).status == 200
    await gateway.accounts.update_key(await key_id(gateway, expired), {"expires_at": "1"})
    assert_error_envelope(
        await show(http, gateway, expired, path, form), protocol, 401, "key_expired"
    )


async def test_the_self_view_matches_the_admin_view(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await admin(
        http,
        gateway,
        "POST",
        "/admin/accounts",
        {"id": "acme", "balance_usd": "3.25", "rpm": 120, "tpm": 50_000, "concurrency": 8},
    )
    created = await admin(
        http,
        gateway,
        "POST",
        "/admin/keys",
        {
            "account": "acme",
            "name": "batch",
            "rpm": 30,
            "tpm": 9000,
            "models": ["claude-*", "gpt-4o"],
            "expires_at": "2098-06-01T12:00:00Z",
        },
    )
    key = created["key"]
    spent = await call(http, gateway, "/anthropic/v1/messages", MESSAGES, auth("anthropic", key))
    assert spent.status == 200, spent.body
    await _settled(gateway)  # the gateway settles in the background
    # A request in flight, so that held and available differ from the balance.
    await Limiter(gateway.storage).admit(
        AdmissionRequest("acme", created["id"], "req-in-flight", 100, 123_456_789, 60_000)
    )
    budgets = {"budget_usd": "2.00", "budget_period": "week"}
    await admin(http, gateway, "PATCH", "/admin/accounts/acme", budgets)
    budgets = {"budget_usd": "0.75", "budget_period": "custom", "budget_period_s": 3600}
    await admin(http, gateway, "PATCH", f"/admin/keys/{created['id']}", budgets)
    view = (await show(http, gateway, key, "/anthropic/v1/key", "x-api-key")).json()
    account = await admin(http, gateway, "GET", "/admin/accounts/acme")
    [listed] = (await admin(http, gateway, "GET", "/admin/keys?account=acme"))["data"]
    assert account["held_usd"] != "0.00" and account["spent_usd"] != "0.00"
    assert view["account"]["budget"]["usd"] == "2.00" and view["key"]["budget"]["usd"] == "0.75"
    fields = ("balance_usd", "held_usd", "available_usd", "rpm", "tpm", "concurrency")
    for field in (*fields, "timezone", "budget"):
        assert view["account"][field] == account[field], field
    assert (view["account"]["prepaid"], view["account"]["rpm_policy"]) == (True, "fixed")
    for field in view["key"]:
        assert view["key"][field] == listed[field], field
    assert view["allowed_models"] == ["claude-sonnet-4-6", "gpt-4o"]

    # The account's rpm as it is in force: an override wins over the configured one.
    await admin(http, gateway, "PATCH", "/admin/accounts/acme", {"rpm_override": 7})
    view = (await show(http, gateway, key)).json()
    assert view["account"]["rpm"] == 7


@pytest.mark.parametrize(
    ("patterns", "allowed"),
    [
        ([], ALL_MODELS),
        (["gpt-*"], ["gpt-4o", "gpt-4o-mini"]),
        (["*-4o", "gemini-?.?-flash"], ["gemini-2.5-flash", "gpt-4o"]),
        (["claude-*", "gpt-4o-mini", "no-such-model"], ["claude-sonnet-4-6", "gpt-4o-mini"]),
        (["o1*"], []),
    ],
)
async def test_allowed_models_are_the_configured_ids_the_patterns_match(
    gateway: Gateway, http: aiohttp.ClientSession, patterns: list[str], allowed: list[str]
) -> None:
    key = await gateway.new_key(models=patterns)
    view = (await show(http, gateway, key)).json()
    assert view["allowed_models"] == allowed
    assert view["key"]["models"] == patterns


async def test_an_updated_key_is_shown_at_once_and_a_rotated_out_secret_shows_its_grace(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    old = await gateway.new_key(rpm=10)
    kid = await key_id(gateway, old)
    assert (await show(http, gateway, old)).json()["key"]["rpm"] == 10  # now in the key cache
    await gateway.accounts.update_key(kid, {"rpm": 20, "models": ["gpt-4o"]})
    view = (await show(http, gateway, old)).json()
    assert (view["key"]["rpm"], view["allowed_models"]) == (20, ["gpt-4o"])

    rotated = await gateway.accounts.rotate_key(kid, grace_s=600)
    for secret in (old, rotated.key):
        reply = await show(http, gateway, secret)
        assert reply.status == 200, reply.body
        assert old not in reply.body.decode() and rotated.key not in reply.body.decode()
    assert (await show(http, gateway, old)).json()["key"]["expires_at"] == (
        rotated.old_key_expires_at
    )
    assert (await show(http, gateway, rotated.key)).json()["key"]["expires_at"] is None


async def test_it_is_counted_and_logged_under_its_own_route_and_never_as_a_rejection(
    gateway: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimit_gw.access")
    key = await gateway.new_key(rpm=1)
    assert (
        await call(http, gateway, "/v1/chat/completions", CHAT, auth("openai", key))
    ).status == 200
    for _ in range(3):
        assert (await show(http, gateway, key, "/anthropic/v1/key", "x-api-key")).status == 200
    [line] = [entry for entry in access_lines(caplog) if entry["route"] == "/anthropic/v1/key"][:1]
    assert (line["status"], line["protocol"], line["reason"]) == (200, "anthropic", None)
    assert (line["key_id"], line["account"], line["model"]) == (
        await key_id(gateway, key),
        "acme",
        None,
    )
    async with http.get(gateway.url + "/metrics") as resp:
        exposition = await resp.text()
    requests = {
        line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
        for line in exposition.splitlines()
        if line.startswith("rlgw_requests_total{")
    }
    assert requests == {
        'rlgw_requests_total{model="gpt-4o-mini",protocol="openai",'
        'route="/v1/chat/completions",status="200"}': "1.0",
        'rlgw_requests_total{model="-",protocol="anthropic",'
        'route="/anthropic/v1/key",status="200"}': "3.0",
    }
    rejections = [
        line for line in exposition.splitlines() if line.startswith("rlgw_rejections_total{")
    ]
    assert rejections and all(line.endswith(" 0.0") for line in rejections)
