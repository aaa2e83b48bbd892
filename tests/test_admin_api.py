"""The admin API as one table (admin.ROUTES): every route documented, named tokens with full
or read access, and one audit line per change with the token's name.

Tests that go over the table pick up a route added later by themselves; a state-changing one
fails here until it has an example call in :data:`CHANGES`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import schemathesis
from aiohttp import web

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.admin import ROUTES
from ratelimit_gw.admin_openapi import openapi_document
from ratelimit_gw.admin_routes import AccountId, AdminRoute, KeyId, register, route_body
from ratelimit_gw.app import create_app
from ratelimit_gw.limits import MAX_LIMIT
from ratelimit_gw.money import parse_usd
from ratelimit_gw.serve import make_runner
from ratelimit_gw.settings import AdminToken, ConfigError, build_settings, parse_settings
from ratelimit_gw.storage import Storage
from ratelimit_gw.webhook_outbox import AccountWebhook, AccountWebhooks

from .conftest import (
    ADMIN_TOKEN,
    UPSTREAM_KEY,
    Gateway,
    Upstream,
    gateway_config,
    start_gateway,
)

OPS_TOKEN = "ops-token-0123456789"
VIEWER_TOKEN = "viewer-token-0123456789"
TOKENS_CONFIG = {
    "tokens": [
        {"name": "ops", "token": "${RLGW_OPS_TOKEN}", "access": "full"},
        {"name": "viewer", "token": "${RLGW_VIEWER_TOKEN}", "access": "read"},
    ]
}
TOKENS_ENV = {"RLGW_OPS_TOKEN": OPS_TOKEN, "RLGW_VIEWER_TOKEN": VIEWER_TOKEN}

# One call that succeeds, per route that changes state: (path, body). ``{key}`` is the id of
# the key the test prepared on account ``acme``.
CHANGES: dict[str, tuple[str, Any]] = {
    "create_account": ("/admin/accounts", {"id": "beta", "balance_usd": "1.00", "rpm": 5}),
    "update_account": ("/admin/accounts/acme", {"rpm": 7, "tpm": None}),
    "topup": ("/admin/accounts/acme/topup", {"amount_usd": "2.50", "idempotency_key": "inv-1"}),
    "create_key": ("/admin/keys", {"account": "acme", "name": "ci", "rpm": 3}),
    "revoke_key": ("/admin/keys/{key}", None),
    "adjust": (
        "/admin/accounts/acme/adjust",
        {"amount_usd": "-1.25", "reason": "refund of ticket 12", "idempotency_key": "adj-12"},
    ),
    "disable_account": ("/admin/accounts/acme/disable", None),
    "enable_account": ("/admin/accounts/acme/enable", None),
    "delete_account": ("/admin/accounts/acme?force=true", None),
    "update_key": ("/admin/keys/{key}", {"name": "batch", "models": ["gpt-*"], "rpm": None}),
    "rotate_key": ("/admin/keys/{key}/rotate", {"grace_s": 60}),
    "reload_configuration": ("/admin/config/reload", None),
    "set_account_webhook": (
        "/admin/accounts/acme/webhook",
        {"url": "https://hooks.example/acme", "events": ["balance.low"], "balance_below_usd": "5"},
    ),
    "delete_account_webhook": ("/admin/accounts/acme/webhook", None),
}
# What must hold before a change's call can change something (enabling needs a disabled one).
PREPARE: dict[str, Callable[[AccountStore], Awaitable[object]]] = {
    "enable_account": lambda accounts: accounts.set_disabled("acme", True),
    "delete_account_webhook": lambda accounts: AccountWebhooks(accounts.storage).put(
        "acme", AccountWebhook(url="https://hooks.example/acme", events=("balance.low",))
    ),
}
CHANGING = [pytest.param(r, id=r.operation_id) for r in ROUTES if r.changes_state]
READING = [pytest.param(r, id=r.operation_id) for r in ROUTES if not r.changes_state]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def gw(
    upstream: Upstream, storage: Storage, tmp_path: Path, archive_database: str
) -> AsyncIterator[Gateway]:
    """A gateway whose admin API takes RLGW_ADMIN_TOKEN (``default``), ``ops`` and ``viewer``,
    with account ``acme`` ($10) and one key on it, made behind the API's back (no audit); its
    config in a file, so it can reload; with a ledger archive (the usage report reads it)."""
    runner, gateway = await start_gateway(
        upstream,
        storage,
        {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN, **TOKENS_ENV},
        config_file=tmp_path / "gateway.toml",
        admin=TOKENS_CONFIG,
        archive={"url": archive_database, "in_serve": False},
    )
    await gateway.accounts.create_account("acme", balance_nano=parse_usd("10.00"))
    try:
        yield gateway
    finally:
        await runner.cleanup()


@pytest.fixture
async def key_id(gw: Gateway) -> str:
    return (await gw.accounts.create_key("acme")).record.id


def existing_path(route: AdminRoute, key_id: str) -> str:
    """The route's path with its ids those of ``acme`` and its key, required queries set."""
    ids = {AccountId: "acme", KeyId: key_id}
    path = route.path
    for name, kind in route.path_types.items():
        path = path.replace(f"{{{name}}}", ids[kind])
    query = "&".join(f"{q.name}={ids[q.type]}" for q in route.query if q.required)
    return f"{path}?{query}" if query else path


