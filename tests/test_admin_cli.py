"""The admin API and the management CLI (§2, §12).

The admin API runs on both backends through the ``gateway`` fixture; the CLI talks to storage
directly, so it needs a real Redis (it refuses ``memory://``) and runs as a subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import Storage, open_storage

from .cli_helpers import cli, cli_json, cli_text
from .conftest import ADMIN_TOKEN, Gateway, Upstream, start_gateway

ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}
KEY_PATTERN = re.compile(r"^rlgw-[A-Za-z0-9_-]+$")
KEY_ID_PATTERN = re.compile(r"^key_[0-9a-f]{16}$")


def error(status: int, type_: str, reason: str, message: str) -> dict[str, Any]:
    """The OpenAI-shaped envelope every admin error uses (§7)."""
    return {
        "error": {
            "type": type_,
            "code": str(status),
            "reason": reason,
            "message": message,
            "param": None,
        }
    }


def assert_timestamp(value: str) -> None:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert value.endswith("Z")
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 60


def assert_fresh_key(secret: str) -> None:
    """rlgw- + at least 32 random bytes, url-safe base64 (§2)."""
    assert KEY_PATTERN.match(secret), secret
    random_part = secret[len("rlgw-") :]
    assert len(base64.urlsafe_b64decode(random_part + "=" * (-len(random_part) % 4))) >= 32


class Admin:
    """The admin API of one gateway, as an operator's HTTP client sees it."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        async with self.session.request(
            method,
            self.base_url + path,
            json=body if raw is None else None,
            data=raw,
            headers=ADMIN_HEADERS if headers is None else headers,
        ) as response:
            assert response.content_type == "application/json"
            return response.status, await response.json()


@pytest.fixture
def admin(gateway: Gateway, http: aiohttp.ClientSession) -> Admin:
    return Admin(http, gateway.url)


