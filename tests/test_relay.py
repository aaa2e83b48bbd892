"""The relay (SPEC §8): what reaches the upstream, what comes back, and what gets charged.

Raw aiohttp requests through a gateway on a real socket to the mock upstream, whose request
log (``upstream.state.requests``) shows the exact bytes and headers the upstream received.
The mock's usage is exact: input = ceil(prompt chars / 4), output = 20 words (4 pieces of 5),
cut at the request's cap. Every test runs on memory:// and on a real Redis.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp import web

from ratelimit_gw.accounts import LedgerEntry
from ratelimit_gw.limiter import Limiter
from ratelimit_gw.money import NANO_PER_USD, format_usd
from ratelimit_gw.protocols import estimate_input_tokens
from ratelimit_gw.testing import mock_wire

from .conftest import MODELS, UPSTREAM_KEY, Gateway, Upstream, gateway_config, start_gateway
from .http_helpers import auth, call

PROMPT = "Hello there, gateway!"  # 21 chars -> 6 input tokens at the mock, in every protocol
PROMPT_TOKENS = 6
PIECES = [
    "tok0 tok1 tok2 tok3 tok4",
    " tok5 tok6 tok7 tok8 tok9",
    " tok10 tok11 tok12 tok13 tok14",
    " tok15 tok16 tok17 tok18 tok19",
]
GEMINI = "gemini-2.5-flash"
PRICES = {model: (Decimal(inp), Decimal(out)) for model, _, inp, out in MODELS}

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
RESPONSES = {"model": "gpt-4o-mini", "input": PROMPT}
MESSAGES = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": PROMPT}],
}
CONTENTS = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}


class Route:
    def __init__(self, protocol: str, path: str, body: dict[str, Any], model: str) -> None:
        self.protocol = protocol
        self.path = path
        self.body = body
        self.model = model

    @property
    def raw(self) -> bytes:
        return json.dumps(self.body).encode()


ROUTES = {
    "chat": Route("openai", "/v1/chat/completions", CHAT, "gpt-4o-mini"),
    "chat-stream": Route(
        "openai",
        "/v1/chat/completions",
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        "gpt-4o-mini",
    ),
    "responses": Route("openai", "/v1/responses", RESPONSES, "gpt-4o-mini"),
    "responses-stream": Route(
        "openai", "/v1/responses", {**RESPONSES, "stream": True}, "gpt-4o-mini"
    ),
    "messages": Route("anthropic", "/v1/messages", MESSAGES, "claude-sonnet-4-6"),
    "messages-stream": Route(
        "anthropic", "/v1/messages", {**MESSAGES, "stream": True}, "claude-sonnet-4-6"
    ),
    "generate": Route("gemini", f"/v1beta/models/{GEMINI}:generateContent", CONTENTS, GEMINI),
    "stream-sse": Route(
        "gemini", f"/v1beta/models/{GEMINI}:streamGenerateContent?alt=sse", CONTENTS, GEMINI
    ),
    "stream-array": Route("gemini", f"/v1/models/{GEMINI}:streamGenerateContent", CONTENTS, GEMINI),
}
STREAM_ROUTES = ["chat-stream", "responses-stream", "messages-stream", "stream-sse"]
# One route per protocol, for what the three protocols share.
PLAIN_BY_PROTOCOL = {"openai": "chat", "anthropic": "messages", "gemini": "generate"}


def cost_nano(model: str, input_tokens: int, output_tokens: int) -> int:
    """The charge at the configured price, rounded up to a whole nano-USD."""
    inp, out = PRICES[model]
    exact = (input_tokens * inp + output_tokens * out) * NANO_PER_USD / 1_000_000
    return math.ceil(exact)


def sse_data(body: bytes) -> list[bytes]:
    """The ``data:`` payload of every SSE event in a whole stream."""
    out = []
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(lines))
    return out


async def settled(gw: Gateway, request_id: str, account: str = "acme") -> LedgerEntry:
    """Wait (bounded) for a request's settlement; return its ledger entry."""
    deadline = time.monotonic() + 5
    while True:
        entries = [
            e
            for e in await gw.accounts.ledger(account)
            if e.request_id == request_id and e.type in ("charge", "release")
        ]
        state = await gw.accounts.get_account(account)
        if entries and state.holds_live == 0 and state.held_usd == "0.00":
            assert len(entries) == 1
            return entries[0]
        assert time.monotonic() < deadline, f"{request_id} never settled: {state}"
        await asyncio.sleep(0.01)


