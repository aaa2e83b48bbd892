"""A loopback TCP proxy in front of a redis-server that can hold back Redis's replies.

Commands pass through at once, so Redis runs them; while the proxy is stalled, the replies
wait in it (and are lost if their connection closes). That is a reply arriving after its
caller gave up, made deterministic: the command ran, its caller saw a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib


class ReplyStallingProxy:
    def __init__(self, redis_port: int) -> None:
        self._redis_port = redis_port
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stall(self) -> None:
        """Hold every reply from now on, on every connection (new ones included)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        redis_in, redis_out = await asyncio.open_connection("127.0.0.1", self._redis_port)
        pumps = {
            asyncio.ensure_future(self._pump(client_in, redis_out, held=False)),
            asyncio.ensure_future(self._pump(redis_in, client_out, held=True)),
        }
        self._pumps |= pumps
        try:
            # Either side closing ends the pair: a held reply dies with its connection.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps -= pumps
            for writer in (client_out, redis_out):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, held: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if held:
                    await self._flowing.wait()
                sink.write(data)
                await sink.drain()
