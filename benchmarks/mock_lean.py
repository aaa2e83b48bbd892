"""The benchmark's upstream: the mock's chat completions on a bare asyncio protocol.

In the benchmark the upstream stands in for a provider that, deployed, runs on another
machine. On the bench's two cores it does not: every microsecond it spends is taken from
the gateway being measured, and more from the gateway with full checks (which, with Redis,
needs both cores) than from the pass-through (which needs one). The aiohttp mock
(:mod:`ratelimit_gw.testing.mock_upstream`) spends ~45 µs of CPU per request, mostly in aiohttp's
server machinery. This server does only what the benchmark sends, ``POST
/v1/chat/completions``, plain or streamed, and answers with the bytes of the same
:mod:`ratelimit_gw.testing.mock_wire` builders, so usage and text are exactly the aiohttp mock's.

Left out: the request log, ``x-mock-*`` controls, latency, other routes and protocols (404),
and flow control. Tests, the demo and anything that needs those use the aiohttp mock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import time
from typing import Any

import httptools
import msgspec

from ratelimit_gw.serve import install_fast_loop
from ratelimit_gw.testing import mock_wire as wire
from ratelimit_gw.testing.mock_upstream import MockSettings

CHAT_PATH = b"/v1/chat/completions"
_SERVER = b"Server: ratelimit-gw-mock-lean\r\n"


def _head(status: bytes, content_type: bytes, length: int | None) -> bytes:
    framing = (
        b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
    )
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\n"
        + framing
        + _SERVER
        + b"\r\n"
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Responder:
    """Turns one request (path, body) into the writes of its response."""

    def __init__(self, settings: MockSettings) -> None:
        self._settings = settings
        self._seq = itertools.count(1)

    def respond(self, method: bytes, path: bytes, raw: bytes) -> list[bytes]:
        if method != b"POST" or path.split(b"?", 1)[0] != CHAT_PATH:
            return self._error(404, "the lean mock serves only POST /v1/chat/completions")
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return self._error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object")
        model = body.get("model")
        reply = wire.plan_reply(
            seq=next(self._seq),
            model=model if isinstance(model, str) else "mock-model",
            created_s=int(time.time()),
            input_tokens=wire.count_input_tokens(body),
            chunks=self._settings.chunks,
            tokens_per_chunk=self._settings.tokens_per_chunk,
            cap_tokens=_cap(body),
            ignore_cap=False,
        )
        if body.get("stream") is not True:
            data = wire.chat_completion(reply)
            return [_head(b"200 OK", b"application/json", len(data)) + data]
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        frames = wire.chat_stream(reply, include_usage)
        # One write per frame, as the aiohttp mock does: the relay sees the stream arrive
        # in pieces, as it would from a provider.
        head = _head(b"200 OK", b"text/event-stream", None)
        return [
            head + _chunk(frames.head),
            *(_chunk(frame) for frame in frames.chunks),
            _chunk(frames.tail) + b"0\r\n\r\n",
        ]

    @staticmethod
    def _error(status: int, message: str) -> list[bytes]:
        data = wire.error_body("openai", status, message)
        reason = b"Not Found" if status == 404 else b"Bad Request"
        return [_head(b"%d %s" % (status, reason), b"application/json", len(data)) + data]


def _cap(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class _Connection(asyncio.Protocol):
    """One client connection: llhttp parses, each complete request is answered at once."""

    def __init__(self, responder: _Responder) -> None:
        self._responder = responder
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_message_begin(self) -> None:
        self._url = b""
        self._body.clear()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        writes = self._responder.respond(self._parser.get_method(), self._url, b"".join(self._body))
        for data in writes:
            transport.write(data)
        if not self._parser.should_keep_alive():
            transport.close()


async def serve_lean(host: str, port: int, settings: MockSettings | None = None) -> asyncio.Server:
    """Start serving in the running loop; ``port`` 0 picks a free one."""
    responder = _Responder(settings or MockSettings())
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(responder), host, port)


def run_lean(host: str, port: int, settings: MockSettings | None = None) -> None:
    """Serve until interrupted (the caller has installed uvloop where available)."""

    async def main() -> None:
        server = await serve_lean(host, port, settings)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.mock_lean``: it has no latency, request log or other routes,
    so it takes no flags for them (the full mock, ``ratelimit-gw mock-upstream``, does)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mock_lean", description=(__doc__ or "").split("\n\n", 1)[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--tokens-per-chunk", type=int, default=5)
    args = parser.parse_args(argv)
    install_fast_loop()
    settings = MockSettings(
        chunks=args.chunks, tokens_per_chunk=args.tokens_per_chunk, record_requests=False
    )
    run_lean(args.host, args.port, settings)


if __name__ == "__main__":
    main()