async def assert_nothing_held(gw: Gateway, secret: str, account: str = "acme") -> None:
    """No hold and no concurrency lease is left on the account or the key."""
    state = await gw.accounts.get_account(account)
    assert (state.held_usd, state.holds_live) == ("0.00", 0)
    record = await gw.accounts.find_key(secret)
    assert record is not None
    decision = await Limiter(gw.storage).peek(account, record.id)
    assert decision.concurrency_limit is not None
    assert decision.concurrency_in_use == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def providers(base_url: str, **extra: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": f"mock-{protocol}",
            "protocol": protocol,
            "base_url": base_url,
            "api_key_env": "RLGW_TEST_UPSTREAM_KEY",
            **extra,
        }
        for protocol in ("openai", "anthropic", "gemini")
    ]


@pytest.fixture
async def other_gateway(upstream: Upstream, gateway: Gateway) -> AsyncIterator[Any]:
    """Start extra gateways (same storage and mock) with config overrides; cleaned up after."""
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> Gateway:
        runner, gw = await start_gateway(upstream, gateway.storage, None, **overrides)
        runners.append(runner)
        return gw

    yield start
    for runner in runners:
        await runner.cleanup()


# --- body bytes -----------------------------------------------------------------------

ODD_BODIES = {
    "chat": (
        "/v1/chat/completions",
        "openai",
        b'  {\n\t"temperature" : 0.50,"messages":[ {"content":"h\\u00e9llo \xe2\x9c\x93 '
        b'caf\xc3\xa9 \\ud83d\\ude00 \\"quoted\\"","role":"user"}],\r\n "model":"gpt-4o-mini" ,'
        b' "x_vendor": {"z":1, "a":[1, 2.0e0, null, true]}, "n":1}\n\n',
    ),
    "chat-stream-with-usage": (
        "/v1/chat/completions",
        "openai",
        b'{"stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false},'
        b'"model":"gpt-4o-mini","messages":[{"role":"user","content":"\xe6\x97\xa5\xe6\x9c\xac"}]}',
    ),
    "responses-stream": (
        "/v1/responses",
        "openai",
        b'{ "input" : "\xc3\xbcber\\n\\t", "stream" : true , "model" : "gpt-4o-mini" }',
    ),
    "messages": (
        "/v1/messages",
        "anthropic",
        b'{"max_tokens":50,\n"system":"be \xe2\x80\x9cbrief\xe2\x80\x9d",'
        b'"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],'
        b'"model":"claude-sonnet-4-6","metadata":{"user_id":"u-1"}}',
    ),
    "messages-stream": (
        "/v1/messages",
        "anthropic",
        b'{"model":"claude-sonnet-4-6","stream":true,"max_tokens":50,'
        b'"messages":[{"role":"user","content":"\\u00bfqu\xc3\xa9?"}]}   ',
    ),
    "generate": (
        f"/v1beta/models/{GEMINI}:generateContent",
        "gemini",
        b'{"generationConfig":{"temperature":1e-1,"maxOutputTokens":64},\n'
        b'"contents":[{"parts":[{"text":"\xf0\x9f\x98\x80 ok"}],"role":"user"}]}',
    ),
    "stream-sse": (
        f"/v1/models/{GEMINI}:streamGenerateContent?alt=sse",
        "gemini",
        b'{"contents" :[{"role":"user","parts":[{"text":"x"}]}],"safetySettings":[]}',
    ),
}


