"""Hardening: body size limits, path and header injection, credentials in malformed requests,
the admin token comparison, and a fuzz run over request parsing.

Each protocol's error must come in its own envelope (§7), a request the gateway refuses must
never reach an upstream, and no input at all may produce a 500. The custom-endpoint tests use
a recording upstream that answers every path, so the exact path and Host it received can be
checked. Behaviour tests run on memory:// and on a real Redis; the fuzz run (parsing, not
storage) on memory:// only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from ratelimit_gw.errors import ERROR_TYPE_BY_STATUS
from ratelimit_gw.metering import billable_usage
from ratelimit_gw.protocols import Usage
from ratelimit_gw.relay import RelayResult
from ratelimit_gw.storage import Storage
from ratelimit_gw.worst_case import Hold

from .conftest import ADMIN_TOKEN, UPSTREAM_KEY, Gateway, Upstream, custom_endpoint, start_gateway
from .http_helpers import auth

GEMINI = "gemini-2.5-flash"
ENDPOINT_KEY = "endpoint-upstream-secret-77"
GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "RESOURCE_EXHAUSTED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": CHAT["messages"]}
CONTENTS = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


# --- fixtures: a recording upstream, a gateway with custom endpoints -----------------------


@dataclass
class Recorder:
    """An upstream that answers every method and path with a small OpenAI-shaped JSON."""

    url: str = ""
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # method, raw path, Host


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        rec.seen.append((request.method, request.raw_path, request.host))
        return web.json_response({"id": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield rec
    finally:
        await runner.cleanup()


async def hardened_gateway(
    upstream: Upstream, storage: Storage, recorder: Recorder, **server: Any
) -> tuple[web.AppRunner, Gateway]:
    endpoints = [custom_endpoint(recorder.url + "/base", "rec"), custom_endpoint(upstream.url)]
    return await start_gateway(
        upstream,
        storage,
        {"ENDPOINT_KEY": ENDPOINT_KEY, "RLGW_ADMIN_TOKEN": ADMIN_TOKEN},
        server={"host": "127.0.0.1", "port": 0, **server},
        custom_endpoints=endpoints,
    )


@pytest.fixture
async def gw(upstream: Upstream, storage: Storage, recorder: Recorder) -> AsyncIterator[Gateway]:
    runner, gateway = await hardened_gateway(upstream, storage, recorder)
    try:
        yield gateway
    finally:
        await runner.cleanup()


def upstream_calls(gw: Gateway) -> list[Any]:
    return [r for r in gw.upstream.state.requests if not r.path.startswith("/mock/")]


def gateway_error(protocol: str, status: int, body: bytes) -> dict[str, Any]:
    """The inner error of a body in ``protocol``'s §7 envelope; fails if it is not one."""
    document = json.loads(body)
    error = document["error"]
    if protocol == "anthropic":
        assert document["type"] == "error" and set(document) == {"type", "error", "request_id"}
        assert error["code"] == str(status)
    elif protocol == "gemini":
        assert set(document) == {"error"}
        assert error["code"] == status
        assert error["status"] == GEMINI_STATUS.get(status, error["status"])
        assert error["details"][0]["reason"] == error["reason"]
    else:
        assert set(document) == {"error"}
        assert error["code"] == str(status) and "param" in error
    assert error["type"] == ERROR_TYPE_BY_STATUS[status]
    assert isinstance(error["reason"], str) and error["reason"]
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


async def raw_exchange(gw: Gateway, request: bytes) -> bytes:
    """Send bytes no HTTP client library would send; return the whole answer."""
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


def raw_request(path: str, headers: bytes, body: bytes = b"{}", host: str = "gateway") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n".encode()
        + headers
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


# --- body size limit -----------------------------------------------------------------------

LIMIT = 2048
OVERSIZED: dict[str, tuple[str, dict[str, Any], str]] = {
    "openai": ("/v1/chat/completions", CHAT, "messages"),
    "anthropic": ("/v1/messages", MESSAGES, "messages"),
    "gemini": (f"/v1beta/models/{GEMINI}:generateContent", CONTENTS, "contents"),
    "proxy": ("/proxy-api/acme-ai/llm/v1/chat/completions", CHAT, "messages"),
}


def padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` with a padding field, exactly ``size`` bytes long."""
    base = json.dumps({**body, "pad": ""}).encode()
    return json.dumps({**body, "pad": "x" * (size - len(base))}).encode()


@pytest.fixture
async def small_body_gw(
    upstream: Upstream, storage: Storage, recorder: Recorder
) -> AsyncIterator[Gateway]:
    runner, gateway = await hardened_gateway(upstream, storage, recorder, max_body_bytes=LIMIT)
    try:
        yield gateway
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("name", OVERSIZED)
async def test_body_over_the_limit_is_413_in_the_routes_envelope_and_never_forwarded(
    small_body_gw: Gateway, http: aiohttp.ClientSession, name: str
) -> None:
    gw = small_body_gw
    protocol = "openai" if name == "proxy" else name
    path, body, _ = OVERSIZED[name]
    key = await gw.new_key(balance_usd="1.00")
    headers = {**auth(protocol, key), "Content-Type": "application/json", "x-request-id": "big-1"}

    async with http.post(gw.url + path, data=padded(body, LIMIT + 1), headers=headers) as resp:
        assert resp.status == 413
        error = gateway_error(protocol, 413, await resp.read())
        assert resp.headers["x-request-id"] == "big-1"
    assert (error["reason"], error["message"]) == (
        "request_too_large",
        "The request body is too large.",
    )

    # Streamed in chunks, with no Content-Length to refuse up front: still a 413.
    async def chunks() -> AsyncIterator[bytes]:
        data = padded(body, 4 * LIMIT)
        for start in range(0, len(data), 512):
            yield data[start : start + 512]

    async with http.post(gw.url + path, data=chunks(), headers=headers) as resp:
        assert resp.status == 413
        gateway_error(protocol, 413, await resp.read())
    assert upstream_calls(gw) == []
    account = await gw.accounts.get_account("acme")
    assert (account.balance_usd, account.holds_live) == ("1.00", 0)
    assert [e.type for e in await gw.accounts.ledger("acme")] == ["topup"]

    # Exactly at the limit is allowed.
    async with http.post(gw.url + path, data=padded(body, LIMIT), headers=headers) as resp:
        assert resp.status == 200


async def test_admin_body_over_the_limit_is_413(
    small_body_gw: Gateway, http: aiohttp.ClientSession
) -> None:
    body = padded({"id": "acme"}, LIMIT + 1)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    async with http.post(small_body_gw.url + "/admin/accounts", data=body, headers=headers) as r:
        assert r.status == 413
        assert gateway_error("openai", 413, await r.read())["reason"] == "request_too_large"
    assert await small_body_gw.storage.call("KEYS", "*") == []


# --- Gemini model path injection -----------------------------------------------------------


@pytest.mark.parametrize(
    ("segment", "model"),
    [
        (
            "gemini-2.5-flash%2F..%2F..%2Fv1%2Fchat%2Fcompletions",
            "gemini-2.5-flash/../../v1/chat/completions",
        ),
        (
            "gemini-2.5-flash/../../v1/chat/completions",
            "gemini-2.5-flash/../../v1/chat/completions",
        ),
        ("..%2Fgemini-2.5-flash", "../gemini-2.5-flash"),
        ("%2e%2e/gemini-2.5-flash", "../gemini-2.5-flash"),
        ("gemini-2.5-flash%3Fkey=stolen", "gemini-2.5-flash?key=stolen"),
        ("gemini-2.5-flash%23fragment", "gemini-2.5-flash#fragment"),
        ("gemini-2.5-flash%0D%0AX-Injected:%201", "gemini-2.5-flash\r\nX-Injected: 1"),
        ("gemini%202.5%20flash", "gemini 2.5 flash"),
        ("gemini-2.5-flash%00", "gemini-2.5-flash\x00"),
        ("%F0%9F%92%A5", "\U0001f4a5"),
    ],
)
async def test_gemini_model_path_injection_is_a_typed_404_and_never_forwarded(
    gw: Gateway, http: aiohttp.ClientSession, segment: str, model: str
) -> None:
    key = await gw.new_key()
    url = URL(f"{gw.url}/v1beta/models/{segment}:generateContent", encoded=True)
    async with http.post(url, json=CONTENTS, headers=auth("gemini", key)) as resp:
        assert resp.status == 404
        error = gateway_error("gemini", 404, await resp.read())
    assert error["reason"] == "model_not_found"
    assert error["message"].startswith(f"The model `{model}` does not exist.")
    assert upstream_calls(gw) == []


async def test_junk_after_the_gemini_action_is_route_not_found(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key()
    for action in ("generateContent%2F..%2F..%2Fadmin", "generateContent/x", "delete"):
        url = URL(f"{gw.url}/v1beta/models/{GEMINI}:{action}", encoded=True)
        async with http.post(url, json=CONTENTS, headers=auth("gemini", key)) as resp:
            assert resp.status == 404, action
            assert gateway_error("gemini", 404, await resp.read())["reason"] == "route_not_found"
    assert upstream_calls(gw) == []


async def test_the_client_cannot_choose_the_upstream_host_or_model_path(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key()
    # An absolute-form request target and a foreign Host: the configured upstream is called.
    target = "http://evil.example:81/v1beta/models/gemini-2.5-flash:generateContent?alt=x%0D%0A"
    headers = f"X-Forwarded-Host: evil.example\r\nx-goog-api-key: {key}\r\n".encode()
    body = json.dumps(CONTENTS).encode()
    request = raw_request(target, headers, body, host="evil.example:81")
    answer = await raw_exchange(gw, request)
    assert answer.startswith(b"HTTP/1.1 200 ")
    [seen] = upstream_calls(gw)
    assert seen.path == f"/v1beta/models/{GEMINI}:generateContent"
    assert seen.headers["host"] == gw.upstream.url.removeprefix("http://")
    assert seen.headers["x-goog-api-key"] == UPSTREAM_KEY


# --- /proxy-api path injection -------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix",
    [
        "v1/%2e%2e/admin",
        "v1/%2E%2e%2Fadmin",
        "v1/..%2Fadmin",
        "v1/.%2e/admin",
        "v1/%2e/chat",
        "v1%2F..%2F..%2Fadmin",
        "/evil.example/v1/chat/completions",  # "//" right after the endpoint
        "v1//chat/completions",
        "http://evil.example/v1/chat/completions",
        "https:%2F%2Fevil.example/x",
        "v1%5C..%5Cadmin",  # backslashes
        "v1/chat%0D/completions",  # a bare CR
        "v1/chat%00/completions",
        "v1/chat%09/completions",  # a tab
    ],
)
async def test_proxy_path_traversal_and_smuggling_are_refused_and_never_forwarded(
    gw: Gateway, http: aiohttp.ClientSession, recorder: Recorder, suffix: str
) -> None:
    key = await gw.new_key()
    url = URL(f"{gw.url}/proxy-api/acme-ai/rec/{suffix}", encoded=True)
    async with http.post(url, json=CHAT, headers=auth("openai", key)) as resp:
        assert resp.status == 400, suffix
        error = gateway_error("openai", 400, await resp.read())
    assert error["reason"] == "invalid_request"
    assert recorder.seen == []


async def test_proxy_path_with_crlf_is_route_not_found(
    gw: Gateway, http: aiohttp.ClientSession, recorder: Recorder
) -> None:
    key = await gw.new_key()
    url = URL(f"{gw.url}/proxy-api/acme-ai/rec/v1/chat%0D%0AHost:%20evil", encoded=True)
    async with http.post(url, json=CHAT, headers=auth("openai", key)) as resp:
        assert resp.status == 404
        assert gateway_error("openai", 404, await resp.read())["reason"] == "route_not_found"
    assert recorder.seen == []


@pytest.mark.parametrize(
    ("suffix", "forwarded"),
    [
        ("v1/chat/completions", "/base/v1/chat/completions"),
        ("@evil.example/x", "/base/@evil.example/x"),
        ("v1/%252e%252e/x", "/base/v1/%252e%252e/x"),  # double-encoded: passed on as sent
        ("v1/models/", "/base/v1/models/"),
        ("v1/a%2Fb?x=1&y=%0D%0A", "/base/v1/a%2Fb?x=1&y=%0D%0A"),
    ],
)
async def test_proxy_forwards_odd_but_safe_paths_to_the_configured_host_only(
    gw: Gateway, http: aiohttp.ClientSession, recorder: Recorder, suffix: str, forwarded: str
) -> None:
    key = await gw.new_key()
    url = URL(f"{gw.url}/proxy-api/acme-ai/rec/{suffix}", encoded=True)
    headers = {**auth("openai", key), "Host": "evil.example"}
    async with http.post(url, json={"model": "unpriced"}, headers=headers) as resp:
        assert resp.status == 200
    assert recorder.seen == [("POST", forwarded, recorder.url.removeprefix("http://"))]


# --- header injection and credentials in malformed requests --------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"x-request-id: abc\r\n X-Injected: 1\r\n",  # obsolete line folding
        b"x-request-id: abc\rX-Injected: 1\r\n",  # a bare CR
        b"x-request-id: abc\nX-Injected: 1\r\n",  # a bare LF
        b"x-request-id: abc\x00X-Injected: 1\r\n",
    ],
)
async def test_a_request_id_carrying_a_line_break_is_refused_not_echoed(
    gw: Gateway, header: bytes
) -> None:
    key = await gw.new_key()
    answer = await raw_exchange(
        gw,
        raw_request("/v1/chat/completions", f"Authorization: Bearer {key}\r\n".encode() + header),
    )
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.0 400 ") or head.startswith(b"HTTP/1.1 400 ")
    assert b"x-injected" not in head.lower()
    assert upstream_calls(gw) == []


@pytest.mark.parametrize("value", ["abc\tdef", "caf\u00e9", "a" * 129])
async def test_an_unusable_request_id_is_replaced_by_a_generated_one(
    gw: Gateway, http: aiohttp.ClientSession, value: str
) -> None:
    key = await gw.new_key()
    headers = {**auth("openai", key), "x-request-id": value}
    async with http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"].startswith("req_")


async def test_a_malformed_request_never_logs_the_credential_it_carried(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = await gw.new_key()
    for header in (
        f"Authorization: Bearer {key}\x00\r\n",
        f"x-api-key: {key}\x01\r\n",
        f"x-goog-api-key: {key}\r\n  folded\r\n",
    ):
        answer = await raw_exchange(gw, raw_request("/v1/chat/completions", header.encode()))
        assert answer.split(b" ", 2)[1] == b"400"
    rendered = [
        " ".join((r.getMessage(), repr(r.exc_info), r.exc_text or "")) for r in caplog.records
    ]
    assert not [line for line in rendered if key in line or key[5:25] in line]
    refusals = [
        r for r in caplog.records if r.getMessage().startswith("refused a malformed HTTP request")
    ]
    assert len(refusals) == 3
    assert {(r.levelname, r.exc_info) for r in refusals} == {("WARNING", None)}
    assert refusals[0].getMessage() == (
        "refused a malformed HTTP request from 127.0.0.1 (BadHttpMessage)"
    )


@pytest.mark.parametrize(
    ("path", "header", "protocol"),
    [
        ("/v1/chat/completions", b"Authorization: Bearer \xff\xfe\r\n", "openai"),
        ("/v1/messages", b"x-api-key: rlgw-\xc3\x28\xa0\r\n", "anthropic"),
        (f"/v1beta/models/{GEMINI}:generateContent", b"x-goog-api-key: \xe9\r\n", "gemini"),
        (f"/v1beta/models/{GEMINI}:generateContent?key=%FF%FE", b"", "gemini"),
        ("/proxy-api/acme-ai/rec/v1/chat/completions", b"Authorization: Bearer \xff\r\n", "openai"),
    ],
)
async def test_credentials_that_are_not_utf8_are_401_not_500(
    gw: Gateway, path: str, header: bytes, protocol: str
) -> None:
    answer = await raw_exchange(gw, raw_request(path, header))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert gateway_error(protocol, 401, body)["reason"] == "invalid_key"


# --- the admin token -----------------------------------------------------------------------


async def test_admin_token_is_checked_with_a_constant_time_comparison(
    gw: Gateway, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for token, status in (("wrong-token", 401), (ADMIN_TOKEN[:-1], 401), (ADMIN_TOKEN, 200)):
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(gw.url + "/admin/accounts", headers=headers) as resp:
            assert resp.status == status, token
    assert compared == [
        (b"wrong-token", ADMIN_TOKEN.encode()),
        (ADMIN_TOKEN[:-1].encode(), ADMIN_TOKEN.encode()),
        (ADMIN_TOKEN.encode(), ADMIN_TOKEN.encode()),
    ]


async def test_admin_token_that_is_not_utf8_is_401_not_500(gw: Gateway) -> None:
    answer = await raw_exchange(
        gw,
        raw_request(
            "/admin/accounts", b"Authorization: Bearer \xff" + ADMIN_TOKEN.encode() + b"\r\n"
        ),
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert gateway_error("openai", 401, body)["reason"] == "invalid_admin_token"


# --- usage an upstream reports is bounded ----------------------------------------------------


@pytest.mark.parametrize(
    ("reported", "outcome", "charged"),
    [
        (Usage(-1_000_000, -5), "ok", Usage(0, 0)),
        (Usage(2**63, 2**64 + 1), "ok", Usage(2**31 - 1, 2**31 - 1)),
        (Usage(-3, 7), "upstream_cut", Usage(0, 7)),
    ],
)
def test_reported_usage_can_neither_credit_an_account_nor_overflow(
    reported: Usage, outcome: str, charged: Usage
) -> None:
    result = RelayResult(outcome=outcome, usage=reported, output_chars=4)
    hold = Hold(input_tokens=40, estimated_input_tokens=10, output_cap=100, choices=1, nano=1)
    assert billable_usage(result, hold) == charged


# --- fuzzing request parsing ---------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
MODEL = st.sampled_from(["gpt-4o-mini", "claude-sonnet-4-6", GEMINI, "", "nope", "x" * 300])
TOKENS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**63, -1])
    | JSON_VALUES
)
FLAGS = st.booleans() | JSON_VALUES
GENERATION_CONFIG = (
    st.fixed_dictionaries({}, optional={"maxOutputTokens": TOKENS, "max_output_tokens": TOKENS})
    | JSON_VALUES
)
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "openai": {
        "model": MODEL | JSON_VALUES,
        "messages": st.just(CHAT["messages"]) | JSON_VALUES,
        "input": st.just("hi") | JSON_VALUES,
        "max_tokens": TOKENS,
        "max_completion_tokens": TOKENS,
        "max_output_tokens": TOKENS,
        "stream": FLAGS,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": FLAGS})
        | JSON_VALUES,
    },
    "anthropic": {
        "model": MODEL | JSON_VALUES,
        "messages": st.just(CHAT["messages"]) | JSON_VALUES,
        "max_tokens": TOKENS,
        "stream": FLAGS,
        "system": JSON_VALUES,
    },
    "gemini": {
        "contents": st.just(CONTENTS["contents"]) | JSON_VALUES,
        "generationConfig": GENERATION_CONFIG,
        "generation_config": GENERATION_CONFIG,
    },
}
ROUTES = [
    ("openai", "/v1/chat/completions"),
    ("openai", "/v1/responses"),
    ("anthropic", "/v1/messages"),
    ("gemini", f"/v1beta/models/{GEMINI}:generateContent"),
    ("gemini", f"/v1/models/{GEMINI}:streamGenerateContent"),
    ("gemini", f"/v1beta/models/{GEMINI}:streamGenerateContent?alt=sse"),
    ("openai", "/proxy-api/acme-ai/llm/v1/chat/completions"),
    ("openai", "/proxy-api/acme-ai/rec/v1/responses"),
]


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    protocol, path = draw(st.sampled_from(ROUTES))
    fields = st.fixed_dictionaries({}, optional=FIELDS[protocol])
    body = draw(
        st.binary(max_size=200)
        | JSON_VALUES.map(_encode)
        | fields.map(_encode)
        | fields.map(lambda d: _encode(d)[: max(0, len(_encode(d)) - 3)])  # cut short
    )
    return protocol, path, body


@pytest.fixture
async def key(gw: Gateway) -> str:
    """One key for all of a fuzz test's examples (fixtures live for the whole test)."""
    return await gw.new_key()


FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def check_answer(
    gw: Gateway, protocol: str, resp: aiohttp.ClientResponse, upstream_before: int
) -> None:
    """Never a 5xx; an error is the gateway's typed envelope or the upstream's own answer."""
    body = await resp.read()
    assert resp.status < 500, body[:500]
    if resp.status >= 400 and len(upstream_calls(gw)) == upstream_before:
        gateway_error(protocol, resp.status, body)


@pytest.mark.parametrize("storage_url", ["memory://"])
@FUZZ
@given(request=requests())
async def test_fuzzed_bodies_never_get_a_500_and_errors_are_typed(
    gw: Gateway, http: aiohttp.ClientSession, key: str, request: tuple[str, str, bytes]
) -> None:
    protocol, path, body = request
    before = len(upstream_calls(gw))
    headers = {**auth(protocol, key), "Content-Type": "application/json"}
    async with http.post(gw.url + path, data=body, headers=headers) as resp:
        await check_answer(gw, protocol, resp, before)


ADMIN_TEXT = st.sampled_from(["acme", "other", "", "a/b", "x" * 80, "1.00", "-1", "1e9", "NaN"])
ADMIN_VALUE = ADMIN_TEXT | TOKENS
ADMIN_ROUTES: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/admin/accounts": {
        "id": ADMIN_VALUE,
        "balance_usd": ADMIN_VALUE | st.sampled_from(["0.0000000001", "99999999999999999999"]),
        "rpm": ADMIN_VALUE,
        "tpm": ADMIN_VALUE,
        "concurrency": ADMIN_VALUE,
        "rpm_policy": st.sampled_from(["fixed", "balance", "tier"]) | ADMIN_VALUE,
        "rpm_override": ADMIN_VALUE,
    },
    "/admin/keys": {
        "account": ADMIN_VALUE,
        "name": ADMIN_VALUE,
        "rpm": ADMIN_VALUE,
        "tpm": ADMIN_VALUE,
        "concurrency": ADMIN_VALUE,
        "models": st.lists(ADMIN_TEXT, max_size=3) | ADMIN_VALUE,
        "expires_at": st.sampled_from(["2030-01-01T00:00:00Z", "nonsense", "1e30", "-5", "9" * 30])
        | ADMIN_VALUE,
    },
    "/admin/accounts/acme/topup": {
        "amount_usd": ADMIN_VALUE | st.sampled_from(["0.5", "0", "1e3", "0.0000000001"]),
        "idempotency_key": ADMIN_VALUE | st.text(max_size=250),
    },
}


@st.composite
def admin_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(ADMIN_ROUTES)))
    fields = st.fixed_dictionaries({}, optional=ADMIN_ROUTES[path])
    return path, draw(st.binary(max_size=100) | JSON_VALUES.map(_encode) | fields.map(_encode))


@pytest.mark.parametrize("storage_url", ["memory://"])
@FUZZ
@given(request=admin_requests())
async def test_fuzzed_admin_bodies_never_get_a_500_and_errors_are_typed(
    gw: Gateway, http: aiohttp.ClientSession, key: str, request: tuple[str, bytes]
) -> None:
    path, body = request
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    async with http.post(gw.url + path, data=body, headers=headers) as resp:
        answer = await resp.read()
        assert resp.status < 500, answer[:500]
        if resp.status >= 400:
            gateway_error("openai", resp.status, answer)


PATH_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=24
)


@pytest.mark.parametrize("storage_url", ["memory://"])
@FUZZ
@given(
    model=PATH_TEXT,
    action=st.sampled_from(["generateContent", "streamGenerateContent", ""]) | PATH_TEXT,
    suffix=PATH_TEXT,
    query=PATH_TEXT,
    request_id=st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
        max_size=140,
    ),
)
async def test_fuzzed_paths_and_headers_never_get_a_500(
    gw: Gateway,
    http: aiohttp.ClientSession,
    key: str,
    model: str,
    action: str,
    suffix: str,
    query: str,
    request_id: str,
) -> None:
    q = quote(query, safe="")
    request_id = request_id.strip(" ")
    echoed = request_id.isascii() and 0 < len(request_id) <= 128 and " " not in request_id
    targets = [
        ("gemini", f"/v1beta/models/{quote(model, safe='')}:{quote(action, safe='')}?x={q}"),
        ("gemini", f"/v1/models/{quote(model, safe='/:')}:{action and quote(action, safe='')}"),
        ("openai", f"/proxy-api/acme-ai/rec/{quote(suffix, safe='/%.:@')}?{q}"),
    ]
    for protocol, target in targets:
        before = len(upstream_calls(gw))
        headers = {**auth(protocol, key), "x-request-id": request_id}
        url = URL(gw.url + target, encoded=True)
        async with http.post(url, json=CONTENTS, headers=headers) as resp:
            await check_answer(gw, protocol, resp, before)
            if echoed:
                assert resp.headers["x-request-id"] == request_id
            else:
                assert resp.headers["x-request-id"].startswith("req_")
