"""Input that used to end in a 500 (issue 17, item 9): JSON nested 100,000 levels deep, on
every route that reads a body, and key expiry times out of range (admin API and CLI).

Both are the caller's mistake: a 400 in the route's envelope, no traceback in any log, and
nothing admitted, held or forwarded. HTTP tests run on memory:// and on a real Redis; the CLI
test on the real Redis (the CLI refuses memory://).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from ratelimit_gw.storage import Storage

from .cli_helpers import cli
from .conftest import ADMIN_TOKEN, Gateway, Upstream, custom_endpoint, start_gateway

ROOT = Path(__file__).resolve().parent.parent
LEVELS = 100_000
DEEP = "[" * LEVELS + "]" * LEVELS
MESSAGES = '[{"role": "user", "content": "hi"}]'
# route -> (path, auth header kind, body naming the route's model with a deep field inside)
ROUTES: dict[str, tuple[str, str, str]] = {
    "chat": (
        "/v1/chat/completions",
        "bearer",
        f'{{"model": "gpt-4o-mini", "messages": {MESSAGES}, "extra": {DEEP}}}',
    ),
    "responses": ("/v1/responses", "bearer", f'{{"model": "gpt-4o-mini", "input": {DEEP}}}'),
    "messages": (
        "/v1/messages",
        "anthropic",
        f'{{"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": {DEEP}}}',
    ),
    "gemini generate": (
        "/v1beta/models/gemini-2.5-flash:generateContent",
        "gemini",
        f'{{"contents": {DEEP}}}',
    ),
    "gemini stream": (
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        "gemini",
        f'{{"contents": {DEEP}}}',
    ),
    "proxy": (
        "/proxy-api/acme-ai/llm/v1/chat/completions",
        "bearer",
        f'{{"model": "gpt-4o-mini", "messages": {DEEP}}}',
    ),
    "proxy, no model": ("/proxy-api/acme-ai/llm/v1/embeddings", "bearer", f'{{"input": {DEEP}}}'),
    "admin create account": ("/admin/accounts", "admin", f'{{"id": "new", "x": {DEEP}}}'),
    "admin patch account": ("/admin/accounts/acme", "admin", f'{{"rpm": {DEEP}}}'),
    "admin create key": ("/admin/keys", "admin", f'{{"account": "acme", "models": {DEEP}}}'),
}

# Admin bodies decode into strict Structs: the first misplaced value is refused before any
# depth is reached (still a 400, never a 500).
SCHEMA_FIRST = {"admin create account", "admin create key", "admin patch account"}


def headers_for(kind: str, key: str) -> dict[str, str]:
    if kind == "anthropic":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    if kind == "gemini":
        return {"x-goog-api-key": key}
    if kind == "admin":
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def gw(upstream: Upstream, storage: Storage) -> AsyncIterator[Gateway]:
    runner, gateway = await start_gateway(
        upstream,
        storage,
        {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN, "ENDPOINT_KEY": "endpoint-secret"},
        custom_endpoints=[custom_endpoint(upstream.url)],
    )
    try:
        yield gateway
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("route", ROUTES)
async def test_deeply_nested_json_is_a_400_on_every_route_without_a_traceback(
    gw: Gateway, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    path, auth, body = ROUTES[route]
    key = await gw.new_key("acme", balance_usd="1.00")
    method = "PATCH" if route == "admin patch account" else "POST"
    headers = {**headers_for(auth, key), "Content-Type": "application/json"}
    with caplog.at_level(logging.INFO):
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, gw.url + path, data=body.encode(), headers=headers) as response,
        ):
            status, answer = response.status, await response.json(content_type=None)
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error"
    if route in SCHEMA_FIRST:
        assert error["reason"] == "invalid_request"
    else:
        assert (error["reason"], error["message"]) == (
            "invalid_json",
            "Request body is nested too deeply.",
        )
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []
    # Refused before admission: nothing forwarded, held or charged.
    assert [r for r in gw.upstream.state.requests if not r.path.startswith("/mock/")] == []
    account = await gw.accounts.get_account("acme")
    assert (account.balance_usd, account.holds_live) == ("1.00", 0)
    assert [e.type for e in await gw.accounts.ledger("acme")] == ["topup"]


OUT_OF_RANGE = [
    "100000000000000000000",  # 1e20 seconds
    "253402300800",  # the first second of year 10000
    "9999-12-31T23:59:59-23:59",  # year 9999 here, 10000 in UTC
    "1969-12-31T23:59:59Z",  # before 1970
    "0001-01-01T00:00:00+23:59",  # year 0 in UTC
]
NOT_A_TIME = ["99999-01-01T00:00:00Z", "+99999-01-01", "1e20", "-1", "inf", "nan"]


@pytest.mark.parametrize("expires_at", OUT_OF_RANGE + NOT_A_TIME)
async def test_an_expiry_out_of_range_is_a_400_and_creates_no_key(
    gateway: Gateway, expires_at: str
) -> None:
    await gateway.accounts.create_account("acme")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway.url}/admin/keys",
            json={"account": "acme", "expires_at": expires_at},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response,
    ):
        status, answer = response.status, await response.json()
    expected = (
        f"{expires_at!r} is out of range (1970 to the end of 9999)"
        if expires_at in OUT_OF_RANGE
        else f"{expires_at!r} is not an RFC 3339 time"
    )
    assert (status, answer["error"]["reason"], answer["error"]["message"]) == (
        400,
        "invalid_request",
        expected,
    )
    assert await gateway.accounts.list_keys("acme") == []


async def test_the_latest_expiry_allowed_is_the_end_of_year_9999(gateway: Gateway) -> None:
    await gateway.accounts.create_account("acme")
    created = await gateway.accounts.create_key("acme", expires_at="9999-12-31T23:59:59Z")
    assert created.record.expires_at == "9999-12-31T23:59:59Z"


@pytest.mark.slow  # runs the CLI as a subprocess
def test_the_cli_refuses_an_expiry_out_of_range(redis_url: str) -> None:
    storage = ["--storage", redis_url, "--json"]
    created = cli("accounts", "create", "acme", *storage)
    assert created.returncode == 0, created.stderr
    done = cli("keys", "create", "acme", "--expires-at", "100000000000000000000", *storage)
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        "",
        "error: '100000000000000000000' is out of range (1970 to the end of 9999)\n",
    )
    assert json.loads(cli("keys", "list", "acme", *storage).stdout) == []