async def chat(http: aiohttp.ClientSession, base_url: str, key: str) -> tuple[int, Any]:
    async with http.post(
        f"{base_url}/v1/chat/completions",
        json=CHAT_BODY,
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, await response.json()


ACME = {
    "id": "acme",
    "status": "active",
    "prepaid": True,
    "balance_usd": "10.50",
    "held_usd": "0.00",
    "available_usd": "10.50",
    "spent_usd": "0.00",
    "topped_up_usd": "10.50",
    "rpm": 60,
    "tpm": 10000,
    "concurrency": 4,
    "rpm_policy": "fixed",
    "rpm_override": None,
    "holds_live": 0,
    "holds_expired": 0,
    "overruns": 0,
    "timezone": "UTC",
    "budget": None,
    "model_limits": {},
}


async def create_acme(admin: Admin) -> dict[str, Any]:
    status, body = await admin.call(
        "POST",
        "/admin/accounts",
        {"id": "acme", "balance_usd": "10.50", "rpm": 60, "tpm": 10000, "concurrency": 4},
    )
    assert status == 201, body
    return dict(body)


# --- accounts ----------------------------------------------------------------------------


async def test_create_account_answers_201_with_amounts_as_decimal_strings(admin: Admin) -> None:
    created = await create_acme(admin)
    assert_timestamp(created.pop("created_at"))
    assert created == ACME


async def test_show_account_returns_what_create_returned(admin: Admin) -> None:
    created = await create_acme(admin)
    assert await admin.call("GET", "/admin/accounts/acme") == (200, created)


async def test_account_without_balance_is_not_prepaid(admin: Admin) -> None:
    status, body = await admin.call("POST", "/admin/accounts", {"id": "free.tier-1"})
    assert status == 201
    assert body["prepaid"] is False
    assert (body["balance_usd"], body["topped_up_usd"]) == ("0.00", "0.00")
    assert (body["rpm"], body["tpm"], body["concurrency"]) == (None, None, None)
    status, body = await admin.call("POST", "/admin/accounts", {"id": "zero", "balance_usd": "0"})
    assert (status, body["prepaid"], body["balance_usd"]) == (201, True, "0.00")


async def test_creating_an_existing_account_is_409_and_changes_nothing(admin: Admin) -> None:
    created = await create_acme(admin)
    assert await admin.call("POST", "/admin/accounts", {"id": "acme", "balance_usd": "99"}) == (
        409,
        error(409, "conflict_error", "account_exists", "account 'acme' already exists"),
    )
    assert await admin.call("GET", "/admin/accounts/acme") == (200, created)


async def test_list_accounts(admin: Admin) -> None:
    assert await admin.call("GET", "/admin/accounts") == (200, {"data": []})
    await create_acme(admin)
    await admin.call("POST", "/admin/accounts", {"id": "beta"})
    assert await admin.call("GET", "/admin/accounts") == (200, {"data": ["acme", "beta"]})


@pytest.mark.parametrize("bad_id", ["acme corp", "", "-lead", "a" * 65, "ünï", "a:b", "{a}"])
async def test_create_account_with_a_bad_id_is_400(admin: Admin, bad_id: str) -> None:
    assert await admin.call("POST", "/admin/accounts", {"id": bad_id}) == (
        400,
        error(
            400,
            "invalid_request_error",
            "invalid_request",
            f"account id must be 1-64 of A-Z a-z 0-9 _ . - (got {bad_id!r})",
        ),
    )


@pytest.mark.parametrize(
    ("body", "reason", "message"),
    [
        (
            {"id": "a", "rpm": "60"},
            "invalid_request",
            "Expected `int | null`, got `str` - at `$.rpm`",
        ),
        (
            {"id": "a", "tpm": True},
            "invalid_request",
            "Expected `int | null`, got `bool` - at `$.tpm`",
        ),
        ({"id": "a", "rpm": 0}, "invalid_request", "rpm must be a positive integer or null"),
        (
            {"id": "a", "concurrency": -1},
            "invalid_request",
            "concurrency must be a positive integer or null",
        ),
        ({"id": 7}, "invalid_request", "Expected `str`, got `int` - at `$.id`"),
        ({}, "invalid_request", "Object missing required field `id`"),
        ({"id": "a", "limit": 5}, "invalid_request", "Object contains unknown field `limit`"),
        (
            {"id": "a", "rpm_policy": "vip"},
            "invalid_request",
            "Invalid enum value 'vip' - at `$.rpm_policy`",
        ),
        ({"id": "a", "balance_usd": "ten"}, "invalid_amount", "'ten' is not a decimal amount"),
        ({"id": "a", "balance_usd": "-1.00"}, "invalid_amount", "'-1.00' must be ≥ 0"),
        (
            {"id": "a", "balance_usd": "0.0000000001"},
            "invalid_amount",
            "'0.0000000001' must have at most 9 decimal places",
        ),
        ({"id": "a", "balance_usd": "NaN"}, "invalid_amount", "'NaN' is not a decimal amount"),
        ({"id": "a", "balance_usd": "sNaN"}, "invalid_amount", "'sNaN' is not a decimal amount"),
    ],
)
async def test_create_account_with_bad_fields_is_400(
    admin: Admin, body: dict[str, Any], reason: str, message: str
) -> None:
    assert await admin.call("POST", "/admin/accounts", body) == (
        400,
        error(400, "invalid_request_error", reason, message),
    )
    assert await admin.call("GET", "/admin/accounts") == (200, {"data": []})


@pytest.mark.parametrize(
    ("amount", "as_string"), [(1.5, "1.50"), (10, "10.00"), (0.1, "0.10"), (1e-12, "1E-12")]
)
async def test_a_number_sent_for_a_usd_amount_is_400_with_the_string_to_send(
    admin: Admin, amount: float, as_string: str
) -> None:
    def hint(field: str) -> dict[str, Any]:
        refused = error(
            400,
            "invalid_request_error",
            "invalid_amount",
            "USD amounts are decimal strings, not JSON numbers: "
            f'send "{as_string}" - at `$.{field}`',
        )
        refused["error"]["param"] = field
        return refused

    assert await admin.call("POST", "/admin/accounts", {"id": "acme", "balance_usd": amount}) == (
        400,
        hint("balance_usd"),
    )
    await create_acme(admin)
    assert await admin.call(
        "POST", "/admin/accounts/acme/topup", {"amount_usd": amount, "idempotency_key": "k"}
    ) == (400, hint("amount_usd"))
    assert (await admin.call("GET", "/admin/accounts/acme"))[1]["balance_usd"] == "10.50"


async def test_invalid_json_body_is_400(admin: Admin) -> None:
    status, body = await admin.call("POST", "/admin/accounts", raw=b"{not json")
    assert status == 400
    assert body["error"]["reason"] == "invalid_json"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("Request body is not valid JSON: ")


async def test_show_unknown_account_is_404(admin: Admin) -> None:
    assert await admin.call("GET", "/admin/accounts/ghost") == (
        404,
        error(404, "not_found_error", "account_not_found", "account 'ghost' not found"),
    )


async def test_patch_sets_and_clears_limits(admin: Admin) -> None:
    await create_acme(admin)
    status, body = await admin.call(
        "PATCH",
        "/admin/accounts/acme",
        {"rpm": 120, "tpm": None, "rpm_policy": "tier", "rpm_override": 30},
    )
    assert status == 200
    assert (body["rpm"], body["tpm"], body["concurrency"]) == (120, None, 4)
    assert (body["rpm_policy"], body["rpm_override"]) == ("tier", 30)
    status, body = await admin.call(
        "PATCH", "/admin/accounts/acme", {"concurrency": None, "rpm_override": None}
    )
    assert status == 200
    assert (body["rpm"], body["tpm"], body["concurrency"], body["rpm_override"]) == (
        120,
        None,
        None,
        None,
    )
    shown = (await admin.call("GET", "/admin/accounts/acme"))[1]
    assert shown == body
    assert shown["balance_usd"] == "10.50"  # a patch never touches money


async def test_patch_can_make_an_account_postpaid(admin: Admin) -> None:
    await create_acme(admin)
    status, body = await admin.call("PATCH", "/admin/accounts/acme", {"prepaid": False})
    assert (status, body["prepaid"], body["balance_usd"]) == (200, False, "10.50")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"balance_usd": "100.00"}, "Object contains unknown field `balance_usd`"),
        ({"rpm": 5, "zeta": 1, "alpha": 2}, "Object contains unknown field `zeta`"),
        ({"rpm": "fast"}, "Expected `int | null`, got `str` - at `$.rpm`"),
        ({"tpm": 0}, "tpm must be a positive integer or null"),
        ({"rpm_policy": "vip"}, "Invalid enum value 'vip' - at `$.rpm_policy`"),
        ({"prepaid": "yes"}, "Expected `bool`, got `str` - at `$.prepaid`"),
    ],
)
async def test_patch_with_bad_fields_is_400_and_changes_nothing(
    admin: Admin, patch: dict[str, Any], message: str
) -> None:
    created = await create_acme(admin)
    assert await admin.call("PATCH", "/admin/accounts/acme", patch) == (
        400,
        error(400, "invalid_request_error", "invalid_request", message),
    )
    assert await admin.call("GET", "/admin/accounts/acme") == (200, created)