async def call(
    http: aiohttp.ClientSession, gw: Gateway, method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, gw.url + path, json=body, headers=bearer(token)) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "ratelimit_gw.audit"]


# --- one table: registered, guarded, documented ------------------------------------------------


async def test_every_registered_admin_route_is_in_the_document_and_no_other(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    status, document = await call(http, gw, "GET", "/admin/openapi.json", VIEWER_TOKEN)
    assert status == 200
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    registered = {
        (route.method, route.resource.canonical)
        for route in gw.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/admin")
        and route.method != "HEAD"
    }
    assert registered == documented
    assert len(documented) == len(ROUTES)


async def test_the_served_document_is_valid_openapi_3_1(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    document = (await call(http, gw, "GET", "/admin/openapi.json", VIEWER_TOKEN))[1]
    assert document["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(document).validate()  # against the OpenAPI 3.1 schema


async def test_every_documented_operation_lists_its_errors_with_the_error_schema(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    document = (await call(http, gw, "GET", "/admin/openapi.json", ADMIN_TOKEN))[1]
    error_ref = {"$ref": "#/components/schemas/AdminError"}
    for route in ROUTES:
        responses = document["paths"][route.path][route.method.lower()]["responses"]
        statuses = {int(status) for status in responses}
        assert {route.status, 401, 404, 503, 529} <= statuses, route.operation_id
        assert (403 in statuses) == route.changes_state, route.operation_id
        assert (route.body is not None) == ({408, 413} <= statuses), route.operation_id
        for status, answer in responses.items():
            if int(status) >= 400:
                assert answer["content"]["application/json"]["schema"] == error_ref


async def test_limits_are_documented_flat_as_they_travel(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    schemas = (await call(http, gw, "GET", "/admin/openapi.json", ADMIN_TOKEN))[1]["components"][
        "schemas"
    ]
    assert "Limits" not in schemas
    for name in ("CreateAccountBody", "CreateKeyBody", "Account", "KeyRecord", "IssuedKey"):
        properties = schemas[name]["properties"]
        assert "limits" not in properties
        assert {"rpm", "tpm", "concurrency"} <= set(properties), name
    assert set(schemas["Account"]["required"]) >= {"rpm", "tpm", "concurrency"}
    assert schemas["TopupBody"]["properties"]["amount_usd"]["examples"] == ["10.00"]


# --- named tokens: full and read-only ----------------------------------------------------------


@pytest.mark.parametrize("route", READING)
async def test_a_read_only_token_may_read(
    route: AdminRoute, gw: Gateway, http: aiohttp.ClientSession, key_id: str
) -> None:
    status, _ = await call(http, gw, "GET", existing_path(route, key_id), VIEWER_TOKEN)
    assert status == 200


@pytest.mark.parametrize("route", CHANGING)
async def test_a_read_only_token_may_change_nothing(
    route: AdminRoute,
    gw: Gateway,
    http: aiohttp.ClientSession,
    key_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if route.operation_id in PREPARE:
        await PREPARE[route.operation_id](gw.accounts)
    caplog.set_level(logging.INFO, logger="ratelimit_gw.audit")
    account_before = await gw.accounts.get_account("acme")
    key_before = await gw.accounts.get_key("acme", key_id)
    path, body = CHANGES[route.operation_id]
    status, answer = await call(http, gw, route.method, path.format(key=key_id), VIEWER_TOKEN, body)
    assert (status, answer["error"]) == (
        403,
        {
            "type": "permission_error",
            "code": "403",
            "reason": "read_only_admin_token",
            "message": "The admin token 'viewer' is read-only: it may only read (GET).",
            "param": None,
        },
    )
    assert await gw.accounts.get_account("acme") == account_before
    assert await gw.accounts.get_key("acme", key_id) == key_before
    assert await gw.accounts.list_accounts() == ["acme"]
    assert audit_lines(caplog) == []


async def test_each_named_token_is_accepted_and_an_unknown_one_is_401(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    for token in (ADMIN_TOKEN, OPS_TOKEN, VIEWER_TOKEN):
        assert (await call(http, gw, "GET", "/admin/accounts", token))[0] == 200
    for token in ("", "ops", OPS_TOKEN[:-1], OPS_TOKEN + VIEWER_TOKEN):
        status, answer = await call(http, gw, "GET", "/admin/accounts", token)
        assert (status, answer["error"]["reason"]) == (401, "invalid_admin_token")


async def test_named_tokens_alone_turn_the_admin_api_on(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    runner, gateway = await start_gateway(upstream, storage, TOKENS_ENV, admin=TOKENS_CONFIG)
    try:
        assert (await call(http, gateway, "GET", "/admin/accounts", OPS_TOKEN))[0] == 200
        status, answer = await call(http, gateway, "GET", "/admin/accounts", ADMIN_TOKEN)
        assert (status, answer["error"]["reason"]) == (401, "invalid_admin_token")
    finally:
        await runner.cleanup()


# --- the audit trail ----------------------------------------------------------------------------


@pytest.mark.parametrize("route", CHANGING)
async def test_every_change_writes_one_audit_line_naming_the_token(
    route: AdminRoute,
    gw: Gateway,
    http: aiohttp.ClientSession,
    key_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert route.operation_id in CHANGES, (
        f"{route.method} {route.path} changes state: add a call that succeeds to CHANGES"
    )
    if route.operation_id in PREPARE:
        await PREPARE[route.operation_id](gw.accounts)
    caplog.set_level(logging.INFO, logger="ratelimit_gw.audit")
    path, body = CHANGES[route.operation_id]
    status, answer = await call(http, gw, route.method, path.format(key=key_id), OPS_TOKEN, body)
    assert status == route.status, answer
    [line] = audit_lines(caplog)
    assert line["actor"] == "ops"
    assert line["action"].count(".") == 1  # <noun>.<verb>
    assert line["target"] in (answer.get("id"), "acme", "config")
    assert line["after"] is not None and line["after"] != line["before"]
    assert "key" not in line["after"]  # never the secret


@pytest.mark.parametrize("route", READING)
async def test_reads_write_no_audit_line(
    route: AdminRoute,
    gw: Gateway,
    http: aiohttp.ClientSession,
    key_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimit_gw.audit")
    assert (await call(http, gw, "GET", existing_path(route, key_id), OPS_TOKEN))[0] == 200
    assert audit_lines(caplog) == []


async def test_a_gateway_built_without_a_file_has_nothing_to_reload(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    runner, gateway = await start_gateway(upstream, storage, {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        status, answer = await call(http, gateway, "POST", "/admin/config/reload", ADMIN_TOKEN)
    finally:
        await runner.cleanup()
    assert (status, answer["error"]["reason"]) == (409, "no_config_file")


async def test_the_default_token_is_the_actor_default(
    gw: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimit_gw.audit")
    status, _ = await call(
        http, gw, "PATCH", "/admin/accounts/acme", ADMIN_TOKEN, {"concurrency": 2}
    )
    assert status == 200
    [line] = audit_lines(caplog)
    assert (line["actor"], line["action"], line["target"]) == ("default", "account.update", "acme")
    assert (line["before"]["concurrency"], line["after"]["concurrency"]) == (None, 2)


# --- limits the document promises -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/admin/accounts", {"id": "beta", "rpm": 2**53}),
        ("POST", "/admin/accounts", {"id": "beta", "rpm_override": 2**64}),
        ("PATCH", "/admin/accounts/acme", {"tpm": 1691318671228757153247395840}),
        ("POST", "/admin/keys", {"account": "acme", "concurrency": 2**53}),
    ],
)
async def test_a_limit_beyond_what_storage_counts_exactly_is_400(
    gw: Gateway, http: aiohttp.ClientSession, method: str, path: str, body: dict[str, Any]
) -> None:
    """Found by the fuzzer: such a limit was stored, and the answer broke the document."""
    account_before = await gw.accounts.get_account("acme")
    [(name, _)] = [(k, v) for k, v in body.items() if k not in ("id", "account")]
    status, answer = await call(http, gw, method, path, ADMIN_TOKEN, body)
    assert (status, answer["error"]["message"]) == (400, f"{name} must be at most {MAX_LIMIT}")
    assert await gw.accounts.get_account("acme") == account_before
    assert await gw.accounts.list_accounts() == ["acme"]
    assert await gw.accounts.list_keys("acme") == []


async def test_the_largest_limit_is_accepted(gw: Gateway, http: aiohttp.ClientSession) -> None:
    status, answer = await call(
        http, gw, "PATCH", "/admin/accounts/acme", ADMIN_TOKEN, {"tpm": MAX_LIMIT}
    )
    assert (status, answer["tpm"]) == (200, MAX_LIMIT)


# --- [[admin.tokens]] in the config --------------------------------------------------------------


def tokens_toml(*entries: str) -> str:
    return "\n".join(f"[[admin.tokens]]\n{entry}" for entry in entries)


def test_admin_tokens_resolve_with_the_default_token_first() -> None:
    settings = parse_settings(
        tokens_toml(
            'name = "ops"\ntoken = "${RLGW_OPS_TOKEN}"\naccess = "full"',
            'name = "grafana.ro"\ntoken = "${RLGW_VIEWER_TOKEN}"\naccess = "read"',
        ),
        {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN, **TOKENS_ENV},
    )
    assert settings.admin_tokens == (
        AdminToken(name="default", token=ADMIN_TOKEN, access="full"),
        AdminToken(name="ops", token=OPS_TOKEN, access="full"),
        AdminToken(name="grafana.ro", token=VIEWER_TOKEN, access="read"),
    )
    assert settings.admin_token == ADMIN_TOKEN


@pytest.mark.parametrize(
    ("entries", "environ", "message"),
    [
        (
            ['name = "ops"\ntoken = "${RLGW_OPS_TOKEN}"\naccess = "full"'],
            {},
            "admin.tokens[0].token: environment variable RLGW_OPS_TOKEN is not set",
        ),
        (
            ['name = "ops"\ntoken = "${RLGW_OPS_TOKEN}"\naccess = "full"'],
            {"RLGW_OPS_TOKEN": ""},
            "admin.tokens[0].token: environment variable RLGW_OPS_TOKEN is empty",
        ),
        (
            ['name = "ops"\ntoken = "s3cret-in-the-file"\naccess = "full"'],
            {},
            "admin.tokens[0].token: must be an env reference like ${RLGW_OPS_TOKEN}, "
            "never the secret itself",
        ),
        (
            [
                'name = "ops"\ntoken = "${RLGW_OPS_TOKEN}"\naccess = "full"',
                'name = "ops"\ntoken = "${RLGW_VIEWER_TOKEN}"\naccess = "read"',
            ],
            TOKENS_ENV,
            "admin.tokens[1].name: duplicate admin token name 'ops'",
        ),
        (
            ['name = "default"\ntoken = "${RLGW_OPS_TOKEN}"\naccess = "read"'],
            TOKENS_ENV,
            "admin.tokens[0].name: 'default' is the name of the RLGW_ADMIN_TOKEN token; "
            "choose another",
        ),
        (
            [
                'name = "ops"\ntoken = "${RLGW_OPS_TOKEN}"\naccess = "full"',
                'name = "ci"\ntoken = "${RLGW_OPS_TOKEN}"\naccess = "read"',
            ],
            TOKENS_ENV,
            "admin.tokens[1].token: the same secret as admin token 'ops'",
        ),
        (
            ['name = "ops"\ntoken = "${RLGW_OPS_TOKEN}"\naccess = "full"'],
            {"RLGW_OPS_TOKEN": "ops-token\n"},
            "admin.tokens[0].token: the secret starts or ends with whitespace "
            "(a trailing newline?)",
        ),
        (
            [],
            {"RLGW_ADMIN_TOKEN": "admin-token\r\n"},
            "admin.token_env (RLGW_ADMIN_TOKEN): the secret starts or ends with whitespace "
            "(a trailing newline?)",
        ),
        (
            ['name = "ops"\ntoken = "${RLGW_OPS_TOKEN}"'],
            TOKENS_ENV,
            "admin.tokens[0].access: required field is missing",
        ),
        (
            ['name = "ops"\ntoken = "${RLGW_OPS_TOKEN}"\naccess = "admin"'],
            TOKENS_ENV,
            "admin.tokens[0].access: 'admin' is not one of full, read",
        ),
        (
            ['name = "ops team"\ntoken = "${RLGW_OPS_TOKEN}"\naccess = "full"'],
            TOKENS_ENV,
            "admin.tokens[0].name: 'ops team' must be 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
        ),
    ],
)
def test_bad_admin_tokens_are_refused_naming_the_field(
    entries: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings(tokens_toml(*entries), environ)
    assert str(refused.value) == message


# --- the table's mechanics, on a route of the test's own ----------------------------------------


class GraceBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    grace_s: int = 60


async def echo_grace(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, GraceBody)
    return web.json_response({"grace_s": body.grace_s})


ECHO_ROUTE = AdminRoute(
    "POST", "/admin/echo", echo_grace, "Echo", dict[str, int], body=GraceBody, body_optional=True
)


async def test_a_route_with_an_optional_body_reads_none_as_its_defaults(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    settings = build_settings(
        gateway_config(upstream.url, storage.url),
        {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN, "RLGW_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
    )
    app = create_app(settings, storage)
    register(app, (ECHO_ROUTE,))
    runner = make_runner(app, settings.server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/admin/echo"
    try:
        for data, expected in ((b"", 200), (b" ", 200), (b'{"grace_s": 5}', 200), (b"[]", 400)):
            async with http.post(url, data=data, headers=bearer(ADMIN_TOKEN)) as response:
                assert response.status == expected, data
                if expected == 200:
                    assert (await response.json())["grace_s"] == (5 if b"5" in data else 60)
    finally:
        await runner.cleanup()
    operation = openapi_document((ECHO_ROUTE,))["paths"]["/admin/echo"]["post"]
    assert operation["requestBody"]["required"] is False
