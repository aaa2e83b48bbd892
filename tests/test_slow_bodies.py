"""Slow and stalled request bodies, and idle connections (issue 17, item 6).

A body must arrive within ``server.body_timeout_s`` (else 408 ``body_timeout`` in the route's
envelope, and the connection closes), the bytes of bodies one process holds are bounded by
``server.max_buffered_body_bytes`` (beyond it 529 ``overloaded_error``, reason
``body_buffer_full``, with retry-after), and an idle keep-alive connection is closed after
``server.keepalive_timeout_s``. The clients are raw sockets on loopback, so a body can trickle
in a byte at a time or stop half-way; every test runs on memory:// and on a real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from ratelimit_gw.services import SERVICES
from ratelimit_gw.storage import Storage

from .conftest import ADMIN_TOKEN, Gateway, Upstream, custom_endpoint, start_gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
KIB = 1024
TRICKLE_GAP_S = 0.05  # a byte this often: never a whole body before the deadline


@asynccontextmanager
async def gateway_with(
    upstream: Upstream, storage: Storage, **server: Any
) -> AsyncIterator[Gateway]:
    runner, gw = await start_gateway(
        upstream,
        storage,
        {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN, "ENDPOINT_KEY": "endpoint-secret"},
        server={"host": "127.0.0.1", "port": 0, **server},
        custom_endpoints=[custom_endpoint(upstream.url)],
    )
    try:
        yield gw
    finally:
        await runner.cleanup()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.body)["error"]
        return error


class RawRequest:
    """One HTTP/1.1 request on its own connection, its body sent whenever the test says."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._trickle: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        gw: Gateway,
        path: str,
        headers: dict[str, str],
        *,
        content_length: int | None,
        first_bytes: bytes = b"",
    ) -> RawRequest:
        host, port = gw.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        framing = (
            f"Content-Length: {content_length}"
            if content_length is not None
            else "Transfer-Encoding: chunked"
        )
        head = f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        writer.write(f"{head}{framing}\r\n\r\n".encode() + first_bytes)
        await writer.drain()
        return cls(reader, writer)

    def trickle(self) -> None:
        """Send a byte of (JSON-harmless) whitespace every TRICKLE_GAP_S, until stopped."""

        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                while True:
                    self.writer.write(b" ")
                    await self.writer.drain()
                    await asyncio.sleep(TRICKLE_GAP_S)

        self._trickle = asyncio.create_task(send())

    async def stop_trickling(self) -> None:
        if self._trickle is not None:
            self._trickle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trickle

    async def answer(self, timeout_s: float) -> Answer:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout_s)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in filter(None, lines):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers["content-length"]))
        return Answer(int(status_line.split()[1]), headers, body)

    async def close(self) -> None:
        await self.stop_trickling()
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


