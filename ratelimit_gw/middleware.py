"""The one place errors become responses, in the caller's protocol, with the gateway's headers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec
from aiohttp import web

from .context import CONTEXT, RequestContext, new_request_ids, own_headers
from .errors import GatewayError
from .metrics import labelled
from .money import format_usd
from .protocols import ADAPTERS, caller_protocol
from .rate_limit_headers import retry_headers
from .rejections import key_error
from .services import SERVICES, Services
from .storage import StorageError

log = logging.getLogger("ratelimit_gw.errors")
access_log = logging.getLogger("ratelimit_gw.access")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def protocol_of(request: web.Request) -> str:
    """The protocol a caller speaks; ``admin`` for the admin API, which answers in the OpenAI
    envelope (docs/limits-and-balance.md)."""
    path = request.path
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    return caller_protocol(path, request.headers, request.query)


def _as_gateway_error(request: web.Request, exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        path = request.path if len(request.path) <= 200 else request.path[:200] + "…"
        return GatewayError(
            404,
            "route_not_found",
            f"No route for {request.method} {path}: this gateway serves "
            "/v1/chat/completions, /v1/responses, /v1/messages, Gemini routes, the converter "
            "routes under /openai/v1, /anthropic and /gemini, and /proxy-api/.",
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
    if (
        ctx.key is not None
        and ctx.decision is None
        and err.status != 401
        and err.reason != "storage_unavailable"  # another storage call would wait in vain
    ):
        # Rejected before admission: still report the caller's limits (docs/limits-and-balance.md),
        # consuming nothing.
        with contextlib.suppress(StorageError):
            ctx.decision = await request.app[SERVICES].limiter.peek(ctx.key.account, ctx.key.id)
        # The key was cached as valid, but storage says revoked/expired (or its account
        # disabled): that wins (docs/admin.md).
        if ctx.decision is not None and (refused := key_error(ctx.decision.reason)) is not None:
            err = refused
    headers = own_headers(ctx)
    headers.update(retry_headers(err.retry_after_ms, err.should_retry))
    headers.update(err.headers)
    adapter = ADAPTERS.get(ctx.protocol, ADAPTERS["openai"])  # admin: the OpenAI envelope
    response = web.Response(
        status=err.status,
        body=adapter.error_body(err, ctx.request_id),
        content_type=adapter.error_content_type,
        headers=headers,
    )
    if err.status == 408:
        # RFC 9110 §15.5.9: the rest of the body was never read, so the connection cannot
        # carry another request ("Connection: close"; aiohttp discards what still arrives
        # for up to its lingering time, so the client can read this answer, then closes).
        response.force_close()
    return response


MAX_USER_AGENT_CHARS = 256  # enough for any real client's; a log line stays bounded

# Probes and scrapes are not traffic: they are neither counted nor logged.
_QUIET_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


def _route_label(request: web.Request) -> str:
    """The matched route's template (bounded cardinality), never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


