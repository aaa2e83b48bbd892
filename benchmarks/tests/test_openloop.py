"""The C open-loop generator: schedule, latency modes, error counting and HTTP/1.1 parsing.

Correctness runs against the real mock upstream (a separate process, as in the benchmark)
and against tiny raw asyncio servers that misbehave on purpose: closing after every
response, dribbling responses byte by byte, chunked bodies with extensions and trailers,
interim 100 responses, never answering. The generator runs in a thread (it blocks), so the
in-process servers keep serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from benchmarks import openloop
from benchmarks.local_redis import free_port, wait_for_port

# Compiles the C generator and runs it (and, for some tests, the mock) as subprocesses: all
# but two tests here, 25-30 s in all.
pytestmark = pytest.mark.slow

# No skip without a compiler: `make test` installs one (the C generator is the benchmark's).
ROOT = Path(__file__).resolve().parent.parent
PATH = "/v1/chat/completions"
KEYS = ["key-a", "key-b", "key-c", "key-d"]
PLAIN = json.dumps(
    {"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
).encode()
STREAM = json.dumps(
    {
        "model": "gpt-4o-mini",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
).encode()


def p(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_async(port: int, **kwargs: Any) -> openloop.OpenLoopResult:
    args: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "path": PATH,
        "body": PLAIN,
        "keys": KEYS,
        "rate": 100.0,
        "duration_s": 1.0,
        "ttfb": False,
        **kwargs,
    }
    return await asyncio.to_thread(openloop.run, **args)


# --- the mock upstream, as a process ---------------------------------------------------------


@pytest.fixture(scope="module")
def mock_port() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "ratelimit_gw", "mock-upstream"),
            *("--port", str(port), "--no-request-log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_port(port, 20), "mock upstream did not start"
        yield port
    finally:
        process.terminate()
        process.wait(10)


async def test_fixed_rate_against_the_mock_keeps_its_schedule(mock_port: int) -> None:
    result = await run_async(mock_port, rate=200.0, duration_s=1.0)
    assert (result.sent, result.done, result.errors) == (200, 200, 0)
    assert len(result.latencies_ms) == 200 and len(result.lateness_ms) == 200
    assert result.latencies_ms == sorted(result.latencies_ms)
    assert result.lateness_ms == sorted(result.lateness_ms)
    assert all(v > 0 for v in result.latencies_ms)
    assert p(result.lateness_ms, 0.99) < 50  # loose: CI machines are loaded


async def test_ttfb_is_the_first_chunk_not_the_whole_stream(mock_port: int) -> None:
    # The mock writes the first text chunk at once and sleeps 20 ms before each of the other
    # three: a whole response takes >= 60 ms, its first body bytes arrive long before.
    slow = {"x-mock-chunk-delay-ms": "20"}
    common: dict[str, Any] = {"body": STREAM, "rate": 50.0, "duration_s": 1.0, "headers": slow}
    ttfb = await run_async(mock_port, ttfb=True, **common)
    full = await run_async(mock_port, ttfb=False, **common)
    for result in (ttfb, full):
        assert (result.done, result.errors) == (50, 0)
    assert min(full.latencies_ms) >= 55  # asyncio may wake a hair early
    assert all(t < f for t, f in zip(ttfb.latencies_ms, full.latencies_ms, strict=True))
    assert p(ttfb.latencies_ms, 0.5) < p(full.latencies_ms, 0.5) - 30


@pytest.mark.parametrize("status", [500, 401])
async def test_error_statuses_are_errors(mock_port: int, status: int) -> None:
    result = await run_async(
        mock_port, rate=100.0, duration_s=0.5, headers={"x-mock-error": str(status)}
    )
    assert (result.sent, result.done, result.errors) == (50, 50, 50)
    assert int(result.detail["status_errors"]) == 50
    assert len(result.latencies_ms) == 50  # complete responses, whatever their status


async def test_latency_counts_queueing_when_connections_run_out(mock_port: int) -> None:
    # 2 connections, 100 ms per response, 50 rps offered: the generator falls behind and
    # the queueing shows in the latencies (no coordinated omission), never more connections.
    result = await run_async(
        mock_port,
        rate=50.0,
        duration_s=0.4,
        connections=2,
        max_connections=2,
        headers={"x-mock-latency-ms": "100"},
    )
    assert (result.done, result.errors) == (20, 0)
    assert int(result.detail["peak_connections"]) == 2
    # Request 19 is scheduled at 380 ms and cannot finish before 10 x 100 ms.
    assert max(result.latencies_ms) >= 550
    assert max(result.lateness_ms) >= 400


async def test_cpu_use_at_2000_rps_is_reported(
    mock_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Report (not judge) the generator's own CPU time at 2000 rps for 3 s."""
    result = await run_async(mock_port, rate=2000.0, duration_s=3.0)
    assert result.sent == 6000
    with capsys.disabled():
        print(
            f"\nopenloop 2000 rps x 3 s: cpu {result.cpu_s:.3f} s "
            f"({result.cpu_s / 3 * 100:.1f}% of a core), done {result.done}, "
            f"errors {result.errors}, lateness p50 {p(result.lateness_ms, 0.5):.3f} ms "
            f"p99 {p(result.lateness_ms, 0.99):.3f} ms, latency p50 "
            f"{p(result.latencies_ms, 0.5):.3f} ms p99 {p(result.latencies_ms, 0.99):.3f} ms, "
            f"wait {result.detail['wait']}"
        )


