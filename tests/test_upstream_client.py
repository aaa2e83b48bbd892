"""The gateway's own HTTP/1.1 upstream client (upstream_client.py) against real loopback sockets.

Most tests run a raw ``asyncio.start_server`` that writes exact bytes, so the wire (framing,
keep-alive, closes, stalls) is under the test's control; a few use an aiohttp server.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path

import pytest
from aiohttp import web

from ratelimit_gw.upstream_client import (
    READ_HIGH_WATER_BYTES,
    UpstreamClient,
    UpstreamConnectionError,
    UpstreamRequestInvalid,
    UpstreamResponse,
    UpstreamUnreachable,
)

CONNECT_S = 2.0


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


class Conn:
    """One server-side connection of a :class:`RawServer`."""

    def __init__(
        self,
        server: RawServer,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.index = index
        self.reader = reader
        self.writer = writer

    async def read_request(self) -> bytes | None:
        """The next request (head and body) as raw bytes, or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        body = await self.reader.readexactly(length) if length else b""
        self.server.requests.append((self.index, head + body))
        return head + body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_client_closes(self) -> None:
        """Read (and drop) whatever comes until the client closes; record that it did."""
        with suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.server.closed_by_client.append(self.index)
        self.server.client_closed.set()

    def close(self) -> None:
        self.writer.close()


Handler = Callable[[Conn], Awaitable[None]]


class RawServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[int, bytes]] = []  # (connection index, raw request)
        self.closed_by_client: list[int] = []
        self.client_closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = self.connections
        self.connections += 1
        try:
            await self.handler(Conn(self, index, reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass  # a cancelled handler must end quietly: asyncio logs a cancelled one as an error
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    async def wait_client_closed(self, index: int, timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while index not in self.closed_by_client:
                self.client_closed.clear()
                await self.client_closed.wait()

    async def close(self) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        await server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient()
    try:
        yield upstream
    finally:
        await upstream.close()


def answer(*responses: bytes) -> Handler:
    """Answer every request, on any connection, with the next of ``responses`` (last repeats)."""
    sent = 0

    async def handler(conn: Conn) -> None:
        nonlocal sent
        while await conn.read_request() is not None:
            await conn.send(responses[min(sent, len(responses) - 1)])
            sent += 1

    return handler


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def get(
    client: UpstreamClient, url: str, *, method: str = "GET", seconds: float = 5.0
) -> UpstreamResponse:
    return await client.request(
        method, url, {}, b"", connect_timeout_s=CONNECT_S, deadline=deadline(seconds)
    )


async def fetch(client: UpstreamClient, url: str, method: str = "GET") -> tuple[int, bytes]:
    response = await get(client, url, method=method)
    try:
        return response.status, await response.read()
    finally:
        response.release()


def free_port() -> int:
    """A port with nothing listening on it (bound, then closed without ``listen``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- 1. the request head and a Content-Length body ----------------------------------------


async def test_content_length_body_and_headers_in_order_and_case(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    server = await serve(
        answer(
            b"HTTP/1.1 200 OK\r\nX-First: a\r\ncontent-TYPE: text/plain\r\nX-First: b\r\n"
            b"Content-Length: 11\r\n\r\nhello world"
        )
    )
    response = await client.request(
        "GET",
        server.url("/v1/models?x=1"),
        {"Authorization": "Bearer k-1", "X-Custom": "Value v"},
        b"",
        connect_timeout_s=CONNECT_S,
        deadline=deadline(),
    )
    assert response.status == 200
    assert response.headers == [
        ("X-First", "a"),
        ("content-TYPE", "text/plain"),
        ("X-First", "b"),
        ("Content-Length", "11"),
    ]
    assert await response.read() == b"hello world"
    assert response.finished
    response.release()
    assert server.requests == [
        (
            0,
            b"GET /v1/models?x=1 HTTP/1.1\r\n"
            + f"Host: 127.0.0.1:{server.port}\r\n".encode()
            + b"Authorization: Bearer k-1\r\nX-Custom: Value v\r\n\r\n",
        )
    ]


async def test_content_length_is_sent_for_post_even_when_empty_and_not_for_get(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    server = await serve(answer(ok()))
    host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
    for method, body in (("POST", b'{"a": 1}'), ("POST", b""), ("GET", b""), ("DELETE", b"")):
        response = await client.request(
            method,
            server.url("/p"),
            {"Content-Type": "application/json"},
            body,
            connect_timeout_s=CONNECT_S,
            deadline=deadline(),
        )
        assert await response.read() == b"ok"
        response.release()
    assert [request for _, request in server.requests] == [
        b"POST /p HTTP/1.1\r\n"
        + host
        + b'Content-Type: application/json\r\nContent-Length: 8\r\n\r\n{"a": 1}',
        b"POST /p HTTP/1.1\r\n"
        + host
        + b"Content-Type: application/json\r\nContent-Length: 0\r\n\r\n",
        b"GET /p HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n\r\n",
        b"DELETE /p HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n\r\n",
    ]
    assert server.connections == 1


async def test_a_large_request_body_arrives_whole(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    server = await serve(answer(ok()))
    body = os.urandom(200_000)  # above the size the client writes apart from the head
    response = await client.request(
        "PUT", server.url("/big"), {}, body, connect_timeout_s=CONNECT_S, deadline=deadline()
    )
    assert await response.read() == b"ok"
    response.release()
    [(_, request)] = server.requests
    head, _, received = request.partition(b"\r\n\r\n")
    assert head.endswith(b"\r\nContent-Length: 200000")
    assert received == body


async def test_the_request_target_is_percent_encoded_and_existing_escapes_kept(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    server = await serve(answer(ok()))
    assert await fetch(client, server.url("/v1/a b/%41é/x:y?q=a b&r=1/2#frag")) == (200, b"ok")
    [(_, request)] = server.requests
    assert request.split(b"\r\n")[0] == b"GET /v1/a%20b/%41%C3%A9/x:y?q=a%20b&r=1/2 HTTP/1.1"
    assert await fetch(client, f"http://127.0.0.1:{server.port}") == (200, b"ok")
    assert server.requests[1][1].split(b"\r\n")[0] == b"GET / HTTP/1.1"


async def test_a_response_arriving_one_byte_at_a_time_is_parsed(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    wire = (
        b"HTTP/1.1 201 Created\r\nX-Long-Header-Name: some longer value\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"
    )

    async def handler(conn: Conn) -> None:
        conn.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while await conn.read_request() is not None:
            for i in range(len(wire)):
                await conn.send(wire[i : i + 1])
                await asyncio.sleep(0)

    server = await serve(handler)
    response = await get(client, server.url())
    assert response.status == 201
    assert response.headers == [
        ("X-Long-Header-Name", "some longer value"),
        ("Transfer-Encoding", "chunked"),
    ]
    assert await response.read() == b"abcdefg"
    response.release()
    assert client.idle_connections() == 1


# --- 2, 3. keep-alive ------------------------------------------------------------------------


async def test_sequential_requests_share_one_keep_alive_connection(
    client: UpstreamClient,
) -> None:
    peers: list[object] = []

    async def handle(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(text=f"n={len(peers)}")

    app = web.Application()
    app.router.add_get("/n", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        for n in (1, 2, 3):
            response = await get(client, f"http://127.0.0.1:{port}/n")
            assert response.status == 200
            assert await response.read() == f"n={n}".encode()
            response.release()
            assert client.idle_connections() == 1
        assert len(peers) == 3 and len(set(peers)) == 1 and peers[0] is not None
    finally:
        await client.close()
        await runner.cleanup()


async def test_connection_close_response_is_not_pooled(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        if await conn.read_request() is not None:
            await conn.send(ok(b"bye", b"Connection: close\r\n"))
            await conn.until_client_closes()

    server = await serve(handler)
    for _ in range(2):
        response = await get(client, server.url())
        assert response.headers[0] == ("Connection", "close")
        assert await response.read() == b"bye"
        response.release()
        assert client.idle_connections() == 0
    assert server.connections == 2
    await server.wait_client_closed(0)
    await server.wait_client_closed(1)


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_a_response_without_body_status_keeps_the_connection(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient, status: bytes
) -> None:
    server = await serve(answer(b"HTTP/1.1 " + status + b"\r\nX-A: 1\r\n\r\n", ok(b"next")))
    response = await get(client, server.url())
    assert response.status == int(status[:3])
    assert response.headers == [("X-A", "1")]
    assert await response.read() == b""
    response.release()
    assert client.idle_connections() == 1
    assert await fetch(client, server.url()) == (200, b"next")
    assert server.connections == 1


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    closed = asyncio.Event()

    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(ok(b"c%d" % conn.index))
            if conn.index == 0:
                await asyncio.sleep(0.02)
                conn.close()
                closed.set()
                return

    server = await serve(handler)
    assert await fetch(client, server.url()) == (200, b"c0")
    await asyncio.wait_for(closed.wait(), 2)
    await asyncio.sleep(0.1)  # the client sees the FIN while the connection sits idle
    assert await fetch(client, server.url()) == (200, b"c1")
    assert server.connections == 2
    assert [index for index, _ in server.requests] == [0, 1]  # no request lost on conn 0


async def test_bytes_arriving_on_an_idle_connection_discard_it(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(ok(b"c%d" % conn.index))
            if conn.index == 0:
                await asyncio.sleep(0.02)
                await conn.send(b"X")  # unsolicited
                await conn.until_client_closes()
                return

    server = await serve(handler)
    assert await fetch(client, server.url()) == (200, b"c0")
    await server.wait_client_closed(0)
    assert await fetch(client, server.url()) == (200, b"c1")
    assert server.connections == 2
    assert client.idle_connections() == 1


async def test_bytes_after_a_complete_response_keep_the_connection_out_of_the_pool(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    """More bytes than Content-Length, arriving before release: the connection can't be trusted."""

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(ok(b"hello"))
        await asyncio.sleep(0.05)
        await conn.send(b"EXTRA GARBAGE")
        await conn.until_client_closes()

    server = await serve(handler)
    response = await get(client, server.url())
    assert await response.read() == b"hello"
    await asyncio.sleep(0.2)  # the extra bytes arrive while the response is still held
    response.release()
    assert client.idle_connections() == 0
    await server.wait_client_closed(0)


async def test_a_second_unrequested_response_is_not_mixed_into_the_answer_or_the_pool(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    """Content-Length: 5 then a whole extra response in the same write (a desynced upstream).

    The caller asked for one response: it must get exactly the status, headers and body of
    that one, and the connection (which carried bytes nobody asked for) must not be pooled.
    """
    smuggled = b"HTTP/1.1 500 Oops\r\nX-Smuggled: 1\r\nContent-Length: 3\r\n\r\nbad"
    server = await serve(answer(ok(b"hello") + smuggled))
    response = await get(client, server.url())
    await asyncio.sleep(0.05)  # everything has arrived
    body = await response.read()
    response.release()
    assert (response.status, response.headers, body, client.idle_connections()) == (
        200,
        [("Content-Length", "5")],
        b"hello",
        0,
    )


# --- 4, 5. streaming and bodies ended by the close ----------------------------------------


async def test_chunks_are_delivered_as_they_arrive(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    proceed = asyncio.Event()

    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await conn.send(b"5\r\nfirst\r\n")
            await proceed.wait()
            await conn.send(b"6\r\nsecond\r\n0\r\n\r\n")

    server = await serve(handler)
    response = await get(client, server.url())
    assert response.status == 200
    chunks = response.iter_chunks()
    # chunk 2 is only sent once the test sets ``proceed``: chunk 1 came on its own.
    assert await asyncio.wait_for(anext(chunks), 2) == b"first"
    assert not response.finished
    assert not response.body_buffered
    proceed.set()
    async with asyncio.timeout(2):
        while not response.finished and not response.body_buffered:
            await asyncio.sleep(0.005)
    assert response.body_buffered
    assert not response.finished  # arrived, not read yet
    rest = [chunk async for chunk in chunks]
    assert b"".join(rest) == b"second"
    assert response.finished
    assert not response.body_buffered
    response.release()
    assert client.idle_connections() == 1
    assert server.connections == 1


async def test_body_without_length_ends_with_the_close(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await asyncio.sleep(0.05)
        await conn.send(b"part two")
        conn.close()

    server = await serve(handler)
    response = await get(client, server.url())
    assert response.status == 200
    assert await response.read() == b"part one, part two"
    assert response.finished
    response.release()
    assert client.idle_connections() == 0
    assert server.connections == 1


async def test_a_body_cut_short_is_a_connection_error(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if conn.index == 0:
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        else:
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await asyncio.sleep(0.02)
        conn.close()

    server = await serve(handler)
    response = await get(client, server.url())
    with pytest.raises(UpstreamConnectionError):
        await response.read()
    response.release()
    response = await get(client, server.url())
    got: list[bytes] = []
    with pytest.raises(UpstreamConnectionError):
        async for chunk in response.iter_chunks():
            got.append(chunk)
    response.release()
    assert got == [b"abc"]
    assert client.idle_connections() == 0
    assert server.connections == 2


async def test_released_before_the_body_ended_closes_the_connection(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await conn.until_client_closes()

    server = await serve(handler)
    response = await get(client, server.url())
    response.release()
    assert client.idle_connections() == 0
    await server.wait_client_closed(0)


# --- 6. stale pooled connections ----------------------------------------------------------


async def test_a_pooled_connection_closed_by_the_server_is_retried_once(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(ok(b"from %d" % conn.index))
        if conn.index == 0:
            # The keep-alive connection dies just as the next request arrives, unanswered.
            await conn.read_request()
            conn.close()
            return
        while await conn.read_request() is not None:
            await conn.send(ok(b"from %d" % conn.index))

    server = await serve(handler)
    assert await fetch(client, server.url("/a")) == (200, b"from 0")
    assert client.idle_connections() == 1
    response = await client.request(
        "POST", server.url("/b"), {}, b"payload", connect_timeout_s=CONNECT_S, deadline=deadline()
    )
    assert response.status == 200
    assert await response.read() == b"from 1"
    response.release()
    assert server.connections == 2
    requests = [(index, request.split(b" ")[1]) for index, request in server.requests]
    assert requests == [(0, b"/a"), (0, b"/b"), (1, b"/b")]
    assert server.requests[2][1].endswith(b"\r\n\r\npayload")
    assert client.idle_connections() == 1


async def test_a_pooled_connection_that_answered_partly_is_not_retried(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(ok())
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-")  # one byte is enough to stop a retry
        await asyncio.sleep(0.02)
        conn.close()

    server = await serve(handler)
    assert await fetch(client, server.url()) == (200, b"ok")
    with pytest.raises(UpstreamConnectionError):
        await get(client, server.url())
    assert server.connections == 1
    assert client.idle_connections() == 0


async def test_a_fresh_connection_closed_without_answer_is_not_retried(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        conn.close()

    server = await serve(handler)
    with pytest.raises(UpstreamConnectionError):
        await get(client, server.url())
    assert server.connections == 1
    assert len(server.requests) == 1
    assert client.idle_connections() == 0


async def test_a_stale_pool_is_retried_only_once(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    """Reused connection dies unanswered, then the fresh one dies too: the error surfaces."""

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if conn.index == 0:
            await conn.send(ok())
            await conn.read_request()
        conn.close()

    server = await serve(handler)
    assert await fetch(client, server.url()) == (200, b"ok")
    with pytest.raises(UpstreamConnectionError):
        await get(client, server.url())
    assert server.connections == 2
    assert len(server.requests) == 3


# --- 7. unreachable ------------------------------------------------------------------------


async def test_connection_refused_is_unreachable(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamUnreachable):
        await get(client, f"http://127.0.0.1:{free_port()}/x")
    assert client.idle_connections() == 0


# --- 8. the deadline -------------------------------------------------------------------------


async def test_a_deadline_that_passes_while_connecting_is_a_timeout_not_unreachable(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    # TimeoutError is an OSError: it must not be reported as "could not be reached" (502).
    server = await serve(answer(ok()))
    with pytest.raises(TimeoutError):
        await get(client, server.url(), seconds=0)
    assert client.idle_connections() == 0


async def test_the_deadline_covers_the_body(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await conn.until_client_closes()  # then stall

    server = await serve(handler)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await get(client, server.url(), seconds=0.3)
    got: list[bytes] = []
    with pytest.raises(TimeoutError):
        async for chunk in response.iter_chunks():
            got.append(chunk)
    elapsed = loop.time() - started
    assert got == [b"first"]
    assert 0.25 < elapsed < 5
    response.release()
    assert client.idle_connections() == 0
    await server.wait_client_closed(0)


async def test_the_deadline_covers_the_response_head(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.until_client_closes()  # never answers

    server = await serve(handler)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await get(client, server.url(), seconds=0.3)
    assert 0.25 < loop.time() - started < 5
    assert client.idle_connections() == 0
    await server.wait_client_closed(0)


async def test_a_read_cancelled_mid_body_closes_the_connection(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await conn.until_client_closes()

    server = await serve(handler)
    response = await get(client, server.url())
    reading = asyncio.create_task(response.read())
    await asyncio.sleep(0.05)
    assert not reading.done()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    response.release()
    assert client.idle_connections() == 0
    await server.wait_client_closed(0)


# --- 9. malformed responses ----------------------------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 abc\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_a_malformed_response_is_a_connection_error(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient, wire: bytes
) -> None:
    server = await serve(answer(wire))
    with pytest.raises(UpstreamConnectionError):
        response = await get(client, server.url())
        try:
            await response.read()
        finally:
            response.release()
    assert client.idle_connections() == 0


async def test_a_switching_protocols_answer_is_a_connection_error(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    server = await serve(answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"))
    with pytest.raises(UpstreamConnectionError):
        await get(client, server.url(), seconds=2)
    assert client.idle_connections() == 0


# --- 10. content encodings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress)],
)
async def test_a_compressed_body_is_decoded(
    serve: Callable[[Handler], Awaitable[RawServer]],
    client: UpstreamClient,
    encoding: str,
    compress: Callable[[bytes], bytes],
) -> None:
    plain = b'{"text": "' + b"compressible " * 5000 + b'"}'
    server = await serve(answer(ok(compress(plain), f"Content-Encoding: {encoding}\r\n".encode())))
    assert await fetch(client, server.url()) == (200, plain)
    assert client.idle_connections() == 1


async def test_a_chunked_gzip_stream_is_decoded_as_it_arrives(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    compressor = zlib.compressobj(wbits=31)
    first = compressor.compress(b"data: one\n\n") + compressor.flush(zlib.Z_SYNC_FLUSH)
    second = compressor.compress(b"data: two\n\n") + compressor.flush()
    proceed = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        await conn.send(b"%x\r\n%s\r\n" % (len(first), first))
        await proceed.wait()
        await conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second))

    server = await serve(handler)
    response = await get(client, server.url())
    chunks = response.iter_chunks()
    assert await asyncio.wait_for(anext(chunks), 2) == b"data: one\n\n"
    proceed.set()
    assert b"".join([chunk async for chunk in chunks]) == b"data: two\n\n"
    response.release()


async def test_an_unsupported_or_corrupt_encoding_is_a_connection_error(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if conn.index == 0:
            await conn.send(ok(b"\x1b\x00\x00", b"Content-Encoding: br\r\n"))
        else:
            await conn.send(
                b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 15\r\n\r\n"
            )
            await asyncio.sleep(0.05)  # the head is handed over before the body fails
            await conn.send(b"not gzip at all")
        await conn.until_client_closes()

    server = await serve(handler)
    with pytest.raises(UpstreamConnectionError, match="content-encoding 'br'"):
        await get(client, server.url())
    response = await get(client, server.url())
    with pytest.raises(UpstreamConnectionError, match="undecodable"):
        await response.read()
    response.release()
    assert client.idle_connections() == 0
    assert server.connections == 2


# --- 11. informational responses ------------------------------------------------------------


async def test_informational_responses_are_skipped(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    server = await serve(
        answer(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nX-Real: 1\r\nContent-Length: 4\r\n\r\nreal",
            ok(b"again"),
        )
    )
    response = await get(client, server.url())
    assert response.status == 200
    assert response.headers == [("X-Real", "1"), ("Content-Length", "4")]
    assert await response.read() == b"real"
    response.release()
    assert client.idle_connections() == 1
    assert await fetch(client, server.url()) == (200, b"again")
    assert server.connections == 1


async def test_an_informational_response_arriving_alone_first(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0.05)
        await conn.send(ok(b"late", b"X-B: 2\r\n"))

    server = await serve(handler)
    response = await get(client, server.url())
    assert (response.status, response.headers) == (200, [("X-B", "2"), ("Content-Length", "4")])
    assert await response.read() == b"late"
    response.release()


# --- 12. refused input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Evil": "a\r\nX-Injected: 1"},
        {"X-Evil": "a\nb"},
        {"X-Evil": "a\rb"},
        {"X-Evil": "a\0b"},
        {"X-Evil\r\nX-Injected": "1"},
    ],
)
async def test_cr_lf_or_nul_in_a_header_is_refused_before_sending(
    serve: Callable[[Handler], Awaitable[RawServer]],
    client: UpstreamClient,
    headers: dict[str, str],
) -> None:
    server = await serve(answer(ok()))
    with pytest.raises(UpstreamRequestInvalid, match="CR, LF or NUL"):
        await client.request(
            "GET", server.url(), headers, b"", connect_timeout_s=CONNECT_S, deadline=deadline()
        )
    await asyncio.sleep(0.05)
    assert server.connections == 0


@pytest.mark.parametrize("url", ["ftp://x/y", "http:///nohost", "not a url", "file:///etc/passwd"])
async def test_a_url_that_is_not_http_is_refused(client: UpstreamClient, url: str) -> None:
    with pytest.raises(UpstreamRequestInvalid, match="not an http"):
        await get(client, url)


# --- 14. HEAD ----------------------------------------------------------------------------


async def test_head_returns_at_once_and_is_not_pooled(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        await conn.until_client_closes()

    server = await serve(handler)
    response = await asyncio.wait_for(get(client, server.url(), method="HEAD"), 2)
    assert response.status == 200
    assert response.headers == [("Content-Length", "1234")]
    assert await asyncio.wait_for(response.read(), 1) == b""
    assert response.finished
    response.release()
    assert client.idle_connections() == 0
    await server.wait_client_closed(0)
    assert server.requests[0][1].startswith(b"HEAD / HTTP/1.1\r\n")
    assert b"Content-Length" not in server.requests[0][1]


# --- 15. flow control ----------------------------------------------------------------------


async def test_a_large_chunked_body_streams_through_back_pressure(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    assert len(payload) > 4 * READ_HIGH_WATER_BYTES

    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for start in range(0, len(payload), 64 * 1024):
                piece = payload[start : start + 64 * 1024]
                await conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            await conn.send(b"0\r\n\r\n")

    server = await serve(handler)
    response = await get(client, server.url())
    await asyncio.sleep(0.1)  # let the unread body pile up past the high-water mark
    received = bytearray()
    count = 0
    async for chunk in response.iter_chunks():
        received += chunk
        count += 1
    assert bytes(received) == payload
    assert count > 1
    assert response.finished
    response.release()
    assert client.idle_connections() == 1


async def test_a_large_body_can_be_read_whole(
    serve: Callable[[Handler], Awaitable[RawServer]], client: UpstreamClient
) -> None:
    """``read()`` of a body above READ_HIGH_WATER_BYTES (the relay's buffered path)."""
    payload = os.urandom(2 * 1024 * 1024)
    server = await serve(answer(ok(payload)))
    response = await get(client, server.url(), seconds=2)
    try:
        assert await response.read() == payload
    finally:
        response.release()
    assert client.idle_connections() == 1


# --- the pool ------------------------------------------------------------------------------


async def test_an_idle_connection_past_the_idle_timeout_is_replaced(
    serve: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(ok())
        await conn.until_client_closes()

    server = await serve(handler)
    short = UpstreamClient(idle_timeout_s=0.05)
    try:
        assert await fetch(short, server.url()) == (200, b"ok")
        assert short.idle_connections() == 1
        await asyncio.sleep(0.1)
        assert await fetch(short, server.url()) == (200, b"ok")
        assert server.connections == 2
        await server.wait_client_closed(0)
        assert short.idle_connections() == 1
    finally:
        await short.close()
    await server.wait_client_closed(1)


async def test_the_pool_keeps_at_most_max_idle_per_origin(
    serve: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(ok(b"c%d" % conn.index))
        conn.server.closed_by_client.append(conn.index)
        conn.server.client_closed.set()

    server = await serve(handler)
    small = UpstreamClient(max_idle_per_origin=1)
    try:
        first, second = await asyncio.gather(get(small, server.url()), get(small, server.url()))
        assert {await first.read(), await second.read()} == {b"c0", b"c1"}
        first.release()
        second.release()
        assert small.idle_connections() == 1
        assert server.connections == 2
        async with asyncio.timeout(2):
            while not server.closed_by_client:
                server.client_closed.clear()
                await server.client_closed.wait()
        assert len(server.closed_by_client) == 1
    finally:
        await small.close()


async def test_close_empties_the_pool_and_later_releases_close(
    serve: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(ok())
        conn.server.closed_by_client.append(conn.index)
        conn.server.client_closed.set()

    server = await serve(handler)
    closing = UpstreamClient()
    assert await fetch(closing, server.url()) == (200, b"ok")
    in_flight = await get(closing, server.url())  # reuses connection 0
    second = await get(closing, server.url())  # opens connection 1
    assert await in_flight.read() == b"ok"
    in_flight.release()
    assert closing.idle_connections() == 1
    await closing.close()
    assert closing.idle_connections() == 0
    await server.wait_client_closed(0)
    assert await second.read() == b"ok"
    second.release()  # after close(): closed, not pooled
    assert closing.idle_connections() == 0
    await server.wait_client_closed(1)


# --- 16. TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "c.pem", directory / "k.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def https_url(certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=f"secure {request.path}", headers={"X-Tls": "yes"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_https_with_a_trusted_certificate(
    https_url: str, certificate: tuple[Path, Path]
) -> None:
    trusting = UpstreamClient(ssl_context=ssl.create_default_context(cafile=str(certificate[0])))
    try:
        for _ in range(2):
            response = await get(trusting, https_url + "/v1/ping")
            assert response.status == 200
            assert ("X-Tls", "yes") in response.headers
            assert await response.read() == b"secure /v1/ping"
            response.release()
            assert trusting.idle_connections() == 1
    finally:
        await trusting.close()
        await asyncio.sleep(0.05)  # let the TLS transport finish closing


async def test_https_with_an_untrusted_certificate_is_unreachable(
    https_url: str, client: UpstreamClient
) -> None:
    with pytest.raises(UpstreamUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        await get(client, https_url + "/v1/ping")
    assert client.idle_connections() == 0
