"""The gateway's HTTP/1.1 client for upstream calls: pooled keep-alive connections, llhttp parsing.

Why not aiohttp's ``ClientSession``: in the gateway's profile it was the largest single cost,
about a fifth of a worker at saturation, spent on machinery the relay never uses (a cookie
jar, URL objects, tracing hooks, payload writers, a timer per read). This client does only
what the relay needs: write one request on a pooled connection, hand back the status and
headers, then the body whole or piece by piece as it arrives.

What it guarantees:

* One deadline per request (``deadline``, loop time) covers connecting, the response head and
  the whole body; when it passes, the waiting read raises :class:`TimeoutError` and the
  connection is closed. Connecting also has its own, shorter, limit.
* A connection returns to the pool only after a complete response that allows keep-alive;
  anything else (an error, a cancelled read, a body not read to the end) closes it.
* A pooled connection that the server had already closed is retried once on a new connection,
  and only if not one byte of the response had arrived (the server never saw the request).
* The gateway never asks for compression; a body compressed anyway with gzip or deflate is
  decoded, any other encoding is an :class:`UpstreamConnectionError`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, urlsplit

import httptools

from .errors import connect_failure_reason

# Reading stops (TCP back-pressure reaches the upstream) while this much body waits unread.
READ_HIGH_WATER_BYTES = 256 * 1024
IDLE_TIMEOUT_S = 15.0  # below common server keep-alive limits, so the server rarely closes first
MAX_IDLE_PER_ORIGIN = 256
_ENCODED_OK = "!#$%&'()*+,/:;=?@[]~"  # kept as they are in a request target; "%" keeps escapes
_NO_BODY_STATUSES = (204, 304)


class UpstreamError(Exception):
    """The upstream call failed below HTTP: see the two subclasses."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be made (name lookup, refused, TLS handshake or verification)."""


class UpstreamConnectionError(UpstreamError):
    """Connected, but the connection failed or the answer was not valid HTTP/1.1."""


class UpstreamRequestInvalid(UpstreamError, ValueError):
    """The request could not be written: not an http(s) URL, or CR/LF/NUL in a header.
    Raised before anything is sent; only a configuration can cause it (aiohttp's server
    refuses such bytes from clients)."""


class _ExtraResponse(Exception):
    """Raised inside llhttp to stop it at a second response to one request."""


@dataclass(frozen=True, slots=True)
class _Target:
    origin: tuple[str, int, bool]  # host, port, TLS: the pool key
    host_header: str
    request_target: str  # path and query, percent-encoded