@pytest.mark.parametrize("case", ODD_BODIES)
async def test_body_bytes_reach_the_upstream_unchanged(
    gateway: Gateway, http: aiohttp.ClientSession, case: str
) -> None:
    path, protocol, body = ODD_BODIES[case]
    key = await gateway.new_key()
    reply = await call(http, gateway, path, body, auth(protocol, key))
    assert reply.status == 200, reply.body
    received = gateway.upstream.state.requests[-1]
    assert received.body == body
    assert received.path == path.partition("?")[0]


@pytest.mark.parametrize(
    ("stream_options", "upstream_options"),
    [
        (None, {"include_usage": True}),
        ({"include_usage": False}, {"include_usage": True}),
        (
            {"include_obfuscation": False, "x_future": [1]},
            {"include_obfuscation": False, "x_future": [1], "include_usage": True},
        ),
    ],
)
async def test_chat_stream_without_include_usage_asks_upstream_and_hides_the_usage_chunk(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    stream_options: dict[str, Any] | None,
    upstream_options: dict[str, Any],
) -> None:
    body: dict[str, Any] = {**CHAT, "stream": True, "temperature": 0.2}
    if stream_options is not None:
        body["stream_options"] = stream_options
    key = await gateway.new_key(balance_usd="1.00")
    reply = await call(
        http, gateway, "/v1/chat/completions", json.dumps(body).encode(), auth("openai", key)
    )
    assert reply.status == 200, reply.body

    sent = gateway.upstream.state.requests[-1].json()
    assert sent["stream_options"] == upstream_options
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        **{k: v for k, v in body.items() if k != "stream_options"},
        "max_completion_tokens": 1000,  # prepaid and uncapped: sent the cap it was held for
    }

    events = sse_data(reply.body)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(chunk["choices"] for chunk in chunks), reply.body  # no usage-only chunk
    assert all(chunk.get("usage") is None for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "".join(PIECES)
    # The hidden chunk still paid for the request.
    entry = await settled(gateway, reply.headers["x-request-id"])
    assert (entry.input_tokens, entry.output_tokens) == (PROMPT_TOKENS, 20)


async def test_chat_stream_with_include_usage_delivers_the_usage_chunk(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    route = ROUTES["chat-stream"]
    key = await gateway.new_key()
    reply = await call(http, gateway, route.path, route.raw, auth("openai", key))
    assert reply.status == 200
    assert gateway.upstream.state.requests[-1].body == route.raw
    events = sse_data(reply.body)
    assert events[-1] == b"[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert last["usage"]["completion_tokens"] == 20


# --- headers --------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["openai", "anthropic", "anthropic-bearer", "gemini"])
async def test_client_credentials_are_replaced_by_the_upstream_credential(
    gateway: Gateway, http: aiohttp.ClientSession, protocol: str
) -> None:
    key = await gateway.new_key()
    route = ROUTES[PLAIN_BY_PROTOCOL[protocol.partition("-")[0]]]
    path = route.path
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "tools-2024-04-04",
        "x-custom": "kept as is",
        "User-Agent": "relay-test/1.0",
        "Cookie": f"session={key}",
        "Proxy-Authorization": f"Basic {key}",
        "api-key": key,
        "Keep-Alive": "timeout=5",
        "Proxy-Connection": "keep-alive",
        "TE": "trailers",
        "Trailer": "x-checksum",
    }
    if protocol == "openai":
        headers["Authorization"] = f"Bearer {key}"
    elif protocol == "anthropic":
        headers["x-api-key"] = key
    elif protocol == "anthropic-bearer":
        headers["Authorization"] = f"Bearer {key}"
    else:
        path = f"/v1beta/models/{GEMINI}:streamGenerateContent?alt=sse&key={key}&trace=a%2Fb%26c"
    reply = await call(http, gateway, path, route.raw, headers)
    assert reply.status == 200, reply.body

    received = gateway.upstream.state.requests[-1]
    seen = received.headers
    # No client secret anywhere in what the upstream received.
    assert key not in json.dumps(seen) and key not in received.query_string
    for name in ("cookie", "proxy-authorization", "api-key"):
        assert name not in seen
    for name in ("keep-alive", "proxy-connection", "te", "trailer"):
        assert name not in seen
    # The provider's own credential, in its protocol's header, and only that one.
    if protocol == "openai":
        assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert "x-api-key" not in seen and "x-goog-api-key" not in seen
    elif protocol.startswith("anthropic"):
        assert seen["x-api-key"] == UPSTREAM_KEY
        assert "authorization" not in seen and "x-goog-api-key" not in seen
    else:
        assert seen["x-goog-api-key"] == UPSTREAM_KEY
        assert "authorization" not in seen and "x-api-key" not in seen
        assert parse_qs(received.query_string) == {"alt": ["sse"], "trace": ["a/b&c"]}
    # Everything else the client said goes along.
    assert seen["anthropic-version"] == "2023-06-01"
    assert seen["anthropic-beta"] == "tools-2024-04-04"
    assert seen["x-custom"] == "kept as is"
    assert seen["user-agent"] == "relay-test/1.0"
    assert seen["host"] == gateway.upstream.url.removeprefix("http://")


async def test_provider_extra_headers_are_added(
    gateway: Gateway, http: aiohttp.ClientSession, other_gateway: Any
) -> None:
    gw = await other_gateway(
        providers=providers(gateway.upstream.url, headers={"OpenAI-Organization": "org-42"})
    )
    key = await gateway.new_key()
    route = ROUTES["chat"]
    reply = await call(http, gw, route.path, route.raw, auth("openai", key))
    assert reply.status == 200
    seen = gateway.upstream.state.requests[-1].headers
    assert seen["openai-organization"] == "org-42"
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"


# --- streaming ------------------------------------------------------------------------


async def _timed_stream(
    http: aiohttp.ClientSession, gw: Gateway, route: Route, key: str, delay_ms: int
) -> tuple[float, float, bytes]:
    """Seconds from the request to the first text piece and to the end, and the body."""
    headers = {
        "Content-Type": "application/json",
        "x-mock-chunk-delay-ms": str(delay_ms),
        **auth(route.protocol, key),
    }
    started = time.monotonic()
    first_piece_at = None
    body = b""
    async with http.post(gw.url + route.path, data=route.raw, headers=headers) as resp:
        assert resp.status == 200
        async for data in resp.content.iter_any():
            body += data
            if first_piece_at is None and b"tok0" in body:
                first_piece_at = time.monotonic() - started
    assert first_piece_at is not None
    return first_piece_at, time.monotonic() - started, body


@pytest.mark.slow  # ~2 s over its 2 cases: times a paced stream
async def test_streams_are_relayed_event_by_event_as_they_arrive(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    routes = [ROUTES[name] for name in (*STREAM_ROUTES, "stream-array")]
    # The mock waits 300 ms between its four pieces: 900 ms from the first to the last.
    results = await asyncio.gather(
        *(_timed_stream(http, gateway, route, key, 300) for route in routes)
    )
    for route, (first_piece_at, ended_at, body) in zip(routes, results, strict=True):
        assert b"tok19" in body, route.path
        # Not buffered: the first piece arrived long before the stream ended.
        assert ended_at - first_piece_at >= 0.6, (route.path, first_piece_at, ended_at)


# --- settlement -----------------------------------------------------------------------

SETTLE_CASES = {
    **{name: (name, {}, 20) for name in ROUTES},
    "chat-capped": ("chat", {"max_completion_tokens": 7}, 7),
    "responses-stream-capped": ("responses-stream", {"max_output_tokens": 7}, 7),
    "messages-stream-capped": ("messages-stream", {"max_tokens": 7}, 7),
    "stream-sse-capped": ("stream-sse", {"generationConfig": {"maxOutputTokens": 7}}, 7),
}


@pytest.mark.parametrize("case", SETTLE_CASES)
async def test_settlement_charges_exactly_the_reported_usage(
    gateway: Gateway, http: aiohttp.ClientSession, case: str
) -> None:
    name, extra, output_tokens = SETTLE_CASES[case]
    route = ROUTES[name]
    key = await gateway.new_key(balance_usd="1.00", concurrency=2)
    reply = await call(
        http,
        gateway,
        route.path,
        json.dumps({**route.body, **extra}).encode(),
        auth(route.protocol, key),
    )
    assert reply.status == 200, reply.body

    entry = await settled(gateway, reply.headers["x-request-id"])
    expected = cost_nano(route.model, PROMPT_TOKENS, output_tokens)
    assert entry.type == "charge"
    assert entry.outcome == "ok"
    assert entry.model == route.model
    assert (entry.input_tokens, entry.output_tokens) == (PROMPT_TOKENS, output_tokens)
    assert entry.cost_usd == format_usd(expected)
    account = await gateway.accounts.get_account("acme")
    assert account.balance_usd == format_usd(NANO_PER_USD - expected)
    assert account.spent_usd == format_usd(expected)
    await assert_nothing_held(gateway, key)


# --- client disconnect ----------------------------------------------------------------


@pytest.mark.slow  # ~5 s over its 8 cases: streams with chunk delays
@pytest.mark.parametrize("name", STREAM_ROUTES)
async def test_client_disconnect_cancels_the_upstream_call_and_charges_what_was_relayed(
    gateway: Gateway, http: aiohttp.ClientSession, name: str
) -> None:
    route = ROUTES[name]
    key = await gateway.new_key(balance_usd="1.00", concurrency=1)
    headers = {
        "Content-Type": "application/json",
        "x-mock-chunk-delay-ms": "600",
        **auth(route.protocol, key),
    }
    resp = await http.post(gateway.url + route.path, data=route.raw, headers=headers)
    request_id = resp.headers["x-request-id"]
    received = b""
    while b"tok0" not in received:
        received += await resp.content.readany()
    resp.close()  # the client goes away after the first piece
    left_at = time.monotonic()

    entry = await settled(gateway, request_id)
    # Settled while the upstream would still be streaming (three more pieces, 0.6 s
    # apart): the relay stopped reading it when the client left.
    assert time.monotonic() - left_at < 1.2
    assert entry.outcome == "client_disconnect"
    # Charged for the one piece relayed (24 chars -> 6 tokens) on top of the input: the
    # reported input where the stream had already said it, else the admission estimate.
    reported_input = route.protocol in ("anthropic", "gemini")
    input_tokens = PROMPT_TOKENS if reported_input else estimate_input_tokens(len(route.raw))
    assert (entry.input_tokens, entry.output_tokens) == (input_tokens, 6)
    expected = cost_nano(route.model, input_tokens, 6)
    assert entry.cost_usd == format_usd(expected)
    assert (await gateway.accounts.get_account("acme")).balance_usd == format_usd(
        NANO_PER_USD - expected
    )
    await assert_nothing_held(gateway, key)
    # The lease is really gone: the key's single slot admits the next request.
    again = await call(http, gateway, ROUTES[name].path, route.raw, auth(route.protocol, key))
    assert again.status == 200


# --- upstream errors ------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 429, 400])
@pytest.mark.parametrize("name", ["chat", "responses-stream", "messages-stream", "generate"])
async def test_upstream_error_is_relayed_as_sent_and_charges_nothing(
    gateway: Gateway, http: aiohttp.ClientSession, name: str, status: int
) -> None:
    route = ROUTES[name]
    key = await gateway.new_key(balance_usd="1.00", rpm=10, concurrency=1)
    headers = {"x-mock-error": str(status), **auth(route.protocol, key)}
    if status == 429:
        headers["x-mock-retry-after"] = "7"
    reply = await call(http, gateway, route.path, route.raw, headers)

    assert reply.status == status
    protocol: mock_wire.Protocol = route.protocol  # type: ignore[assignment]
    assert reply.body == mock_wire.error_body(
        protocol, status, f"mock upstream: injected {status} error"
    )
    assert reply.headers["Content-Type"].startswith("application/json")
    if status == 429:
        assert reply.headers["retry-after"] == "7"
    # The gateway's own headers are added.
    assert reply.headers["x-request-id"].startswith("req_")
    assert reply.headers["x-ratelimit-limit-requests"] == "10"
    assert reply.headers["x-ratelimit-remaining-requests"] == "9"
    assert reply.headers["RateLimit-Policy"].startswith('"rpm";q=10;w=60')
    if route.protocol == "anthropic":
        assert reply.headers["request-id"] == reply.headers["x-request-id"]
        assert reply.headers["anthropic-ratelimit-requests-remaining"] == "9"

    entry = await settled(gateway, reply.headers["x-request-id"])
    assert (entry.type, entry.outcome, entry.cost_usd) == ("release", "upstream_error", "0.00")
    account = await gateway.accounts.get_account("acme")
    assert (account.balance_usd, account.spent_usd) == ("1.00", "0.00")
    await assert_nothing_held(gateway, key)


@pytest.mark.parametrize(
    ("protocol", "status_name"),
    [("openai", None), ("anthropic", None), ("gemini", "INTERNAL")],
)
async def test_unreachable_upstream_is_502_and_releases_everything(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    other_gateway: Any,
    protocol: str,
    status_name: str | None,
) -> None:
    gw = await other_gateway(providers=providers(f"http://127.0.0.1:{free_port()}"))
    key = await gateway.new_key(balance_usd="1.00", rpm=10, concurrency=1)
    route = ROUTES[PLAIN_BY_PROTOCOL[protocol]]
    reply = await call(http, gw, route.path, route.raw, auth(protocol, key))

    assert reply.status == 502, reply.body
    error = reply.json()["error"]
    assert (error["type"], error["reason"]) == ("api_error", "upstream_unreachable")
    if status_name is not None:
        assert (error["code"], error["status"]) == (502, status_name)
    assert reply.headers["x-ratelimit-remaining-requests"] == "9"
    entry = await settled(gateway, reply.headers["x-request-id"])
    assert (entry.outcome, entry.cost_usd) == ("upstream_error", "0.00")
    assert (await gateway.accounts.get_account("acme")).balance_usd == "1.00"
    await assert_nothing_held(gateway, key)


@pytest.mark.slow  # ~7 s over its 6 cases: waits out upstream timeouts
@pytest.mark.parametrize(
    ("name", "status_name"),
    [("chat", None), ("messages-stream", None), ("stream-sse", "DEADLINE_EXCEEDED")],
)
async def test_upstream_timeout_is_504_and_releases_everything(
    gateway: Gateway,
    http: aiohttp.ClientSession,
    other_gateway: Any,
    name: str,
    status_name: str | None,
) -> None:
    gw = await other_gateway(providers=providers(gateway.upstream.url, timeout_s=0.3))
    key = await gateway.new_key(balance_usd="1.00", rpm=10, concurrency=1)
    route = ROUTES[name]
    headers = {"x-mock-latency-ms": "1000", **auth(route.protocol, key)}
    started = time.monotonic()
    reply = await call(http, gw, route.path, route.raw, headers)

    assert time.monotonic() - started < 1.0  # answered by the gateway, not the late upstream
    assert reply.status == 504, reply.body
    error = reply.json()["error"]
    assert (error["type"], error["reason"]) == ("api_error", "upstream_timeout")
    if status_name is not None:
        assert (error["code"], error["status"]) == (504, status_name)
    assert reply.headers["x-ratelimit-remaining-requests"] == "9"
    entry = await settled(gateway, reply.headers["x-request-id"])
    assert (entry.outcome, entry.cost_usd) == ("upstream_error", "0.00")
    await assert_nothing_held(gateway, key)


@pytest.mark.parametrize("name", STREAM_ROUTES)
async def test_upstream_reset_mid_stream_ends_the_stream_and_charges_what_was_relayed(
    gateway: Gateway, http: aiohttp.ClientSession, name: str
) -> None:
    route = ROUTES[name]
    key = await gateway.new_key(balance_usd="1.00", concurrency=1)
    headers = {"x-mock-error-after-chunks": "2", **auth(route.protocol, key)}
    reply = await call(http, gateway, route.path, route.raw, headers)

    assert reply.status == 200
    text = reply.body.decode()
    assert "tok9" in text and "tok10" not in text  # two pieces, then the upstream vanished
    entry = await settled(gateway, reply.headers["x-request-id"])
    assert entry.outcome == "upstream_cut"
    # Two pieces relayed: 24 + 25 chars -> 13 tokens estimated (more than any running
    # count the stream reported); the input as reported, else as estimated at admission.
    reported_input = route.protocol in ("anthropic", "gemini")
    input_tokens = PROMPT_TOKENS if reported_input else estimate_input_tokens(len(route.raw))
    assert (entry.input_tokens, entry.output_tokens) == (input_tokens, 13)
    expected = cost_nano(route.model, input_tokens, 13)
    assert entry.cost_usd == format_usd(expected)
    assert (await gateway.accounts.get_account("acme")).balance_usd == format_usd(
        NANO_PER_USD - expected
    )
    await assert_nothing_held(gateway, key)


# --- model rename ---------------------------------------------------------------------


async def test_renamed_model_reaches_the_upstream_under_its_upstream_id(
    gateway: Gateway, http: aiohttp.ClientSession, other_gateway: Any
) -> None:
    models = gateway_config(gateway.upstream.url, gateway.storage.url)["models"]
    renamed = [
        ("house-mini", "mock-openai", "gpt-4o-mini"),
        ("house-claude", "mock-anthropic", "claude-sonnet-4-6"),
        ("house-flash", "mock-gemini", GEMINI),
    ]
    models += [
        {
            "id": model_id,
            "provider": provider,
            "upstream_id": upstream_id,
            "input_per_mtok": "1.00",
            "output_per_mtok": "2.00",
            "default_max_output": 1000,
        }
        for model_id, provider, upstream_id in renamed
    ]
    gw = await other_gateway(models=models)
    key = await gateway.new_key()  # metered: the rename is the only change to the body
    log = gateway.upstream.state

    chat = {**CHAT, "model": "house-mini", "temperature": 0.3}
    reply = await call(
        http, gw, "/v1/chat/completions", json.dumps(chat).encode(), auth("openai", key)
    )
    assert reply.status == 200, reply.body
    assert log.requests[-1].json() == {**chat, "model": "gpt-4o-mini"}

    stream = {**MESSAGES, "model": "house-claude", "stream": True}
    reply = await call(
        http, gw, "/v1/messages", json.dumps(stream).encode(), auth("anthropic", key)
    )
    assert reply.status == 200, reply.body
    assert log.requests[-1].json() == {**stream, "model": "claude-sonnet-4-6"}

    path = "/v1beta/models/house-flash:streamGenerateContent?alt=sse"
    raw = json.dumps(CONTENTS).encode()
    reply = await call(http, gw, path, raw, auth("gemini", key))
    assert reply.status == 200, reply.body
    assert log.requests[-1].path == f"/v1beta/models/{GEMINI}:streamGenerateContent"
    assert log.requests[-1].body == raw  # the model is in the path: the body is untouched

    # Charged as the gateway's model, at its price: 6 in x $1 + 20 out x $2 per Mtok.
    entry = await settled(gw, reply.headers["x-request-id"])
    assert entry.model == "house-flash"
    assert entry.cost_usd == format_usd(PROMPT_TOKENS * 1000 + 20 * 2000)


def test_stream_headers_can_wait_for_the_first_event() -> None:
    """relay.py's one-write coalescing leans on aiohttp's class attribute: if an aiohttp
    upgrade drops or renames it, streams stay correct but lose the saving, so say so here."""
    from ratelimit_gw.relay import _HeadersWithFirstWrite

    assert web.StreamResponse._send_headers_immediately is True
    assert _HeadersWithFirstWrite._send_headers_immediately is False
