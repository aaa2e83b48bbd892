"""The native routes (§1): authenticate → parse → resolve → admit → relay → settle."""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
from aiohttp import web

from .errors import GatewayError
from .headers import rate_limit_headers
from .limiter import AdmissionRequest, Settlement
from .money import cost_nano
from .protocols import ADAPTERS, RequestInfo, Route, Usage, estimate_input_tokens
from .rejections import rejection_error
from .relay import RelayResult, UpstreamCall, upstream_request_headers
from .services import SERVICES, RequestContext, context
from .settings import Model

# A hold outlives the longest upstream call by this much before a sweep may release it.
HOLD_MARGIN_MS = 60_000
_UPSTREAM_PATH = {
    Route.CHAT: "/v1/chat/completions",
    Route.RESPONSES: "/v1/responses",
    Route.MESSAGES: "/v1/messages",
}


def own_headers(ctx: RequestContext) -> dict[str, str]:
    headers = {"x-request-id": ctx.request_id}
    if ctx.protocol == "anthropic":
        headers["request-id"] = ctx.request_id
    if ctx.decision is not None:
        headers.update(rate_limit_headers(ctx.decision, ctx.protocol))
    return headers


def _rename_model(body: bytes, upstream_id: str) -> bytes:
    document: dict[str, Any] = msgspec.json.decode(body)
    document["model"] = upstream_id
    return msgspec.json.encode(document)


def _upstream_url(request: web.Request, route: Route, model: Model) -> str:
    base = model.provider.base_url
    if route in _UPSTREAM_PATH:
        return base + _UPSTREAM_PATH[route]
    version = request.path.split("/", 2)[1]  # "v1beta" or "v1", as the client called it
    action = "streamGenerateContent" if route is Route.STREAM_GENERATE else "generateContent"
    url = f"{base}/{version}/models/{model.upstream_id}:{action}"
    query = [(k, v) for k, v in request.query.items() if k != "key"]  # never forward a key
    if query:
        url += "?" + urlencode(query, quote_via=quote)  # re-encode what aiohttp decoded
    return url


def billable_usage(result: RelayResult, input_estimate: int, output_cap: int) -> Usage:
    """The usage to charge for what the relay saw (§5)."""
    if result.outcome == "upstream_error":
        return Usage(0, 0)  # the provider refused or was unreachable: nothing was produced
    relayed_estimate = math.ceil(result.output_chars / 4)
    if result.usage is not None:
        if result.outcome == "ok":
            return result.usage
        # Cut short: the usage seen so far may be a placeholder (Anthropic's message_start).
        return Usage(result.usage.input_tokens, max(result.usage.output_tokens, relayed_estimate))
    if result.outcome == "ok" and result.output_chars == 0:
        return Usage(input_estimate, output_cap)  # an answer without usage: the held worst case
    # Cut short before usage arrived: the prompt was sent, and the text relayed so far.
    return Usage(input_estimate, relayed_estimate)


async def handle_llm(
    request: web.Request, route: Route, path_model: str | None = None
) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ctx = context(request)
    adapter = ADAPTERS[ctx.protocol]
    key = await svc.keys.authenticate(adapter.credential(request.headers, request.query))
    ctx.key = key
    body = await request.read()
    info: RequestInfo = adapter.parse_request(route, body, path_model)
    model = svc.catalog.resolve(info.model or "", ctx.protocol)
    ctx.model = model.id
    if not key.allows_model(model.id):
        raise GatewayError(
            403,
            "model_not_allowed",
            f"This API key may not use the model `{model.id}`.",
            param="model",
        )

    output_cap = info.max_output_tokens
    if output_cap is None:
        output_cap = model.default_max_output
    input_estimate = estimate_input_tokens(len(body))
    estimated_tokens = input_estimate + output_cap
    hold_nano = cost_nano(
        input_estimate, output_cap, model.input_nano_usd_per_mtok, model.output_nano_usd_per_mtok
    )
    provider = model.provider
    ttl_ms = int(provider.timeout_s * 1000) + HOLD_MARGIN_MS
    decision = await svc.limiter.admit(
        AdmissionRequest(
            account_id=key.account,
            key_id=key.id,
            request_id=ctx.request_id,
            estimated_tokens=estimated_tokens,
            hold_nano=hold_nano,
            ttl_ms=ttl_ms,
        )
    )
    ctx.decision = decision
    if decision.holds_expired:
        svc.metrics.holds.labels("expired").inc(decision.holds_expired)
    if not decision.allowed:
        raise rejection_error(decision, model, input_estimate, output_cap, hold_nano)
    if hold_nano and decision.available_nano is not None:
        svc.metrics.holds.labels("placed").inc()

    upstream_body = adapter.prepare_upstream_body(route, body, info)
    if (
        model.upstream_id != model.id
        and route is not Route.GENERATE
        and route is not Route.STREAM_GENERATE
    ):
        upstream_body = _rename_model(upstream_body, model.upstream_id)
    call = UpstreamCall(
        provider=provider.name,
        model=model.id,
        method="POST",
        url=_upstream_url(request, route, model),
        headers=upstream_request_headers(request.headers, provider.upstream_headers),
        body=upstream_body,
        connect_timeout_s=provider.connect_timeout_s,
        total_timeout_s=provider.timeout_s,
    )
    streaming = info.stream or route is Route.STREAM_GENERATE
    sse = route is not Route.STREAM_GENERATE or request.query.get("alt") == "sse"
    strip_usage = route is Route.CHAT and info.stream and not info.wants_usage_chunk
    result = RelayResult()
    try:
        return await svc.relay.forward(
            request,
            call,
            result,
            own_headers(ctx),
            parse_usage=lambda data: adapter.usage_from_body(route, data),
            new_tap=(lambda: adapter.new_stream_tap(route, strip_usage, sse=sse))
            if streaming
            else None,
        )
    except asyncio.CancelledError:
        result.outcome = "client_disconnect"  # the handler is cancelled when the client leaves
        raise
    finally:
        if result.outcome == "pending":
            result.outcome = "upstream_error"
        usage = billable_usage(result, input_estimate, output_cap)
        ctx.input_tokens, ctx.output_tokens = usage.input_tokens, usage.output_tokens
        ctx.cost_nano = cost_nano(
            usage.input_tokens,
            usage.output_tokens,
            model.input_nano_usd_per_mtok,
            model.output_nano_usd_per_mtok,
        )
        ctx.upstream_ttfb_s = result.ttfb_s
        svc.settler.submit(
            Settlement(
                account_id=key.account,
                key_id=key.id,
                request_id=ctx.request_id,
                estimated_tokens=estimated_tokens,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_nano=ctx.cost_nano,
                model=model.id,
                outcome=result.outcome,
            )
        )


def new_request_id(client_value: str | None) -> str:
    """Echo a sane client request id; otherwise make one."""
    if (
        client_value
        and len(client_value) <= 128
        and client_value.isascii()
        and client_value.isprintable()
        and " " not in client_value
    ):
        return client_value
    return f"req_{uuid.uuid4().hex}"