async def _answer(
    request: web.Request, ctx: RequestContext, handler: Handler
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except GatewayError as err:
        ctx.reason = err.reason
        return await _render(request, ctx, err)
    except web.HTTPException as exc:
        mapped = _as_gateway_error(request, exc)
        ctx.reason = mapped.reason
        return await _render(request, ctx, mapped)
    except RecursionError:
        # msgspec's answer to JSON nested deeper than the interpreter's recursion limit,
        # whatever Struct it decodes into: the caller's input, not a gateway failure.
        ctx.reason = "invalid_json"
        return await _render(
            request,
            ctx,
            GatewayError(400, "invalid_json", "Request body is nested too deeply."),
        )
    except StorageError as exc:
        log.error("storage failed for %s: %s", ctx.request_id, exc)
        ctx.reason = "storage_unavailable"
        # While the breaker is open nothing will pass before its next trial call.
        breaker_wait_s = request.app[SERVICES].storage.breaker.retry_after_s()
        return await _render(
            request,
            ctx,
            GatewayError(
                503,
                "storage_unavailable",
                "The gateway's storage is unavailable; try again shortly.",
                retry_after_ms=max(1000, math.ceil(breaker_wait_s * 1000)),
            ),
        )
    except Exception:
        log.exception("unhandled error in %s", ctx.request_id)
        ctx.reason = "internal_error"
        return await _render(
            request, ctx, GatewayError(500, "internal_error", "The gateway failed unexpectedly.")
        )
    # The relay puts the gateway's own headers on every answer it builds (each carries
    # x-request-id); other handlers' answers get them here, computed once either way.
    if not response.prepared and "x-request-id" not in response.headers:
        for name, value in own_headers(ctx).items():
            response.headers.setdefault(name, value)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id, settlement_id = new_request_ids(request.headers.get("x-request-id"))
    ctx = RequestContext(request_id, protocol_of(request), time.perf_counter(), settlement_id)
    request[CONTEXT] = ctx
    if request.path in _QUIET_PATHS:
        return await _answer(request, ctx, handler)
    svc = request.app[SERVICES]
    if len(svc.inflight) >= svc.config.settings.server.max_inflight:
        # Shed load before doing any work for it: no body read, no storage call.
        ctx.reason = "overloaded"
        overloaded = GatewayError(
            529,
            "overloaded",
            "The gateway is serving too many requests at once; retry shortly.",
            retry_after_ms=1000,
        )
        refused = await _render(request, ctx, overloaded)
        record_request(svc, request, ctx, refused.status)
        return refused
    task = asyncio.current_task()
    if task is not None:
        svc.inflight.add(task)
    svc.metrics.inflight.inc()
    status = 499  # the client went away before an answer (nginx's convention)
    try:
        response = await _answer(request, ctx, handler)
        status = response.status
        return response
    finally:
        if task is not None:
            svc.inflight.discard(task)
        svc.metrics.inflight.dec()
        svc.bodies.release(ctx)
        record_request(svc, request, ctx, status)


def record_request(svc: Services, request: web.Request, ctx: RequestContext, status: int) -> None:
    """Count the request, time it, and write its access-log line."""
    duration_s = time.perf_counter() - ctx.started
    route = _route_label(request)
    account = ctx.key.account if ctx.key else None
    m = svc.metrics
    labelled(m.requests, route, ctx.protocol, ctx.model, str(status), *m.account(account)).inc()
    labelled(m.request_duration, route, ctx.protocol).observe(duration_s)
    # Admin calls are management, not traffic: a refused one is no rejection.
    if ctx.reason and status >= 400 and ctx.protocol != "admin":
        labelled(m.rejections, ctx.reason, *m.account(account)).inc()
    if svc.config.settings.log.access_log:
        access_log.info(
            msgspec.json.encode(
                {
                    "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "request_id": ctx.request_id,
                    "settlement_id": ctx.settlement_id,
                    "method": request.method,
                    "path": request.path,  # never the query: Gemini callers may put a key there
                    "route": route,
                    "protocol": ctx.protocol,
                    "status": status,
                    "reason": ctx.reason or None,
                    "key_id": ctx.key.id if ctx.key else None,
                    "account": account,
                    "model": None if ctx.model == "-" else ctx.model,
                    "input_tokens": ctx.input_tokens,
                    "output_tokens": ctx.output_tokens,
                    "cost_usd": format_usd(ctx.cost_nano),
                    "duration_ms": round(duration_s * 1000, 3),
                    "upstream_ttfb_ms": None
                    if ctx.upstream_ttfb_s is None
                    else round(ctx.upstream_ttfb_s * 1000, 3),
                    # Appended, so the fields above keep their order. JSON escapes quotes and
                    # control characters: a user agent cannot forge a second line or field.
                    "client": svc.client_addresses.of(request),
                    "user_agent": request.headers.get("User-Agent", "")[:MAX_USER_AGENT_CHARS]
                    or None,
                    "upstream": ctx.upstream,
                    "upstream_key": ctx.upstream_key,
                    "attempts": ctx.attempts,
                }
            ).decode()
        )
