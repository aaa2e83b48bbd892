"""The one place errors become responses, in the caller's protocol, with the gateway's headers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from .errors import GatewayError
from .gateway import new_request_id, own_headers
from .headers import retry_headers
from .protocols import ADAPTERS
from .rejections import key_error
from .services import CONTEXT, SERVICES, RequestContext
from .storage import StorageError

log = logging.getLogger("ratelimit_gw.errors")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def protocol_of(request: web.Request) -> str:
    """The protocol a caller speaks, from the route it called (and, for /v1/models, its key)."""
    path = request.path
    if path.startswith(("/v1/messages", "/anthropic/")):
        return "anthropic"
    if path.startswith(("/v1beta/", "/gemini/")) or (
        path.startswith("/v1/models/") and ":" in path
    ):
        return "gemini"
    if path == "/v1/models" and ("x-goog-api-key" in request.headers or "key" in request.query):
        return "gemini"
    return "openai"


def _as_gateway_error(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return GatewayError(
            404,
            "route_not_found",
            f"No route {exc.reason}: this gateway serves "
            "/v1/chat/completions, /v1/responses, /v1/messages and Gemini routes.",
        )
    if exc.status == 405:
        # RFC 9110 §15.5.6: a 405 must say which methods the route takes.
        allow = exc.headers.get("Allow", "")
        return GatewayError(
            405,
            "method_not_allowed",
            f"Method not allowed on this route (allowed: {allow}).",
            headers={"Allow": allow},
        )
    if exc.status == 413:
        return GatewayError(413, "request_too_large", "The request body is too large.")
    return GatewayError(exc.status if exc.status >= 400 else 400, "invalid_request", exc.reason)


async def _render(request: web.Request, ctx: RequestContext, err: GatewayError) -> web.Response:
    if ctx.key is not None and ctx.decision is None and err.status != 401:
        # Rejected before admission: still report the caller's limits (§6), consuming nothing.
        with contextlib.suppress(StorageError):
            ctx.decision = await request.app[SERVICES].limiter.peek(ctx.key.account, ctx.key.id)
        # The key was cached as valid, but storage says revoked/expired: that wins (§2).
        if ctx.decision is not None and (refused := key_error(ctx.decision.reason)) is not None:
            err = refused
    headers = own_headers(ctx)
    headers.update(retry_headers(err.retry_after_ms, err.should_retry))
    headers.update(err.headers)
    adapter = ADAPTERS[ctx.protocol]
    return web.Response(
        status=err.status,
        body=adapter.error_body(err, ctx.request_id),
        content_type=adapter.error_content_type,
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = RequestContext(new_request_id(request.headers.get("x-request-id")), protocol_of(request))
    request[CONTEXT] = ctx
    try:
        response = await handler(request)
    except GatewayError as err:
        return await _render(request, ctx, err)
    except web.HTTPException as exc:
        return await _render(request, ctx, _as_gateway_error(exc))
    except StorageError as exc:
        log.error("storage failed for %s: %s", ctx.request_id, exc)
        return await _render(
            request,
            ctx,
            GatewayError(
                503,
                "storage_unavailable",
                "The gateway's storage is unavailable; try again shortly.",
                retry_after_ms=1000,
            ),
        )
    except Exception:
        log.exception("unhandled error in %s", ctx.request_id)
        return await _render(
            request, ctx, GatewayError(500, "internal_error", "The gateway failed unexpectedly.")
        )
    if not response.prepared:
        for name, value in own_headers(ctx).items():
            response.headers.setdefault(name, value)
    return response