# --- raw servers -----------------------------------------------------------------------------

# respond(writer) writes one response and says whether to keep the connection open.
Respond = Callable[[asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawServer:
    port: int
    authorizations: list[str] = field(default_factory=list)
    connections: int = 0


async def _read_request(reader: asyncio.StreamReader) -> dict[str, str] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return headers


@asynccontextmanager
async def raw_server(respond: Respond) -> AsyncIterator[RawServer]:
    handlers: set[asyncio.Task[None]] = set()
    state = RawServer(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        state.connections += 1
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while (headers := await _read_request(reader)) is not None:
                state.authorizations.append(headers.get("authorization", ""))
                if not await respond(writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await server.wait_closed()
        await asyncio.sleep(0)


@pytest.mark.parametrize("server_closes", [True, False], ids=["closes", "lingers"])
async def test_connection_close_is_heeded(server_closes: bool) -> None:
    # "lingers": the server says "Connection: close" but keeps the socket open and reads no
    # more, so a client that reused the connection would wait for its timeout.
    async def respond(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        if not server_closes:
            await asyncio.sleep(3600)  # cancelled when the server stops
        return False

    async with raw_server(respond) as server:
        result = await run_async(server.port, rate=100.0, duration_s=1.0, timeout_s=2.0)
    assert (result.sent, result.done, result.errors) == (100, 100, 0)
    assert server.connections >= 100
    assert int(result.detail["retries"]) == 0
    assert collections.Counter(server.authorizations) == {f"Bearer {k}": 25 for k in KEYS}


async def test_keep_alive_connections_dropped_by_the_server_are_retried() -> None:
    # No "Connection: close", yet the server closes 20 ms after each response without
    # reading on: a request sent into that window is reset unanswered. It was never
    # handled, so the generator sends it again on another connection: no error.
    async def respond(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.02)
        return False

    async with raw_server(respond) as server:
        result = await run_async(
            server.port, rate=200.0, duration_s=0.5, connections=2, max_connections=4
        )
    assert (result.done, result.errors) == (100, 0)
    assert int(result.detail["retries"]) > 0


def _dribble(response: bytes, delay_s: float = 0.0005) -> Respond:
    async def respond(writer: asyncio.StreamWriter) -> bool:
        for i in range(len(response)):
            writer.write(response[i : i + 1])
            await writer.drain()
            await asyncio.sleep(delay_s)
        return True

    return respond


SSE_DATA = [b"data: ", b"hello!\r\n\r\n"]  # chunk data may hold CRLFs: not lines
CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"TRANSFER-ENCODING: Chunked\r\nX-Note: a: b\r\n\r\n"
    + b"%x;ext=1\r\n%s\r\n" % (len(SSE_DATA[0]), SSE_DATA[0])
    + b'%X ; name="quoted"\r\n%s\r\n' % (len(SSE_DATA[1]), SSE_DATA[1])
    + b"0\r\nX-Trailer: yes\r\nX-Other: 1\r\n\r\n"
)
CONTENT_LENGTH = b"HTTP/1.1 201 Created\r\ncontent-LENGTH: 11\r\nServer: raw\r\n\r\nhello world"
INTERIM_THEN_FINAL = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n"
)


@pytest.mark.parametrize(
    "response",
    [CHUNKED, CONTENT_LENGTH, INTERIM_THEN_FINAL],
    ids=["chunked-extensions-trailers", "content-length", "100-continue"],
)
@pytest.mark.parametrize("dribble", [True, False], ids=["byte-by-byte", "one-write"])
async def test_responses_parse_however_they_arrive(response: bytes, dribble: bool) -> None:
    async def whole(writer: asyncio.StreamWriter) -> bool:
        writer.write(response)
        await writer.drain()
        return True

    async with raw_server(_dribble(response) if dribble else whole) as server:
        # Keep-alive reuse (2 connections for 20 requests) proves each response was framed
        # exactly: a byte too few or too many breaks the next response on that connection.
        result = await run_async(
            server.port, rate=20.0, duration_s=1.0, connections=2, max_connections=2
        )
    assert (result.sent, result.done, result.errors) == (20, 20, 0)
    assert int(result.detail["connects"]) == server.connections == 2
    assert collections.Counter(server.authorizations) == {f"Bearer {k}": 5 for k in KEYS}


async def test_ttfb_on_a_dribbled_chunked_body() -> None:
    # Body bytes start at byte ~90 of ~170, written 2 ms apart: the first chunk's data
    # comes ~160 ms before the end of the response.
    async with raw_server(_dribble(CHUNKED, 0.002)) as server:
        args: dict[str, Any] = {"rate": 5.0, "duration_s": 1.0, "connections": 4}
        ttfb = await run_async(server.port, ttfb=True, **args)
        full = await run_async(server.port, ttfb=False, **args)
    assert ttfb.errors == full.errors == 0
    assert max(ttfb.latencies_ms) < min(full.latencies_ms)


async def test_ttfb_waits_for_body_bytes_not_the_header_block() -> None:
    # The header block at once, the first chunk's data 100 ms later, the end 100 ms later.
    async def respond(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"4\r\nlast\r\n0\r\n\r\n")
        await writer.drain()
        return True

    async with raw_server(respond) as server:
        args: dict[str, Any] = {"rate": 5.0, "duration_s": 1.0, "connections": 4}
        ttfb = await run_async(server.port, ttfb=True, **args)
        full = await run_async(server.port, ttfb=False, **args)
    assert ttfb.errors == full.errors == 0 and ttfb.done == full.done == 5
    assert min(ttfb.latencies_ms) >= 95
    assert min(full.latencies_ms) >= 195
    assert max(ttfb.latencies_ms) < min(full.latencies_ms)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX\r\n0\r\n\r\n",
        b"SPDY/3 200 OK\r\n\r\n",
    ],
    ids=["chunk-size", "content-length", "chunk-end", "status-line"],
)
async def test_garbage_responses_are_errors(response: bytes) -> None:
    async def respond(writer: asyncio.StreamWriter) -> bool:
        writer.write(response)
        await writer.drain()
        return True

    async with raw_server(respond) as server:
        result = await run_async(server.port, rate=20.0, duration_s=0.5)
    assert (result.done, result.errors) == (0, 10)
    assert int(result.detail["protocol_errors"]) == 10


async def test_a_server_that_never_answers_times_out() -> None:
    stop = asyncio.Event()

    async def respond(writer: asyncio.StreamWriter) -> bool:
        await stop.wait()
        return False

    async with raw_server(respond) as server:
        started = time.monotonic()
        result = await run_async(server.port, rate=20.0, duration_s=0.5, timeout_s=0.3)
        elapsed = time.monotonic() - started
        stop.set()
    assert (result.sent, result.done, result.errors) == (10, 0, 10)
    assert int(result.detail["timeouts"]) == 10
    assert elapsed < 5


async def test_a_closed_port_fails_every_request() -> None:
    result = await run_async(free_port(), rate=50.0, duration_s=0.4)
    assert (result.sent, result.done, result.errors) == (0, 0, 20)
    assert int(result.detail["connection_errors"]) == 20


async def test_a_truncated_response_is_an_error() -> None:
    async def respond(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        return False

    async with raw_server(respond) as server:
        result = await run_async(server.port, rate=20.0, duration_s=0.5)
    assert (result.done, result.errors) == (0, 10)


async def test_body_without_framing_ends_at_close() -> None:
    async def respond(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        return False

    async with raw_server(respond) as server:
        result = await run_async(server.port, rate=20.0, duration_s=0.5)
    assert (result.done, result.errors) == (10, 0)


# --- rendering and building ------------------------------------------------------------------


def test_requests_are_rendered_one_per_key() -> None:
    blob = openloop.render_requests("127.0.0.1", 8080, PATH, PLAIN, KEYS, {"X-Extra": "1"})
    requests = blob.split(b"\0")
    assert len(requests) == len(KEYS)
    for key, request in zip(KEYS, requests, strict=True):
        head, _, body = request.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == f"POST {PATH} HTTP/1.1"
        assert f"Authorization: Bearer {key}" in lines
        assert "Host: 127.0.0.1:8080" in lines and "X-Extra: 1" in lines
        assert f"Content-Length: {len(PLAIN)}" in lines and body == PLAIN
    assert b"Authorization" not in openloop.render_requests("::1", 1, "/", b"{}", [])
    with pytest.raises(ValueError):
        openloop.render_requests("h", 1, PATH, b"a\0b", KEYS)
    with pytest.raises(ValueError):
        openloop.render_requests("h", 1, PATH, PLAIN, ["evil\r\nX: 1"])


def test_build_is_cached_by_source_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = openloop.build()
    assert first.parent == tmp_path / "ratelimit-gw"
    mtime = first.stat().st_mtime_ns
    assert openloop.build() == first and first.stat().st_mtime_ns == mtime
    edited = openloop.build(
        (Path(openloop.__file__).parent / "openloop.c").read_bytes() + b"\n/* edit */\n"
    )
    assert edited != first and edited.is_file()
    assert sorted(x.name for x in first.parent.iterdir()) == sorted([first.name, edited.name])


def test_a_failed_build_shows_the_compiler_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(openloop.BuildError, match="no_such_symbol"):
        openloop.build(b"int main(void) { return no_such_symbol; }\n")
    assert list((tmp_path / "ratelimit-gw").iterdir()) == []


def test_cc_from_the_environment_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/bin/cc -O0")
    assert openloop.compiler() is None and not openloop.available()
    with pytest.raises(openloop.BuildError, match="no C compiler"):
        openloop.build()
    monkeypatch.setenv("CC", "cc -pipe")
    compiler = openloop.compiler()
    assert compiler is not None and compiler[1:] == ["-pipe"]