async def chat_status(gw: Gateway, key: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        await response.read()
        return response.status


# --- body deadline ---------------------------------------------------------------------------


@pytest.mark.slow  # ~2 s over its 2 cases: waits out body deadlines
async def test_trickling_bodies_get_408_at_the_deadline_and_free_their_slots(
    upstream: Upstream, storage: Storage
) -> None:
    deadline_s = 1.0
    async with gateway_with(upstream, storage, body_timeout_s=deadline_s, max_inflight=2) as gw:
        svc = gw.app[SERVICES]
        slow_key = await gw.new_key("slow", concurrency=1)
        other_key = await gw.new_key("other")
        auth = {"Authorization": f"Bearer {slow_key}"}
        started = time.monotonic()
        tricklers = [
            await RawRequest.start(gw, "/v1/chat/completions", auth, content_length=10_000)
            for _ in range(2)
        ]
        try:
            for trickler in tricklers:
                trickler.trickle()
            await until(lambda: len(svc.inflight) == 2, "both tricklers in flight")
            # Both slots are taken by one concurrency-1 key's bodies: another account waits.
            assert await chat_status(gw, other_key) == 529

            answers = [await t.answer(timeout_s=deadline_s + 10) for t in tricklers]
            waited_s = time.monotonic() - started
            assert deadline_s <= waited_s < deadline_s + 5
            for answer in answers:
                assert answer.status == 408
                assert answer.headers["connection"] == "close"
                assert answer.error() == {
                    "type": "timeout_error",
                    "code": "408",
                    "reason": "body_timeout",
                    "message": "The request body did not arrive within 1 s.",
                    "param": None,
                }
            # The slots and the bytes they held are free: the other account is served.
            assert len(svc.inflight) == 0
            assert svc.bodies.buffered_bytes == 0
            assert await chat_status(gw, other_key) == 200

            # The connection carries no further request: sending the rest of the body and
            # another request gets no answer but the end of the connection.
            late = tricklers[0]
            await late.stop_trickling()
            late.writer.write(b" " * 10_000 + b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await late.writer.drain()
            assert await asyncio.wait_for(late.reader.read(), 15) == b""
        finally:
            for trickler in tricklers:
                await trickler.close()
        assert await gw.accounts.ledger("slow") == []  # nothing was admitted


GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"


def credential(route: str, key: str) -> dict[str, str]:
    if route == "anthropic":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    if route == "gemini":
        return {"x-goog-api-key": key}
    if route == "admin":
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return {"Authorization": f"Bearer {key}"}


ROUTES = {
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "gemini": GEMINI_PATH,
    "proxy": "/proxy-api/acme-ai/llm/v1/chat/completions",
    "admin": "/admin/accounts",
}


@pytest.mark.slow  # ~6 s over its 10 cases: waits out body deadlines
@pytest.mark.parametrize("route", ROUTES)
async def test_a_slow_body_gets_408_in_the_routes_envelope_on_every_route(
    upstream: Upstream, storage: Storage, route: str
) -> None:
    async with gateway_with(upstream, storage, body_timeout_s=0.5) as gw:
        key = await gw.new_key()
        trickler = await RawRequest.start(
            gw, ROUTES[route], credential(route, key), content_length=1000
        )
        try:
            trickler.trickle()
            answer = await trickler.answer(timeout_s=10)
        finally:
            await trickler.close()
    assert (answer.status, answer.headers["connection"]) == (408, "close")
    document = json.loads(answer.body)
    error = document["error"]
    assert (error["type"], error["reason"]) == ("timeout_error", "body_timeout")
    if route == "gemini":
        assert (error["code"], error["status"]) == (408, "DEADLINE_EXCEEDED")
    elif route == "anthropic":
        assert (document["type"], error["code"]) == ("error", "408")
    else:
        assert (error["code"], error["param"]) == ("408", None)


# --- the per-process budget of buffered body bytes -------------------------------------------


async def test_stalled_bodies_beyond_the_byte_budget_get_529_while_small_requests_pass(
    upstream: Upstream, storage: Storage
) -> None:
    async with gateway_with(
        upstream,
        storage,
        max_body_bytes=64 * KIB,
        max_buffered_body_bytes=96 * KIB,
        body_timeout_s=60,  # far beyond this test: the stalls end when the clients hang up
    ) as gw:
        svc = gw.app[SERVICES]
        key = await gw.new_key()
        auth = {"Authorization": f"Bearer {key}"}
        path = "/v1/chat/completions"
        stalled = [
            await RawRequest.start(gw, path, auth, content_length=40 * KIB, first_bytes=b" " * KIB)
            for _ in range(2)
        ]
        refused: list[RawRequest] = []
        try:
            # Each holds its declared 40 KiB from the start.
            await until(lambda: svc.bodies.buffered_bytes == 80 * KIB, "80 KiB held")
            async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/metrics") as r:
                assert "rlgw_buffered_body_bytes 81920.0" in (await r.text()).splitlines()

            # A third 40 KiB body does not fit: refused at once, before it is sent.
            refused.append(await RawRequest.start(gw, path, auth, content_length=40 * KIB))
            answer = await refused[-1].answer(timeout_s=10)
            assert answer.status == 529
            assert (answer.headers["retry-after"], answer.headers["retry-after-ms"]) == (
                "1",
                "1000",
            )
            assert answer.error() == {
                "type": "overloaded_error",
                "code": "529",
                "reason": "body_buffer_full",
                "message": "The gateway holds too many request bodies at once; retry shortly.",
                "param": None,
            }

            # A chunked body, with no length to judge up front, is refused once it outgrows
            # what is left.
            chunked = await RawRequest.start(gw, path, auth, content_length=None)
            refused.append(chunked)
            chunk = b" " * (4 * KIB)
            for _ in range(6):
                chunked.writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await chunked.writer.drain()
            answer = await chunked.answer(timeout_s=10)
            assert (answer.status, answer.error()["reason"]) == (529, "body_buffer_full")

            # A small request still fits beside the stalled ones.
            assert await chat_status(gw, key) == 200
            assert svc.bodies.buffered_bytes == 80 * KIB
        finally:
            for request in (*stalled, *refused):
                await request.close()
        # The stalled clients hung up: their handlers ended and gave their bytes back.
        await until(lambda: svc.bodies.buffered_bytes == 0, "the budget back at zero")
        async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/metrics") as r:
            assert "rlgw_buffered_body_bytes 0.0" in (await r.text()).splitlines()


# --- idle keep-alive connections -------------------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed_after_the_configured_time(
    upstream: Upstream, storage: Storage
) -> None:
    async with gateway_with(upstream, storage, keepalive_timeout_s=0.5) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            await writer.drain()
            answer = RawRequest(reader, writer)
            first = await answer.answer(timeout_s=10)
            assert first.status == 200 and "close" not in first.headers.get("connection", "")
            idle_since = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
            assert 0.4 <= time.monotonic() - idle_since < 5
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
