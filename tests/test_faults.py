"""Fault injection: whatever breaks, and wherever, nothing stays held and the books balance.

Each scenario drives a gateway on a real socket against the mock upstream's ``x-mock-*``
controls (latency, mid-stream resets, malformed SSE, large streams) or a raw-socket client
that reads slowly or hangs up at a chosen moment: before its body is sent, while the upstream
is thinking, after the first event, just before the end. After every scenario
:func:`assert_books_balance` waits (bounded) for settlement and then checks the invariant:

- no live hold and ``held_usd == "0.00"``; no concurrency lease (key and account), nothing
  in the in-flight set, and the process holds no handler task;
- exactly one ledger entry per admitted request id (none for a request never admitted);
- Σ ledger cost == topped up − balance == spent.

Mock usage is exact: input = ceil(prompt chars / 4), output = 20 words in 4 pieces.
Every test runs on memory:// and on a real Redis.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from ratelimit_gw.accounts import LedgerEntry
from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.limits import Limits
from ratelimit_gw.money import parse_usd
from ratelimit_gw.protocols import estimate_input_tokens, input_token_bound
from ratelimit_gw.services import SERVICES
from ratelimit_gw.storage import Storage

from .conftest import Gateway, Upstream, custom_endpoint, gateway_config, start_gateway
from .http_helpers import auth

PROMPT = "Tell me about the gateway, please"  # 33 chars -> 9 input tokens at the mock
PROMPT_TOKENS = 9
GEMINI = "gemini-2.5-flash"
ENDPOINT_KEY = "endpoint-upstream-secret-42"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
CONTENTS = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}


@dataclass(frozen=True)
class Route:
    protocol: str
    path: str
    body: dict[str, Any]
    stream: bool
    end_marker: bytes  # the last frame of a complete answer

    @property
    def raw(self) -> bytes:
        return json.dumps(self.body).encode()


def _route(protocol: str, path: str, body: dict[str, Any], end: bytes = b"") -> Route:
    return Route(protocol, path, body, bool(end), end)


MESSAGES_BODY = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 1000,
    "messages": [{"role": "user", "content": PROMPT}],
}
ROUTES = {
    "chat": _route("openai", "/v1/chat/completions", CHAT),
    "chat-stream": _route(
        "openai", "/v1/chat/completions", {**CHAT, "stream": True}, b"data: [DONE]"
    ),
    "responses-stream": _route(
        "openai",
        "/v1/responses",
        {"model": "gpt-4o-mini", "input": PROMPT, "stream": True},
        b"event: response.completed",
    ),
    "messages": _route("anthropic", "/v1/messages", MESSAGES_BODY),
    "messages-stream": _route(
        "anthropic", "/v1/messages", {**MESSAGES_BODY, "stream": True}, b"event: message_stop"
    ),
    "generate": _route("gemini", f"/v1beta/models/{GEMINI}:generateContent", CONTENTS),
    "gemini-sse": _route(
        "gemini",
        f"/v1beta/models/{GEMINI}:streamGenerateContent?alt=sse",
        CONTENTS,
        b'"finishReason":"STOP"',
    ),
    "gemini-array": _route(
        "gemini", f"/v1beta/models/{GEMINI}:streamGenerateContent", CONTENTS, b'"STOP"'
    ),
    # A custom endpoint (§10) with a priced model in the body: metered like a native call.
    "proxy-stream": _route(
        "openai",
        "/proxy-api/acme-ai/llm/v1/chat/completions",
        {**CHAT, "stream": True},
        b"data: [DONE]",
    ),
}
SSE_ROUTES = ["chat-stream", "responses-stream", "messages-stream", "gemini-sse", "proxy-stream"]
# Routes whose stream reports the input tokens before its first piece of text.
INPUT_REPORTED_EARLY = {"messages-stream", "gemini-sse", "gemini-array"}


def estimated_input(route: Route) -> int:
    """The admission estimate the gateway charges when no usage was reported."""
    return estimate_input_tokens(len(route.raw))


def relayed_tokens(pieces: int) -> int:
    """The output estimate for the first ``pieces`` pieces relayed (4 chars a token)."""
    text = "".join(f" tok{j}" if j else "tok0" for j in range(pieces * 5))
    return math.ceil(len(text) / 4)


# --- the gateway, the caller, the invariant ------------------------------------------------


@dataclass
class Caller:
    key: str
    key_id: str
    account: str = "acme"


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(upstream: Upstream, storage: Storage) -> AsyncIterator[GatewayFactory]:
    runners = []

    async def make(timeout_s: float = 30.0) -> Gateway:
        providers = gateway_config(upstream.url, storage.url)["providers"]
        endpoint = custom_endpoint(upstream.url, timeout_s=timeout_s)
        runner, gw = await start_gateway(
            upstream,
            storage,
            {"ENDPOINT_KEY": ENDPOINT_KEY},
            providers=[{**p, "timeout_s": timeout_s} for p in providers],
            custom_endpoints=[endpoint],
        )
        runners.append(runner)
        return gw

    try:
        yield make
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


async def new_caller(gw: Gateway, account_concurrency: int = 8, concurrency: int = 4) -> Caller:
    """A prepaid account with $1.00 and concurrency limits on the account and the key."""
    await gw.accounts.create_account(
        "acme", balance_nano=parse_usd("1.00"), limits=Limits(concurrency=account_concurrency)
    )
    created = await gw.accounts.create_key("acme", limits=Limits(concurrency=concurrency))
    return Caller(created.key, created.record.id)


def nano(usd: str) -> int:
    """A signed USD string as nano-USD (a balance may be overrun below zero)."""
    return -parse_usd(usd[1:]) if usd.startswith("-") else parse_usd(usd)


async def assert_books_balance(
    gw: Gateway, caller: Caller, admitted: list[str]
) -> dict[str, LedgerEntry]:
    """Wait for settlement, then check the invariant; return the entries by request id."""
    svc = gw.app[SERVICES]
    deadline = time.monotonic() + 10
    while True:
        account = await gw.accounts.get_account(caller.account)
        if not svc.inflight and not svc.settler.pending and account.holds_live == 0:
            break
        assert time.monotonic() < deadline, (
            f"not settled: {len(svc.inflight)} handler(s), {svc.settler.pending} "
            f"settlement(s), {account.holds_live} hold(s)"
        )
        await asyncio.sleep(0.02)
    assert account.held_usd == "0.00"

    peek = await svc.limiter.peek(caller.account, caller.key_id)
    assert peek.concurrency_in_use == 0
    keys = AccountKeys(caller.account)
    for zset in (keys.key_leases(caller.key_id), keys.inflight):  # inflight: account leases
        assert await gw.storage.call("ZCARD", zset) == 0, zset

    ledger = await gw.accounts.ledger(caller.account, limit=1000)
    settled = [e for e in ledger if e.type in ("charge", "release")]
    assert sorted(e.request_id or "" for e in settled) == sorted(admitted)
    total = sum(nano(e.cost_usd or "0") for e in settled)
    assert nano(account.topped_up_usd) - nano(account.balance_usd) == total
    assert nano(account.spent_usd) == total
    return {e.request_id or "": e for e in settled}


# --- a raw HTTP client that can misbehave --------------------------------------------------


def new_request_id() -> str:
    return f"fault-{uuid.uuid4().hex[:16]}"


@dataclass
class RawCall:
    request_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytes = b""

    async def read_until(self, marker: bytes, timeout_s: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout_s
        while marker not in self.received:
            left = deadline - time.monotonic()
            assert left > 0, f"{marker!r} never arrived: {self.received[-300:]!r}"
            data = await asyncio.wait_for(self.reader.read(65536), left)
            assert data, f"the answer ended before {marker!r}: {self.received[-300:]!r}"
            self.received += data
        return self.received

    async def read_all(self, chunk: int = 65536, pause_s: float = 0.0) -> bytes:
        while data := await asyncio.wait_for(self.reader.read(chunk), 10):
            self.received += data
            if pause_s:
                await asyncio.sleep(pause_s)
        return self.received

    async def hang_up(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    @property
    def status(self) -> int:
        return int(self.received.split(b" ", 2)[1])


async def open_call(
    gw: Gateway,
    route: Route,
    key: str,
    headers: dict[str, str] | None = None,
    *,
    body_bytes_sent: int | None = None,
    receive_buffer: int | None = None,
) -> RawCall:
    """Send a request by hand; ``body_bytes_sent`` stops short of the declared length."""
    host, port = gw.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=receive_buffer or 2**16)
    request_id = new_request_id()
    body = route.raw
    lines = {
        "Host": f"{host}:{port}",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
        "x-request-id": request_id,
        **auth(route.protocol, key),
        **(headers or {}),
    }
    head = f"POST {route.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines.items())
    sent = body if body_bytes_sent is None else body[:body_bytes_sent]
    writer.write(head.encode() + b"\r\n" + sent)
    await writer.drain()
    return RawCall(request_id, reader, writer)


async def complete(gw: Gateway, route: Route, key: str, headers: dict[str, str]) -> RawCall:
    call = await open_call(gw, route, key, headers)
    await call.read_all()
    await call.hang_up()
    return call


async def upstream_saw(gw: Gateway, request_id: str) -> None:
    """Wait until the mock upstream has received the request (it logs before answering)."""
    deadline = time.monotonic() + 5
    while not any(r.headers.get("x-request-id") == request_id for r in gw.upstream.state.requests):
        assert time.monotonic() < deadline, "the request never reached the upstream"
        await asyncio.sleep(0.01)


# --- upstream timeouts ---------------------------------------------------------------------


@pytest.mark.slow  # ~5 s over its 8 cases: waits out upstream timeouts
@pytest.mark.parametrize("name", ["chat", "messages-stream", "gemini-sse", "proxy-stream"])
async def test_upstream_timeout_before_headers_is_504_and_leaves_nothing_held(
    make_gateway: GatewayFactory, name: str
) -> None:
    gw = await make_gateway(timeout_s=0.3)
    caller = await new_caller(gw)
    route = ROUTES[name]
    call = await complete(gw, route, caller.key, {"x-mock-latency-ms": "600"})

    assert call.status == 504
    assert b'"upstream_timeout"' in call.received
    entries = await assert_books_balance(gw, caller, [call.request_id])
    entry = entries[call.request_id]
    assert (entry.type, entry.outcome, entry.cost_usd) == ("release", "upstream_error", "0.00")


@pytest.mark.slow  # ~5 s over its 6 cases: waits out upstream timeouts
@pytest.mark.parametrize("name", ["chat-stream", "messages-stream", "gemini-sse"])
async def test_upstream_timeout_mid_stream_cuts_the_stream_and_charges_what_was_relayed(
    make_gateway: GatewayFactory, name: str
) -> None:
    gw = await make_gateway(timeout_s=0.5)
    caller = await new_caller(gw)
    route = ROUTES[name]
    # Pieces at 0 s and 0.35 s; the next would come at 0.7 s, after the 0.5 s total timeout.
    call = await complete(gw, route, caller.key, {"x-mock-chunk-delay-ms": "350"})

    assert call.status == 200  # the status line was sent before the timeout
    assert b" tok9" in call.received and b"tok10" not in call.received
    assert route.end_marker not in call.received
    entries = await assert_books_balance(gw, caller, [call.request_id])
    entry = entries[call.request_id]
    assert entry.outcome == "upstream_cut"
    assert entry.output_tokens == relayed_tokens(2)
    expected_input = PROMPT_TOKENS if name in INPUT_REPORTED_EARLY else estimated_input(route)
    assert entry.input_tokens == expected_input


# --- connection resets mid-stream ----------------------------------------------------------


@pytest.mark.parametrize("after_pieces", [0, 2, 4])
@pytest.mark.parametrize("name", [*SSE_ROUTES, "gemini-array"])
async def test_upstream_reset_mid_stream_settles_the_pieces_relayed(
    gw: Gateway, name: str, after_pieces: int
) -> None:
    caller = await new_caller(gw)
    route = ROUTES[name]
    headers = {"x-mock-error-after-chunks": str(after_pieces)}
    call = await complete(gw, route, caller.key, headers)

    assert call.status == 200
    if after_pieces < 4 or not name.startswith("gemini"):  # Gemini's last piece is its end
        assert route.end_marker not in call.received
    entries = await assert_books_balance(gw, caller, [call.request_id])
    entry = entries[call.request_id]
    assert entry.outcome == "upstream_cut"
    # Never less than the text relayed; a count the stream reported may be higher.
    assert (entry.output_tokens or 0) >= relayed_tokens(after_pieces)


# --- malformed SSE -------------------------------------------------------------------------


@pytest.mark.parametrize("name", SSE_ROUTES)
async def test_malformed_sse_frames_are_relayed_and_only_the_real_usage_is_charged(
    gw: Gateway, name: str
) -> None:
    caller = await new_caller(gw)
    route = ROUTES[name]
    call = await complete(gw, route, caller.key, {"x-mock-malformed-sse": "1"})

    assert call.status == 200
    assert b"\xff\xfe\x00 not UTF-8" in call.received  # relayed untouched
    assert route.end_marker in call.received
    entries = await assert_books_balance(gw, caller, [call.request_id])
    entry = entries[call.request_id]
    assert (entry.outcome, entry.input_tokens, entry.output_tokens) == ("ok", PROMPT_TOKENS, 20)


@pytest.mark.parametrize("name", SSE_ROUTES)
async def test_malformed_sse_then_a_reset_charges_only_the_text_relayed(
    gw: Gateway, name: str
) -> None:
    caller = await new_caller(gw)
    route = ROUTES[name]
    headers = {"x-mock-malformed-sse": "1", "x-mock-error-after-chunks": "2"}
    call = await complete(gw, route, caller.key, headers)

    assert call.status == 200
    entries = await assert_books_balance(gw, caller, [call.request_id])
    entry = entries[call.request_id]
    assert entry.outcome == "upstream_cut"
    # The garbage added no text: two pieces relayed (Gemini's running count says 10).
    assert entry.output_tokens == relayed_tokens(2)
    expected_input = PROMPT_TOKENS if name in INPUT_REPORTED_EARLY else estimated_input(route)
    assert entry.input_tokens == expected_input


async def test_malformed_json_array_stream_is_relayed_and_charged_the_held_worst_case(
    gw: Gateway,
) -> None:
    caller = await new_caller(gw)
    route = ROUTES["gemini-array"]
    call = await complete(gw, route, caller.key, {"x-mock-malformed-sse": "1"})

    assert call.status == 200
    entries = await assert_books_balance(gw, caller, [call.request_id])
    entry = entries[call.request_id]
    # The array cannot be parsed, so no usage is known: what was held is charged (§5).
    assert (entry.outcome, entry.input_tokens, entry.output_tokens) == (
        "ok",
        input_token_bound(len(route.raw)),
        1000,
    )


# --- an upstream that reports impossible usage --------------------------------------------


@pytest.fixture
async def lying_upstream() -> AsyncIterator[str]:
    """Answers every chat call with a usage no real provider would report."""

    async def answer(request: web.Request) -> web.Response:
        usage = json.loads(request.headers["x-test-usage"])
        return web.json_response({"id": "chatcmpl-1", "choices": [], "usage": usage})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("usage", "charged"),
    [
        ({"prompt_tokens": -5_000_000, "completion_tokens": -1}, (0, 0)),
        ({"prompt_tokens": 2**63 - 1, "completion_tokens": 3}, (2**31 - 1, 3)),
    ],
)
async def test_impossible_usage_from_an_upstream_is_bounded_and_still_settled(
    upstream: Upstream,
    storage: Storage,
    lying_upstream: str,
    usage: dict[str, int],
    charged: tuple[int, int],
) -> None:
    providers = gateway_config(lying_upstream, storage.url)["providers"]
    runner, gw = await start_gateway(upstream, storage, providers=providers)
    try:
        caller = await new_caller(gw)
        call = await complete(gw, ROUTES["chat"], caller.key, {"x-test-usage": json.dumps(usage)})
        assert call.status == 200
        entries = await assert_books_balance(gw, caller, [call.request_id])
    finally:
        await runner.cleanup()
    entry = entries[call.request_id]
    assert (entry.outcome, entry.input_tokens, entry.output_tokens) == ("ok", *charged)
    account = await gw.accounts.get_account("acme")
    assert nano(account.balance_usd) <= nano("1.00")  # never credited


# --- slow clients --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat-stream", "messages-stream", "gemini-sse"])
async def test_a_slow_reader_gets_the_whole_stream_and_the_exact_charge(
    gw: Gateway, name: str
) -> None:
    caller = await new_caller(gw)
    route = ROUTES[name]
    # 180 pieces (900 tokens, ~60 KB) to a 4 KB receive buffer read 1 KB at a time; under
    # the cap of 1000 a prepaid caller's stream is held for (and its upstream sent).
    call = await open_call(gw, route, caller.key, {"x-mock-chunks": "180"}, receive_buffer=4096)
    await call.read_all(chunk=1024, pause_s=0.001)
    await call.hang_up()

    assert call.status == 200
    assert route.end_marker in call.received
    expected_output = 900
    assert f" tok{expected_output - 1}".encode() in call.received
    entries = await assert_books_balance(gw, caller, [call.request_id])
    entry = entries[call.request_id]
    assert (entry.outcome, entry.input_tokens, entry.output_tokens) == (
        "ok",
        PROMPT_TOKENS,
        expected_output,
    )


# --- client disconnects at every stage -----------------------------------------------------


@pytest.mark.parametrize("name", ["chat", "messages-stream", "proxy-stream"])
async def test_hanging_up_before_the_body_is_sent_admits_and_charges_nothing(
    gw: Gateway, name: str
) -> None:
    caller = await new_caller(gw)
    route = ROUTES[name]
    call = await open_call(gw, route, caller.key, body_bytes_sent=10)
    await asyncio.sleep(0.1)  # the handler is waiting for the rest of the body
    await call.hang_up()

    await assert_books_balance(gw, caller, admitted=[])
    assert not [r for r in gw.upstream.state.requests if not r.path.startswith("/mock/")]
    # The caller's slots are all free: a complete request still passes.
    again = await complete(gw, route, caller.key, {})
    assert again.status == 200
    await assert_books_balance(gw, caller, [again.request_id])


@pytest.mark.slow  # ~8 s over its 8 cases: a 1 s upstream latency each
@pytest.mark.parametrize("name", ["chat", "generate", "messages-stream", "proxy-stream"])
async def test_hanging_up_while_the_upstream_thinks_settles_the_prompt_only(
    gw: Gateway, name: str
) -> None:
    caller = await new_caller(gw)
    route = ROUTES[name]
    call = await open_call(gw, route, caller.key, {"x-mock-latency-ms": "1000"})
    await upstream_saw(gw, call.request_id)
    left_at = time.monotonic()
    await call.hang_up()

    entries = await assert_books_balance(gw, caller, [call.request_id])
    assert time.monotonic() - left_at < 0.8  # did not wait for the upstream's answer
    entry = entries[call.request_id]
    # The prompt was sent (charged at the admission estimate); no text came back.
    assert (entry.outcome, entry.input_tokens, entry.output_tokens) == (
        "client_disconnect",
        estimated_input(route),
        0,
    )


@pytest.mark.slow  # ~17 s over its 20 cases: streams with chunk delays
@pytest.mark.parametrize(
    ("pieces_read", "marker"), [(1, b"tok4"), (3, b"tok14")], ids=["after-first", "before-end"]
)
@pytest.mark.parametrize("name", SSE_ROUTES)
async def test_hanging_up_mid_stream_settles_the_text_relayed(
    gw: Gateway, name: str, pieces_read: int, marker: bytes
) -> None:
    caller = await new_caller(gw)
    route = ROUTES[name]
    # The gateway learns of the hang-up only on its next write or by cancellation: leave it
    # ample time before the next piece, even on a loaded 2-core CI machine.
    call = await open_call(gw, route, caller.key, {"x-mock-chunk-delay-ms": "400"})
    await call.read_until(marker)
    await call.hang_up()

    entries = await assert_books_balance(gw, caller, [call.request_id])
    entry = entries[call.request_id]
    assert entry.outcome == "client_disconnect"
    assert entry.output_tokens == relayed_tokens(pieces_read)
    expected_input = PROMPT_TOKENS if name in INPUT_REPORTED_EARLY else estimated_input(route)
    assert entry.input_tokens == expected_input


async def test_many_callers_failing_in_every_way_at_once_leave_the_books_balanced(
    gw: Gateway,
) -> None:
    caller = await new_caller(gw, account_concurrency=100, concurrency=100)
    key = caller.key

    async def one(i: int) -> str | None:
        route = ROUTES[SSE_ROUTES[i % len(SSE_ROUTES)]]
        kind = i % 5
        if kind == 0:  # hangs up before its body is complete: never admitted
            call = await open_call(gw, route, key, body_bytes_sent=5)
            await asyncio.sleep(0.05)
            await call.hang_up()
            return None
        headers = [
            {"x-mock-error-after-chunks": "1"},
            {"x-mock-malformed-sse": "1"},
            {"x-mock-chunk-delay-ms": "100"},
            {},
        ][kind - 1]
        call = await open_call(gw, route, key, headers)
        if kind == 3:  # hangs up after the first piece
            await call.read_until(b"tok4")
        else:
            await call.read_all()
        await call.hang_up()
        return call.request_id

    ids = await asyncio.gather(*(one(i) for i in range(40)))
    admitted = [i for i in ids if i is not None]
    assert len(admitted) == 32
    entries = await assert_books_balance(gw, caller, admitted)
    outcomes = sorted({e.outcome or "" for e in entries.values()})
    assert outcomes == ["client_disconnect", "ok", "upstream_cut"]