async def test_patch_unknown_account_is_404(admin: Admin) -> None:
    status, body = await admin.call("PATCH", "/admin/accounts/ghost", {"rpm": 5})
    assert (status, body["error"]["reason"]) == (404, "account_not_found")


# --- top-ups and the ledger ---------------------------------------------------------------


async def test_topup_credits_once_per_idempotency_key(admin: Admin) -> None:
    await create_acme(admin)
    body = {"amount_usd": "5.25", "idempotency_key": "invoice-7"}
    status, first = await admin.call("POST", "/admin/accounts/acme/topup", body)
    assert (status, first["credited"]) == (200, True)
    assert (first["account"]["balance_usd"], first["account"]["topped_up_usd"]) == (
        "15.75",
        "15.75",
    )
    status, again = await admin.call("POST", "/admin/accounts/acme/topup", body)
    assert (status, again["credited"]) == (200, False)
    assert again["account"] == first["account"]
    # The same key with another amount is a conflict (tests/test_topup_idempotency.py).
    status, other = await admin.call(
        "POST", "/admin/accounts/acme/topup", {"amount_usd": "1.00", "idempotency_key": "invoice-7"}
    )
    assert (status, other["error"]["reason"]) == (409, "idempotency_conflict")


@pytest.mark.parametrize(
    ("body", "status", "reason", "message"),
    [
        ({"amount_usd": "0", "idempotency_key": "k"}, 400, "invalid_amount", "'0' must be > 0"),
        ({"amount_usd": "-5", "idempotency_key": "k"}, 400, "invalid_amount", "'-5' must be > 0"),
        (
            {"amount_usd": "5"},
            400,
            "invalid_request",
            "Object missing required field `idempotency_key`",
        ),
        (
            {"amount_usd": "5", "idempotency_key": ""},
            400,
            "invalid_request",
            "idempotency_key is required (≤ 200 chars)",
        ),
    ],
)
async def test_bad_topup_is_refused(
    admin: Admin, body: dict[str, Any], status: int, reason: str, message: str
) -> None:
    await create_acme(admin)
    assert await admin.call("POST", "/admin/accounts/acme/topup", body) == (
        status,
        error(status, "invalid_request_error", reason, message),
    )
    assert (await admin.call("GET", "/admin/accounts/acme"))[1]["balance_usd"] == "10.50"


