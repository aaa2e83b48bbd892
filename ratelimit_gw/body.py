"""Request bodies: every route that reads one calls :meth:`BodyReader.read`.

What a read promises:

- the whole body arrives within ``server.body_timeout_s`` of the read starting, or the
  request gets ``408`` ``body_timeout`` and its connection is closed after the answer
  (the rest of a body never read cannot be told from the next request);
- a body is never more than ``server.max_body_bytes`` (``413``, before any byte is read
  when the declared ``Content-Length`` already says so);
- the request bytes all requests of this process hold together never exceed
  ``server.max_buffered_body_bytes``: a body that does not fit gets ``529``
  ``overloaded_error``, reason ``body_buffer_full``, with retry-after. A request holds its
  declared ``Content-Length`` from the start (a body that cannot fit is refused before it is
  sent), else its bytes as they arrive, until the request ends: :meth:`BodyReader.release`,
  which the error middleware calls once for every request.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import Gauge

from .context import RequestContext
from .errors import GatewayError
from .settings import ServerSettings

# How soon a caller refused for a full buffer may retry: bodies come and go with requests.
BUFFER_FULL_RETRY_MS = 1000


class BodyReader:
    """One per process: reads bodies within the server's limits and accounts their bytes."""

    def __init__(self, server: ServerSettings, buffered_gauge: Gauge) -> None:
        self._timeout_s = server.body_timeout_s
        self._max_body_bytes = server.max_body_bytes
        self._max_buffered_bytes = server.max_buffered_body_bytes
        self._gauge = buffered_gauge
        self.buffered_bytes = 0

    async def read(self, request: web.Request, ctx: RequestContext) -> bytes:
        declared = request.content_length
        content = request.content
        if declared is not None:
            if declared > self._max_body_bytes:
                raise web.HTTPRequestEntityTooLarge(self._max_body_bytes, declared)
            self._hold(ctx, declared)
            if content.is_eof():
                # The whole body came with the headers (the usual case): nothing to wait for,
                # so no deadline to arm. A compressed body may have grown past its declaration.
                body = content.read_nowait()
                if len(body) > declared:
                    self._check_size(len(body))
                    self._hold(ctx, len(body))
                return body
        chunks: list[bytes] = []
        received = 0
        try:
            async with asyncio.timeout(self._timeout_s):
                while chunk := await content.readany():
                    received += len(chunk)
                    self._check_size(received)
                    # Beyond the declaration only if the body was compressed (or undeclared).
                    self._hold(ctx, received)
                    chunks.append(chunk)
        except TimeoutError:
            raise GatewayError(
                408,
                "body_timeout",
                f"The request body did not arrive within {self._timeout_s:g} s.",
            ) from None
        return b"".join(chunks)

    def _check_size(self, received_bytes: int) -> None:
        if received_bytes > self._max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(self._max_body_bytes, received_bytes)

    def _hold(self, ctx: RequestContext, total_bytes: int) -> None:
        """Make the request's reservation ``total_bytes``, or refuse it (529)."""
        extra = total_bytes - ctx.body_bytes_reserved
        if extra <= 0:
            return
        if self.buffered_bytes + extra > self._max_buffered_bytes:
            raise GatewayError(
                529,
                "body_buffer_full",
                "The gateway holds too many request bodies at once; retry shortly.",
                retry_after_ms=BUFFER_FULL_RETRY_MS,
            )
        ctx.body_bytes_reserved = total_bytes
        self._change(extra)

    def release(self, ctx: RequestContext) -> None:
        """Give back what the request held (it has ended: its body is no longer referenced)."""
        held = ctx.body_bytes_reserved
        if held:
            ctx.body_bytes_reserved = 0
            self._change(-held)

    def _change(self, delta_bytes: int) -> None:
        self.buffered_bytes += delta_bytes
        self._gauge.inc(delta_bytes)
