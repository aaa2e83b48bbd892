"""Running the gateway: one process, or ``--workers N`` processes sharing the port."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import tempfile

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .app import create_app
from .config_reload import NoConfigFile, reload_config
from .live_config import ConfigFile
from .services import SERVICES
from .settings import ConfigError, ServerSettings, Settings
from .storage.eviction_guard import check_before_serving
from .storage.location import storage_location

log = logging.getLogger("ratelimit_gw")


class _RedactMalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending bytes, and those may be a
    credential header: keep the peer and the kind of error, drop the bytes and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed HTTP request from %s (%s)"
            record.args = (peer, type(exc).__name__)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


# The low-level HTTP server's own log (parse errors, unhandled exceptions).
_server_log = logging.getLogger("ratelimit_gw.http")
_server_log.addFilter(_RedactMalformedRequests())


def make_runner(app: web.Application, server: ServerSettings | None = None) -> web.AppRunner:
    """The runner for ``app`` with the ``[server]`` settings (defaults if none are given)."""
    server = server or ServerSettings()
    # handler_cancellation: a client that hangs up cancels its handler, and with it the
    # upstream call; the handler's finally-block still hands the request to settlement.
    # keepalive_timeout: aiohttp's own default keeps an idle connection for an hour.
    return web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        logger=_server_log,
        shutdown_timeout=server.shutdown_timeout_s,
        keepalive_timeout=server.keepalive_timeout_s,
    )


async def drain(runner: web.AppRunner, timeout_s: float) -> None:
    """The graceful part of a shutdown; ``runner.cleanup()`` follows it.

    Not ready any more (``/readyz`` 503), the listener closed (new connections are refused:
    safe for a load balancer to retry elsewhere, as nothing was sent), idle keep-alive
    connections closed and busy ones closed after their answer; in-flight requests and
    streams run on for up to ``timeout_s``, then the rest are cancelled, and each settles in
    its handler's finally-block with the usage relayed so far. The cleanup then drains the
    settler.

    aiohttp's own ``shutdown_timeout`` waits up to twice the timeout and cancels late
    handlers without waiting for them, so their settlements could start after storage is
    closed: hence this step.
    """
    svc = runner.app[SERVICES]
    svc.draining = True
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()
    pending = set(svc.inflight)
    if pending:
        log.info("draining %d in-flight request(s) for up to %gs", len(pending), timeout_s)
        _, pending = await asyncio.wait(pending, timeout=timeout_s)
    if pending:
        log.warning(
            "cutting %d request(s) still running after %gs; each is settled with its usage so far",
            len(pending),
            timeout_s,
        )
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=5.0)


def configure_logging() -> None:
    """Text lines for the gateway's own logs; the access log as bare JSON lines on stderr,
    one per request, so a log shipper can parse each line whole."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    access = logging.getLogger("ratelimit_gw.access")
    if not access.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.propagate = False


def install_fast_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def reload_on_signal(app: web.Application) -> None:
    """SIGHUP: the config file again (config_reload.py logs and counts either outcome)."""
    try:
        reload_config(app[SERVICES])
    except NoConfigFile:
        log.warning("SIGHUP: this gateway was started without a config file; nothing to reload")
    except ConfigError:
        pass  # logged at ERROR with the field path and counted; the running config is kept


async def serve_forever(
    settings: Settings,
    *,
    reuse_port: bool = False,
    passthrough: bool = False,
    config_file: ConfigFile | None = None,
    pool_parent_pid: int | None = None,
) -> None:
    app = create_app(settings, passthrough=passthrough, config_file=config_file)
    runner = make_runner(app, settings.server)
    await runner.setup()
    app[SERVICES].pool_parent_pid = pool_parent_pid  # the services exist once set up
    # Everything loaded so far (modules, config, the app) lives as long as the process:
    # keep it out of the cyclic collector's full passes, which otherwise grow with it.
    gc.freeze()
    site = web.TCPSite(runner, settings.server.host, settings.server.port, reuse_port=reuse_port)
    await site.start()
    log.info(
        "listening on http://%s:%s (storage %s, pid %s)%s",
        settings.server.host,
        runner.addresses[0][1],
        storage_location(settings.storage.url),  # never its password
        os.getpid(),
        " PASSTHROUGH: no keys, limits or balance (benchmark baseline)" if passthrough else "",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_on_signal, app)
    try:
        await stop.wait()
        await drain(runner, settings.server.shutdown_timeout_s)
    finally:
        # Closes what is left, runs the app's cleanup: settlements drain, storage closes.
        await runner.cleanup()


def _worker(settings: Settings, passthrough: bool, config_file: ConfigFile | None) -> None:
    configure_logging()
    install_fast_loop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve_forever(
                settings,
                reuse_port=True,
                passthrough=passthrough,
                config_file=config_file,
                pool_parent_pid=os.getppid(),
            )
        )


def serve_workers(
    settings: Settings,
    workers: int,
    *,
    passthrough: bool = False,
    config_file: ConfigFile | None = None,
) -> None:
    """Run ``workers`` processes on one port (SO_REUSEPORT: the kernel spreads connections).

    Metrics switch to prometheus_client's multiprocess mode, so ``/metrics`` of any worker
    reports the sum over all of them. SIGTERM, SIGINT and SIGHUP (reload) to this process reach
    every worker.
    """
    # SIGHUP's default action ends a process: ignored until a reload handles it (the loop's
    # handler, or forward() below). Workers inherit the ignoring until their loop takes over.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if workers == 1:
        install_fast_loop()
        asyncio.run(serve_forever(settings, passthrough=passthrough, config_file=config_file))
        return
    if settings.server.port == 0:
        raise SystemExit("--workers needs a fixed --port: each worker binds the same one")
    # (The benchmark's pass-through never touches storage, so memory:// is fine there.)
    if settings.storage.url.startswith("memory://") and not passthrough:
        raise SystemExit("--workers needs shared storage (redis://…): memory:// is per process")
    # Each worker checks again as it starts; a refusal here is one message and a failed command.
    asyncio.run(check_before_serving(settings.storage))
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.TemporaryDirectory(prefix="rlgw-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir.name
    from prometheus_client import multiprocess

    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(
            target=_worker, args=(settings, passthrough, config_file), name=f"worker-{i}"
        )
        for i in range(workers)
    ]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    try:
        for child in children:
            child.join()
            if child.pid is not None:
                multiprocess.mark_process_dead(child.pid)  # type: ignore[no-untyped-call]
    finally:
        if own_dir is not None:
            own_dir.cleanup()