async def test_topup_of_unknown_account_is_404(admin: Admin) -> None:
    status, body = await admin.call(
        "POST", "/admin/accounts/ghost/topup", {"amount_usd": "5", "idempotency_key": "k"}
    )
    assert (status, body) == (
        404,
        error(404, "not_found_error", "account_not_found", "account 'ghost' not found"),
    )


async def test_ledger_lists_topups_newest_first(admin: Admin) -> None:
    await create_acme(admin)
    for n, amount in enumerate(("1.00", "0.000000001")):
        await admin.call(
            "POST",
            "/admin/accounts/acme/topup",
            {"amount_usd": amount, "idempotency_key": f"inv-{n}"},
        )
    status, body = await admin.call("GET", "/admin/accounts/acme/ledger")
    assert status == 200
    entries = body["data"]
    for entry in entries:
        assert_timestamp(entry.pop("time"))
        assert re.fullmatch(r"\d+-\d+", entry.pop("id"))
    assert entries == [
        {
            "type": "topup",
            "amount_usd": "0.000000001",
            "balance_usd": "11.500000001",
            "idempotency_key": "inv-1",
        },
        {"type": "topup", "amount_usd": "1.00", "balance_usd": "11.50", "idempotency_key": "inv-0"},
        {
            "type": "topup",
            "amount_usd": "10.50",
            "balance_usd": "10.50",
            "idempotency_key": "rlgw:initial-balance:acme",
        },
    ]
    status, body = await admin.call("GET", "/admin/accounts/acme/ledger?limit=1")
    assert (status, [e["idempotency_key"] for e in body["data"]]) == (200, ["inv-1"])


async def test_ledger_errors(admin: Admin) -> None:
    await create_acme(admin)
    assert await admin.call("GET", "/admin/accounts/acme/ledger?limit=ten") == (
        400,
        error(400, "invalid_request_error", "invalid_request", "limit must be an integer"),
    )
    status, body = await admin.call("GET", "/admin/accounts/ghost/ledger")
    assert (status, body["error"]["reason"]) == (404, "account_not_found")


# --- keys ------------------------------------------------------------------------------------


async def test_create_key_shows_the_secret_once(admin: Admin) -> None:
    await create_acme(admin)
    status, created = await admin.call(
        "POST",
        "/admin/keys",
        {
            "account": "acme",
            "name": "ci",
            "models": ["gpt-4o*", "claude-sonnet-4-6"],
            "rpm": 10,
            "tpm": 2000,
            "concurrency": 2,
            "expires_at": "2999-01-02T03:04:05Z",
        },
    )
    assert status == 201
    secret = created.pop("key")
    assert_fresh_key(secret)
    assert KEY_ID_PATTERN.match(created.pop("id"))
    assert_timestamp(created.pop("created_at"))
    assert created == {
        "account": "acme",
        "name": "ci",
        "prefix": secret[:12],
        "models": ["gpt-4o*", "claude-sonnet-4-6"],
        "rpm": 10,
        "tpm": 2000,
        "concurrency": 2,
        "expires_at": "2999-01-02T03:04:05Z",
        "revoked": False,
        "budget": None,
        "model_limits": {},
    }


