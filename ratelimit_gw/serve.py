"""Running the gateway: the aiohttp runner settings every entry point shares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from .app import create_app
from .settings import Settings


def make_runner(app: web.Application) -> web.AppRunner:
    # handler_cancellation: a client that hangs up cancels its handler, and with it the
    # upstream call; the handler's finally-block still hands the request to settlement.
    return web.AppRunner(app, handler_cancellation=True, access_log=None)


def install_fast_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_forever(settings: Settings) -> None:
    runner = make_runner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    await site.start()
    logging.getLogger("ratelimit_gw").info(
        "listening on http://%s:%s (storage %s)",
        settings.server.host,
        runner.addresses[0][1],
        settings.storage.url.split("@")[-1],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        # Closes the listener, lets in-flight requests finish, then drains settlements.
        await runner.cleanup()