@lru_cache(maxsize=4096)
def _parse_url(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamRequestInvalid(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == (443 if tls else 80) else f"{shown}:{port}"
    target = quote(parts.path or "/", safe=_ENCODED_OK)
    if parts.query:
        target += "?" + quote(parts.query, safe=_ENCODED_OK)
    return _Target((host, port, tls), host_header, target)


def _request_head(method: str, target: _Target, headers: Mapping[str, str], body: bytes) -> bytes:
    lines = [f"{method} {target.request_target} HTTP/1.1", f"Host: {target.host_header}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    text = "\r\n".join(lines)
    breaks = len(lines) - 1
    if text.count("\r") != breaks or text.count("\n") != breaks or "\0" in text:
        # aiohttp's server never passes CR/LF in a value, but a config value could carry one.
        raise UpstreamRequestInvalid("a request header name or value contains CR, LF or NUL")
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")


class _Connection(asyncio.Protocol):
    """One upstream connection, carrying one request at a time; llhttp calls back into it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.in_flight = False
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.headers_done = False
        self.complete = False
        self.received_any = False
        self.error: BaseException | None = None
        self.body: deque[bytes] = deque()
        self.body_bytes = 0
        self._informational = False
        self._until_eof = False
        self._decoder: zlib._Decompress | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._paused = False
        self._head_only = False
        self._keep_alive = False

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:
            self.close()  # bytes nobody asked for: the connection can't be trusted again
            return
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamConnectionError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback below raised; that is the better message.
            cause = exc.__context__
            if isinstance(cause, _ExtraResponse):
                self.close()  # the answer asked for is intact; the connection is not reused
            elif isinstance(cause, UpstreamError):
                self._fail(cause)
            else:
                self._fail(UpstreamConnectionError(f"malformed upstream response ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.in_flight and not self.complete:
            if self._until_eof and self.headers_done and exc is None:
                self._complete()  # a body without a length ends where the connection does
            else:
                self._fail(UpstreamConnectionError("the upstream closed the connection"))
        self._wake()

    # --- llhttp callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second response to one request (a smuggling attempt, a confused server):
            # parse none of it, and never trust this connection's framing again.
            raise _ExtraResponse

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp decodes them: text for ASCII, and any other byte kept (surrogateescape).
        self.headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True  # 100 Continue, 103 Early Hints: the answer follows
            self.headers = []
            return
        self.status = status
        lengths = chunked = False
        for name, value in self.headers:
            lower = name.lower()
            if lower == "content-length":
                lengths = True
            elif lower == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif lower == "content-encoding":
                self._decoder = _decoder_for(value)
        self._until_eof = not (lengths or chunked or status in _NO_BODY_STATUSES)
        # llhttp's answer is only valid here: it resets once the message is complete.
        self._keep_alive = self._parser.should_keep_alive()
        self.headers_done = True
        if self._head_only:
            # llhttp can't be told the request was HEAD: end here, and never reuse the
            # connection (finish() closes a connection marked as read until EOF).
            self._until_eof = True
            self._complete()
            return
        self._wake()

    def on_body(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error as exc:
                raise UpstreamConnectionError(f"undecodable compressed body ({exc})") from None
            if not data:
                return
        self.body.append(data)
        self.body_bytes += len(data)
        if self.body_bytes > READ_HIGH_WATER_BYTES and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete()

    def _complete(self) -> None:
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self.body.append(rest)
                self.body_bytes += len(rest)
        self.complete = True
        self._wake()

    # --- used by the client and the response ------------------------------------------------

    def start(self, head: bytes, body: bytes, deadline: float, *, head_only: bool) -> None:
        assert self.transport is not None
        self._reset()
        self.in_flight = True
        self._head_only = head_only
        self._deadline = self._loop.call_at(deadline, self._deadline_passed)
        if len(body) < 65536:
            self.transport.write(head + body)  # one send for the usual small request
        else:
            self.transport.write(head)  # no copy of a large body just to join it
            self.transport.write(body)

    def take_body(self) -> bytes:
        data = b"".join(self.body)  # one piece comes back as itself, uncopied
        self.body.clear()
        self.body_bytes = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def wait(self) -> None:
        """Until the parser has more to hand over, the message ends, or an error."""
        if self.error is not None:
            raise self.error
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    def finish(self) -> bool:
        """Request over: True if the connection may carry another one."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        reusable = (
            self.complete
            and self.error is None
            and not self.closed
            and not self._until_eof
            and self._keep_alive
        )
        self.in_flight = False
        if not reusable:
            self.close()
        return reusable

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _deadline_passed(self) -> None:
        self._deadline = None
        self._fail(TimeoutError("the upstream did not answer within the deadline"))

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _decoder_for(encoding: str) -> zlib._Decompress | None:
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return None
    if name in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or zlib header, told apart
    raise UpstreamConnectionError(f"the upstream sent an unsupported content-encoding {name!r}")


class UpstreamResponse:
    """Status and headers of an answer whose body is still to be read; ``release`` when done."""

    __slots__ = ("_client", "_conn", "_origin", "_released", "headers", "status")

    def __init__(self, conn: _Connection, client: UpstreamClient, origin: tuple[str, int, bool]):
        self._conn = conn
        self._client = client
        self._origin = origin
        self.status = conn.status
        self.headers = conn.headers
        self._released = False

    async def read(self) -> bytes:
        conn = self._conn
        parts = []
        while not conn.complete:
            if conn.body:
                parts.append(conn.take_body())  # taking it lets a paused connection read on
            await conn.wait()
        parts.append(conn.take_body())
        return b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever is buffered when the reader gets to it."""
        conn = self._conn
        while True:
            if conn.body:
                yield conn.take_body()
            elif conn.complete:
                return
            else:
                await conn.wait()

    @property
    def body_buffered(self) -> bool:
        """Body bytes have arrived and wait to be read."""
        return bool(self._conn.body)

    @property
    def finished(self) -> bool:
        """The whole body has arrived and been read."""
        return self._conn.complete and not self._conn.body

    def release(self) -> None:
        """Give the connection back to the pool, or close it if it can't carry another call."""
        if self._released:
            return
        self._released = True
        if self._conn.finish():
            self._client._give_back(self._origin, self._conn)


class UpstreamClient:
    """A pool of keep-alive connections per origin; one per gateway process."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_idle_per_origin: int = MAX_IDLE_PER_ORIGIN,
    ) -> None:
        # The system's trust store (SSL_CERT_FILE / SSL_CERT_DIR are honoured by OpenSSL).
        self._ssl = ssl_context or ssl.create_default_context()
        self._idle_timeout_s = idle_timeout_s
        self._max_idle = max_idle_per_origin
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        connect_timeout_s: float,
        deadline: float,
    ) -> UpstreamResponse:
        """Send one request and wait for the response head (``deadline`` is loop time)."""
        target = _parse_url(url)
        head = _request_head(method, target, headers, body)
        loop = asyncio.get_running_loop()
        fresh_only = False
        while True:
            conn = None if fresh_only else self._pooled(target.origin)
            if conn is None:
                conn = await self._connect(loop, target.origin, connect_timeout_s, deadline)
            conn.start(head, body, deadline, head_only=method == "HEAD")
            try:
                while not conn.headers_done:
                    await conn.wait()
            except UpstreamConnectionError:
                conn.finish()
                if conn.reused and not conn.received_any and not fresh_only:
                    fresh_only = True  # the server closed an idle connection as we used it
                    continue
                raise
            except BaseException:
                conn.finish()
                raise
            return UpstreamResponse(conn, self, target.origin)

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    def idle_connections(self) -> int:
        return sum(not conn.closed for idle in self._idle.values() for conn in idle)

    def _pooled(self, origin: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if conn.closed or now - conn.idle_since > self._idle_timeout_s:
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    def _give_back(self, origin: tuple[str, int, bool], conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        idle = self._idle.setdefault(origin, [])
        now = time.monotonic()
        # Connections unused for too long sit at the bottom: drop them as new ones arrive.
        while idle and (idle[0].closed or now - idle[0].idle_since > self._idle_timeout_s):
            idle.pop(0).close()
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = now
        idle.append(conn)

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: tuple[str, int, bool],
        connect_timeout_s: float,
        deadline: float,
    ) -> _Connection:
        host, port, tls = origin
        limit = min(connect_timeout_s, deadline - loop.time())
        try:
            async with asyncio.timeout(max(limit, 0)):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    host,
                    port,
                    ssl=self._ssl if tls else None,
                    server_hostname=host if tls else None,
                )
        except TimeoutError:
            raise  # an OSError too, but a slow upstream is a timeout (504), not unreachable
        except ssl.SSLError as exc:  # the handshake or the certificate's verification
            raise UpstreamUnreachable(f"TLS: {exc}") from None
        except OSError as exc:  # refused, unreachable, name lookup
            raise UpstreamUnreachable(connect_failure_reason(exc)) from None
        return conn