async def test_every_key_is_new_random_and_listing_never_shows_it(admin: Admin) -> None:
    await create_acme(admin)
    created = [(await admin.call("POST", "/admin/keys", {"account": "acme"}))[1] for _ in range(3)]
    secrets = {c["key"] for c in created}
    assert len(secrets) == 3
    status, listing = await admin.call("GET", "/admin/keys?account=acme")
    assert status == 200
    assert sorted(k["id"] for k in listing["data"]) == sorted(c["id"] for c in created)
    for record in listing["data"]:
        assert "key" not in record
        assert record["revoked"] is False
        assert (record["models"], record["rpm"], record["expires_at"]) == ([], None, None)
    text = json.dumps(listing)
    assert not any(secret in text or secret[12:] in text for secret in secrets)


async def test_key_listing_errors(admin: Admin) -> None:
    assert await admin.call("GET", "/admin/keys?account=") == (
        400,
        error(400, "invalid_request_error", "invalid_request", "account must not be empty"),
    )
    status, body = await admin.call("GET", "/admin/keys?account=ghost")
    assert (status, body["error"]["reason"]) == (404, "account_not_found")


@pytest.mark.parametrize(
    ("body", "status", "reason", "message"),
    [
        ({"account": "ghost"}, 404, "account_not_found", "account 'ghost' not found"),
        (
            {"account": "acme", "rpm": 0},
            400,
            "invalid_request",
            "rpm must be a positive integer or null",
        ),
        (
            {"account": "acme", "models": "gpt-4o"},
            400,
            "invalid_request",
            "Expected `array | null`, got `str` - at `$.models`",
        ),
        (
            {"account": "acme", "models": [""]},
            400,
            "invalid_request",
            "models must be a list of model ids/globs",
        ),
        (
            {"account": "acme", "expires_at": "next week"},
            400,
            "invalid_request",
            "'next week' is not an RFC 3339 time",
        ),
        (
            {"account": "acme", "key": "rlgw-mine"},
            400,
            "invalid_request",
            "Object contains unknown field `key`",
        ),
    ],
)
async def test_create_key_with_bad_fields_is_refused(
    admin: Admin, body: dict[str, Any], status: int, reason: str, message: str
) -> None:
    await create_acme(admin)
    type_ = "not_found_error" if status == 404 else "invalid_request_error"
    assert await admin.call("POST", "/admin/keys", body) == (
        status,
        error(status, type_, reason, message),
    )
    assert (await admin.call("GET", "/admin/keys?account=acme"))[1] == {
        "data": [],
        "next_cursor": None,
    }


