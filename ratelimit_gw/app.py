"""create_app(settings): services opened in cleanup contexts, routes, the error middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import aiohttp
from aiohttp import web

from . import admin, listing
from .accounts import AccountStore
from .auth import KeyCache
from .catalog import Catalog
from .gateway import handle_llm
from .limiter import Limiter
from .middleware import error_middleware
from .protocols import Route
from .relay import Relay
from .services import SERVICES, Services
from .settings import Settings
from .settler import Settler
from .storage import Storage, open_storage


async def gemini_model_action(request: web.Request) -> web.StreamResponse:
    """POST …/models/{model}:generateContent | :streamGenerateContent."""
    model, sep, action = request.match_info["model_action"].rpartition(":")
    if sep and action == "generateContent":
        return await handle_llm(request, Route.GENERATE, model)
    if sep and action == "streamGenerateContent":
        return await handle_llm(request, Route.STREAM_GENERATE, model)
    raise web.HTTPNotFound()


def create_app(settings: Settings, storage: Storage | None = None) -> web.Application:
    """The gateway application. ``storage`` lets a caller share one already open (tests, demo)."""
    app = web.Application(
        middlewares=[error_middleware], client_max_size=settings.server.max_body_bytes
    )

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        own_storage = storage is None
        store = open_storage(settings.storage) if storage is None else storage
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        accounts = AccountStore(store)
        limiter = Limiter(store)
        settler = Settler(limiter)
        app[SERVICES] = Services(
            settings=settings,
            storage=store,
            accounts=accounts,
            keys=KeyCache(accounts, settings.storage.key_cache_ttl_s),
            limiter=limiter,
            settler=settler,
            catalog=Catalog(settings.models),
            relay=Relay(session),
        )
        yield
        await settler.drain()
        await session.close()
        if own_storage:
            await store.close()

    app.cleanup_ctx.append(services_ctx)
    app.router.add_post("/v1/chat/completions", partial(handle_llm, route=Route.CHAT))
    app.router.add_post("/v1/responses", partial(handle_llm, route=Route.RESPONSES))
    app.router.add_post("/v1/messages", partial(handle_llm, route=Route.MESSAGES))
    app.router.add_get("/v1/models", listing.list_models)
    app.router.add_get("/v1beta/models", listing.list_gemini_models)
    app.router.add_get("/v1beta/models/{name}", listing.get_gemini_model)
    for version in ("v1beta", "v1"):
        app.router.add_post(f"/{version}/models/{{model_action:.+}}", gemini_model_action)
    app.router.add_get("/healthz", healthz)
    admin.add_routes(app)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
