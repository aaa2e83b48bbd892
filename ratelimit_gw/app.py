"""create_app(settings): services opened in cleanup contexts, routes, the error middleware."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web
from prometheus_client import CollectorRegistry

from . import admin
from .accounts import AccountStore
from .archive.archiver import Archiver, ArchiveRunner
from .archive.database import ArchiveDatabase
from .archive.lag import follow_lag
from .archive.lease import Lease
from .auth import KeyCache
from .body import BodyReader
from .budget_watch import BudgetWatch
from .client_address import ClientAddresses
from .config_reload import show_config
from .key_changes import KeyChangeFeed
from .limiter import Limiter
from .live_config import ConfigFile, LiveConfig
from .metrics import StorageMetrics, create_metrics
from .middleware import error_middleware
from .protocols import Route
from .relay import Relay
from .routes import models, self_view
from .routes.converter import gemini_converter_action, handle_converter, responses_not_offered
from .routes.custom_endpoints import handle_custom_endpoint
from .routes.native import gemini_model_action, handle_llm
from .routes.probes import healthz, metrics_endpoint, readyz
from .services import SERVICES, Services
from .settings import Settings
from .settler import Settler
from .storage import Storage, open_storage
from .storage.eviction_guard import EvictionGuard
from .upstream_client import UpstreamClient
from .upstream_key_gauges import KeyStateGauges
from .upstream_pool import PoolStore
from .upstream_probe import UpstreamProbe
from .webhook_delivery import WebhookDelivery, WebhookDirectory
from .webhook_events import WebhookEvents
from .webhook_outbox import AccountWebhooks

log = logging.getLogger("ratelimit_gw")
# How long shutdown waits for the background tasks (eviction guard, key-change feed, upstream
# key probe, webhook delivery, archiver) to stop.
WATCHER_STOP_S = 5.0


def create_app(
    settings: Settings,
    storage: Storage | None = None,
    *,
    passthrough: bool = False,
    config_file: ConfigFile | None = None,
) -> web.Application:
    """The gateway application. ``storage`` lets a caller share one already open (tests, demo);
    ``config_file``: the file ``settings`` came from, which a reload reads again (none: no
    reload)."""
    app = web.Application(
        middlewares=[error_middleware], client_max_size=settings.server.max_body_bytes
    )

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        own_storage = storage is None
        store = open_storage(settings.storage) if storage is None else storage
        registry = CollectorRegistry()
        metrics = create_metrics(registry, settings.metrics.account_label)
        store.observer = StorageMetrics(metrics)
        digest = "" if config_file is None else config_file.digest
        eviction = EvictionGuard(store, settings.storage, metrics)
        try:
            await eviction.check_at_startup()  # refuses a Redis that may evict: not listening yet
        except BaseException:
            if own_storage:
                await store.close()
            raise
        upstream = UpstreamClient()
        zone = settings.accounts.default_timezone
        accounts = AccountStore(store, default_timezone=zone)
        limiter = Limiter(store, default_timezone=zone)
        pools = PoolStore(store)

        def current() -> Settings:  # the config as reloaded; called once SERVICES is set
            return app[SERVICES].config.settings

        directory = WebhookDirectory(current, AccountWebhooks(store))
        events = WebhookEvents(
            store, accounts, pools, metrics, directory, lambda: current().webhook_delivery
        )
        budgets = BudgetWatch(store, limiter, metrics, events)
        settler = Settler(limiter, metrics, pools, events, budgets)
        keys = KeyCache(
            accounts,
            settings.storage.key_cache_ttl_s,
            stale_on_error=settings.storage.on_error == "allow",
        )
        app[SERVICES] = Services(
            config=LiveConfig.of(settings, digest),
            storage=store,
            accounts=accounts,
            keys=keys,
            limiter=limiter,
            settler=settler,
            relay=Relay(upstream, metrics),
            metrics=metrics,
            registry=registry,
            pools=pools,
            bodies=BodyReader(settings.server, metrics.buffered_body_bytes),
            client_addresses=ClientAddresses(settings.server.trusted_proxies),
            passthrough=passthrough,
            config_file=config_file,
            archive=None if settings.archive is None else ArchiveDatabase(settings.archive.url),
        )
        show_config(metrics, digest)
        services = app[SERVICES]
        probe = UpstreamProbe(
            lambda: services.config.settings.providers.values(),  # the config as reloaded
            services.pools,
            upstream,
            KeyStateGauges(metrics, services.pools),
        )
        webhooks = WebhookDelivery(current, directory, events, metrics)
        watchers = [
            asyncio.create_task(eviction.watch()),
            asyncio.create_task(keys.follow_changes(KeyChangeFeed(store))),
            asyncio.create_task(probe.run()),
            asyncio.create_task(webhooks.run()),
        ]
        archiver = _archive_runner(services)
        if services.archive is not None and settings.archive is not None:
            watchers.append(
                asyncio.create_task(follow_lag(store, metrics, settings.archive.interval_s))
            )
        if archiver is not None:
            watchers.append(asyncio.create_task(archiver.run()))
        yield
        keys.stop_following()
        probe.stop()
        webhooks.stop()
        if archiver is not None:
            archiver.stop()
        for watcher in watchers:
            watcher.cancel()
        # Bounded: a watcher that ignored its cancellation must not hold the shutdown hostage.
        _, stuck = await asyncio.wait(watchers, timeout=WATCHER_STOP_S)
        for watcher in stuck:
            log.error("background task %s did not stop when cancelled", watcher.get_coro())
        await settler.drain()
        await budgets.drain()  # budget readings (and their events) of the last settlements
        await events.drain()  # balance.low raises the last settlements started
        await upstream.close()
        if services.archive is not None:
            await services.archive.close()
        if own_storage:
            await store.close()

    app.cleanup_ctx.append(services_ctx)
    app.router.add_post("/v1/chat/completions", partial(handle_llm, route=Route.CHAT))
    app.router.add_post("/v1/responses", partial(handle_llm, route=Route.RESPONSES))
    app.router.add_post("/v1/messages", partial(handle_llm, route=Route.MESSAGES))
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1beta/models", models.list_models)
    app.router.add_get("/v1beta/models/{name}", models.get_model)
    for version in ("v1beta", "v1"):
        # Any character, CR/LF included: a malformed model name is a typed 404, not a 405.
        app.router.add_post(f"/{version}/models/{{model_action:[\\s\\S]+}}", gemini_model_action)
    add_converter_routes(app)
    for path in self_view.PATHS:  # the caller's own key, limits and balance
        app.router.add_get(path, self_view.show_key)
    app.router.add_route(
        "*", "/proxy-api/{provider_account}/{endpoint}/{path:.*}", handle_custom_endpoint
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.on_shutdown.append(start_draining)
    admin.add_routes(app)
    return app


def _archive_runner(services: Services) -> ArchiveRunner | None:
    """The archiver of `serve` (docs/archive.md): with an [archive] that runs in serve."""
    settings = services.config.settings.archive
    if settings is None or services.archive is None or not settings.in_serve:
        return None
    archiver = Archiver(services.storage, services.archive, settings, services.metrics)
    return ArchiveRunner(archiver, Lease(services.storage, settings.lease_s), settings)


def add_converter_routes(app: web.Application) -> None:
    """Any model from any of the three SDKs (docs/converters.md)."""
    app.router.add_post("/openai/v1/chat/completions", partial(handle_converter, route=Route.CHAT))
    app.router.add_post("/openai/v1/responses", responses_not_offered)
    app.router.add_get("/openai/v1/models", models.list_models)
    app.router.add_post("/anthropic/v1/messages", partial(handle_converter, route=Route.MESSAGES))
    app.router.add_get("/anthropic/v1/models", models.list_models)
    for version in ("v1beta", "v1"):
        app.router.add_get(f"/gemini/{version}/models", models.list_models)
        app.router.add_get(f"/gemini/{version}/models/{{name}}", models.get_model)
        app.router.add_post(
            f"/gemini/{version}/models/{{model_action:[\\s\\S]+}}", gemini_converter_action
        )


async def start_draining(app: web.Application) -> None:
    app[SERVICES].draining = True