async def test_created_key_works_and_revoked_key_gets_401(
    admin: Admin, gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await create_acme(admin)
    _, created = await admin.call("POST", "/admin/keys", {"account": "acme"})
    status, _ = await chat(http, gateway.url, created["key"])
    assert status == 200
    status, revoked = await admin.call("DELETE", f"/admin/keys/{created['id']}")
    assert (status, revoked["id"], revoked["revoked"]) == (200, created["id"], True)
    assert "key" not in revoked
    assert await chat(http, gateway.url, created["key"]) == (
        401,
        error(401, "authentication_error", "key_revoked", "This API key has been revoked."),
    )
    listing = (await admin.call("GET", "/admin/keys?account=acme"))[1]["data"]
    assert [(k["id"], k["revoked"]) for k in listing] == [(created["id"], True)]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o", "messages": []},  # a model this key may not use
        {"model": "gpt-5-nonexistent", "messages": []},
        {"model": "claude-sonnet-4-6", "messages": []},  # the wrong route for this model
        {"messages": []},
    ],
)
async def test_revoked_key_gets_401_whatever_else_is_wrong_with_the_request(
    admin: Admin, gateway: Gateway, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    await create_acme(admin)
    _, created = await admin.call(
        "POST", "/admin/keys", {"account": "acme", "models": ["gpt-4o-mini"]}
    )
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert (await chat(http, gateway.url, created["key"]))[0] == 200  # the gateway caches the key
    await admin.call("DELETE", f"/admin/keys/{created['id']}")
    async with http.post(
        f"{gateway.url}/v1/chat/completions", json=body, headers=headers
    ) as response:
        assert (response.status, await response.json()) == (
            401,
            error(401, "authentication_error", "key_revoked", "This API key has been revoked."),
        )


async def test_revoking_an_unknown_key_is_404(admin: Admin) -> None:
    assert await admin.call("DELETE", "/admin/keys/key_0000000000000000") == (
        404,
        error(404, "not_found_error", "key_not_found", "key 'key_0000000000000000' not found"),
    )


async def test_keys_are_stored_only_as_sha256(admin: Admin, gateway: Gateway) -> None:
    await create_acme(admin)
    _, created = await admin.call(
        "POST", "/admin/keys", {"account": "acme", "name": "stored", "models": ["gpt-4o-mini"]}
    )
    secret = created["key"]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    dump = await dump_storage(gateway.storage)
    assert digest in dump
    assert secret not in dump
    assert secret[12:] not in dump  # not even the part after the listed prefix
    assert secret[len("rlgw-") :] not in dump


async def dump_storage(storage: Storage) -> str:
    """Every key name and every value in storage, as text."""
    readers = {
        "string": ("GET",),
        "hash": ("HGETALL",),
        "set": ("SMEMBERS",),
        "zset": ("ZRANGE", 0, -1, "WITHSCORES"),
        "list": ("LRANGE", 0, -1),
        "stream": ("XRANGE", "-", "+"),
    }
    parts = []
    for name in await storage.call("KEYS", "*"):
        kind = await storage.call("TYPE", name)
        command, *args = readers[kind]
        parts.append(f"{name} = {await storage.call(command, name, *args)!r}")
    assert parts
    return "\n".join(parts)


# --- the admin token ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"x-api-key": ADMIN_TOKEN},
    ],
)
async def test_missing_or_wrong_admin_token_is_401(admin: Admin, headers: dict[str, str]) -> None:
    assert await admin.call("POST", "/admin/accounts", {"id": "acme"}, headers=headers) == (
        401,
        error(401, "authentication_error", "invalid_admin_token", "Invalid admin token."),
    )
    assert (await admin.call("GET", "/admin/accounts/acme", headers=headers))[0] == 401
    assert (await admin.call("GET", "/admin/accounts"))[1] == {"data": []}


async def test_admin_api_is_disabled_without_a_token(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    runner, gateway = await start_gateway(upstream, storage, environ={})
    try:
        plain = Admin(http, gateway.url)
        disabled = error(
            404,
            "not_found_error",
            "admin_disabled",
            "The admin API is disabled (RLGW_ADMIN_TOKEN is not set).",
        )
        assert await plain.call("POST", "/admin/accounts", {"id": "acme"}) == (404, disabled)
        assert await plain.call("GET", "/admin/keys?account=acme", headers={}) == (404, disabled)
    finally:
        await runner.cleanup()
    assert await storage.call("KEYS", "*") == []


async def test_revocation_reaches_every_instance_on_the_next_request(
    admin: Admin, gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    runner, other = await start_gateway(upstream, gateway.storage)
    try:
        await create_acme(admin)
        _, created = await admin.call("POST", "/admin/keys", {"account": "acme"})
        secret = created["key"]
        # Both instances have now looked the key up (and may cache it).
        assert (await chat(http, gateway.url, secret))[0] == 200
        assert (await chat(http, other.url, secret))[0] == 200
        assert (await admin.call("DELETE", f"/admin/keys/{created['id']}"))[0] == 200
        status, body = await chat(http, other.url, secret)
        assert (status, body["error"]["reason"]) == (401, "key_revoked")
        status, body = await chat(http, gateway.url, secret)
        assert (status, body["error"]["reason"]) == (401, "key_revoked")
    finally:
        await runner.cleanup()


# --- the CLI (real Redis only) -----------------------------------------------------------------


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_accounts_with_json_output(redis_url: str) -> None:
    storage = ("--storage", redis_url)
    created = cli_json(
        "accounts",
        "create",
        "acme",
        "--balance-usd",
        "10.00",
        "--rpm",
        "60",
        "--concurrency",
        "3",
        *storage,
    )
    created_at = created.pop("created_at")
    assert_timestamp(created_at)
    assert created == {
        **ACME,
        "balance_usd": "10.00",
        "available_usd": "10.00",
        "topped_up_usd": "10.00",
        "tpm": None,
        "concurrency": 3,
    }
    assert cli_json("accounts", "show", "acme", *storage) == {**created, "created_at": created_at}

    updated = cli_json(
        "accounts",
        "update",
        "acme",
        "--rpm",
        "0",
        "--tpm",
        "5000",
        "--rpm-policy",
        "balance",
        *storage,
    )
    assert (updated["rpm"], updated["tpm"], updated["concurrency"], updated["rpm_policy"]) == (
        None,
        5000,
        3,
        "balance",
    )

    topup = ("accounts", "topup", "acme", "2.50", "--idempotency-key", "inv-1", *storage)
    first = cli_json(*topup)
    assert (first["credited"], first["account"]["balance_usd"]) == (True, "12.50")
    again = cli_json(*topup)
    assert (again["credited"], again["account"]["balance_usd"]) == (False, "12.50")

    ledger = cli_json("accounts", "ledger", "acme", *storage)
    assert [
        (e["type"], e["amount_usd"], e["balance_usd"], e["idempotency_key"]) for e in ledger
    ] == [
        ("topup", "2.50", "12.50", "inv-1"),
        ("topup", "10.00", "10.00", "rlgw:initial-balance:acme"),
    ]
    newest = cli("accounts", "ledger", "acme", "--limit", "1", "--json", *storage)
    assert len(json.loads(newest.stdout)) == 1
    # A full page: the next one starts before its last entry.
    assert newest.stderr == f"next before: {json.loads(newest.stdout)[0]['id']}\n"
    older = ("--before", json.loads(newest.stdout)[0]["id"])
    assert cli_json("accounts", "ledger", "acme", *older, *storage) == ledger[1:]

    cli_json("accounts", "create", "beta", *storage)
    assert cli_json("accounts", "list", *storage) == ["acme", "beta"]


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_accounts_with_text_output(redis_url: str) -> None:
    storage = ("--storage", redis_url)
    created = cli_text(
        "accounts", "create", "acme", "--balance-usd", "10.00", "--tpm", "900", *storage
    )
    assert (created["id"], created["balance_usd"], created["prepaid"]) == ("acme", "10.00", "yes")
    assert (created["rpm"], created["tpm"]) == ("-", "900")
    shown = cli_text("accounts", "show", "acme", *storage)
    assert shown == created
    updated = cli_text(
        "accounts", "update", "acme", "--concurrency", "2", "--prepaid", "no", *storage
    )
    assert (updated["concurrency"], updated["prepaid"], updated["tpm"]) == ("2", "no", "900")
    topped = cli("accounts", "topup", "acme", "1.25", "--idempotency-key", "inv-1", *storage)
    assert topped.returncode == 0
    # The nested account is indented under its name, field by field: no Python reprs.
    assert topped.stdout.startswith("credited  yes\naccount\n  id             acme\n")
    assert "\n  balance_usd    11.25\n" in topped.stdout
    assert "\n  rpm            -\n" in topped.stdout
    ledger = cli("accounts", "ledger", "acme", *storage)
    assert ledger.returncode == 0
    blocks = [block for block in ledger.stdout.split("\n\n") if block.strip()]
    assert len(blocks) == 2
    assert "amount_usd       1.25" in blocks[0]
    assert "idempotency_key  rlgw:initial-balance:acme" in blocks[1]
    listed = cli("accounts", "list", *storage)
    assert (listed.returncode, listed.stdout) == (0, "acme\n")


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_keys_create_list_revoke(redis_url: str) -> None:
    storage = ("--storage", redis_url)
    cli_json("accounts", "create", "acme", *storage)
    created = cli_json(
        "keys",
        "create",
        "acme",
        "--name",
        "ci",
        "--models",
        "gpt-4o-mini,gpt-4o",
        "--rpm",
        "10",
        *storage,
    )
    secret = created.pop("key")
    assert_fresh_key(secret)
    key_id = created.pop("id")
    assert KEY_ID_PATTERN.match(key_id)
    assert_timestamp(created.pop("created_at"))
    assert created == {
        "account": "acme",
        "name": "ci",
        "prefix": secret[:12],
        "models": ["gpt-4o-mini", "gpt-4o"],
        "rpm": 10,
        "tpm": None,
        "concurrency": None,
        "expires_at": None,
        "revoked": False,
        "budget": None,
        "model_limits": {},
    }
    text_created = cli_text("keys", "create", "acme", "--name", "batch", *storage)
    assert_fresh_key(text_created["key"])
    assert (text_created["name"], text_created["models"], text_created["expires_at"]) == (
        "batch",
        "-",
        "-",
    )

    listing = cli_json("keys", "list", "acme", *storage)
    assert sorted(k["id"] for k in listing) == sorted([key_id, text_created["id"]])
    assert all("key" not in k for k in listing)
    listing_text = cli("keys", "list", "acme", *storage).stdout
    assert key_id in listing_text
    assert secret not in listing_text and text_created["key"] not in listing_text

    revoked = cli_json("keys", "revoke", key_id, *storage)
    assert (revoked["id"], revoked["revoked"]) == (key_id, True)
    revoked_text = cli_text("keys", "revoke", text_created["id"], *storage)
    assert revoked_text["revoked"] == "yes"
    assert all(k["revoked"] for k in cli_json("keys", "list", "acme", *storage))


@pytest.mark.slow  # runs the CLI as a subprocess
async def test_a_key_made_by_the_cli_works_on_a_gateway_using_that_storage(
    redis_url: str, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    store = ("--storage", redis_url)
    cli_json("accounts", "create", "acme", "--balance-usd", "1.00", *store)
    created = cli_json("keys", "create", "acme", "--models", "gpt-4o-mini", *store)
    storage = open_storage(StorageSettings(url=redis_url))
    runner, gateway = await start_gateway(upstream, storage)
    try:
        status, body = await chat(http, gateway.url, created["key"])
        assert status == 200, body
        cli_json("keys", "revoke", created["id"], *store)
        status, body = await chat(http, gateway.url, created["key"])
        assert (status, body["error"]["reason"]) == (401, "key_revoked")
    finally:
        await runner.cleanup()
        await storage.close()


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_refuses_memory_storage() -> None:
    done = cli("accounts", "list", "--storage", "memory://")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        "error: memory:// storage lives inside one gateway process; pass --storage "
        "redis://… (or a --config using Redis), or use the admin API of the running gateway\n"
    )


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_takes_the_storage_from_a_config_file(redis_url: str, tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'[storage]\nurl = "{redis_url}"\n')
    cli_json("accounts", "create", "acme", "--storage", redis_url)
    assert cli_json("accounts", "list", "--config", str(config)) == ["acme"]


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_errors_name_the_problem_and_exit_non_zero(redis_url: str) -> None:
    storage = ("--storage", redis_url)
    cases = [
        (("accounts", "show", "ghost"), "error: account 'ghost' not found\n"),
        (("keys", "create", "ghost"), "error: account 'ghost' not found\n"),
        (
            ("keys", "revoke", "key_0000000000000000"),
            "error: key 'key_0000000000000000' not found\n",
        ),
        (
            ("accounts", "topup", "ghost", "1.00", "--idempotency-key", "k"),
            "error: account 'ghost' not found\n",
        ),
        (
            ("accounts", "create", "acme", "--balance-usd", "1.2.3"),
            "error: '1.2.3' is not a decimal amount\n",
        ),
    ]
    for args, message in cases:
        done = cli(*args, *storage, "--json")
        assert (done.returncode, done.stdout, done.stderr) == (1, "", message), args
    assert cli_json("accounts", "list", *storage) == []


async def test_an_absurd_top_up_is_a_400_not_a_storage_error(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        await http.post(
            f"{gateway.url}/admin/accounts",
            json={"id": "big"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        async with http.post(
            f"{gateway.url}/admin/accounts/big/topup",
            json={"amount_usd": "99999999999", "idempotency_key": "k"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response:
            assert response.status == 400
            assert "at most" in (await response.json())["error"]["message"]


async def test_a_key_indexed_by_an_earlier_build_still_authenticates(gateway: Gateway) -> None:
    # Earlier builds stored "account key_id" in the key index instead of the key's record.
    from ratelimit_gw import keyspace
    from ratelimit_gw.keys import hash_key

    key = await gateway.new_key()
    (record,) = await gateway.accounts.list_keys("acme")
    await gateway.storage.call("SET", keyspace.key_by_hash(hash_key(key)), f"acme {record.id}")
    found = await gateway.accounts.find_key(key)
    assert found is not None and (found.id, found.account) == (record.id, "acme")
