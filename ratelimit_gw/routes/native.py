"""The native routes (README.md, Routes): authenticate → parse → price → meter (admit → relay →
settle).

The caller's protocol (from the path) reads the key, the request and renders errors; the
upstream's protocol (the model's provider) builds the upstream call and reads its usage.
The two are one adapter here: a model of another protocol is refused (``protocol_mismatch``).
"""

from __future__ import annotations

from aiohttp import web

from ..context import RequestContext, context, own_headers
from ..errors import GatewayError
from ..metering import MeteredRequest
from ..protocols import ADAPTERS, ProtocolAdapter, RequestInfo, Route
from ..relay import RelayResult, UpstreamCall, gateway_key_free, upstream_request_headers
from ..services import SERVICES, Services
from ..settings import Model
from ..upstream_quota import provider_quota
from ..worst_case import plan_hold, refuse_unbounded_input, upstream_edits


async def handle_llm(
    request: web.Request, route: Route, path_model: str | None = None
) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ctx = context(request)
    caller = ADAPTERS[ctx.protocol]
    if svc.passthrough:
        return await _passthrough(request, svc, ctx, caller, route, path_model)
    key = await svc.keys.authenticate(caller.credential(request.headers, request.query))
    ctx.key = key
    body = await svc.bodies.read(request, ctx)
    info = caller.parse_request(route, body, path_model)
    model = svc.catalog.resolve(info.model or "", ctx.protocol)
    ctx.model = model.id
    if not key.allows_model(model.id):
        raise GatewayError(
            403,
            "model_not_allowed",
            f"This API key may not use the model `{model.id}`.",
            param="model",
        )

    hold, refused = plan_hold(caller, route, body, info, model)
    if refused:
        await refuse_unbounded_input(svc, key, model, refused)
    provider = model.provider
    metered = MeteredRequest(
        ctx=ctx,
        key=key,
        hold=hold,
        model=model,
        charged_as=model.id,
        quota=provider_quota(provider),
        upstream_timeout_s=provider.timeout_s,
    )
    await metered.admit(svc)
    upstream = ADAPTERS[model.protocol]
    output_cap = metered.upstream_output_cap()
    return await metered.relay(
        svc,
        request,
        lambda: _upstream_call(request, upstream, route, model, info, body, output_cap),
    )


async def gemini_model_action(request: web.Request) -> web.StreamResponse:
    """POST …/models/{model}:generateContent | :streamGenerateContent."""
    model, sep, action = request.match_info["model_action"].rpartition(":")
    if sep and action == "generateContent":
        return await handle_llm(request, Route.GENERATE, model)
    if sep and action == "streamGenerateContent":
        return await handle_llm(request, Route.STREAM_GENERATE, model)
    raise web.HTTPNotFound()


def _upstream_call(
    request: web.Request,
    upstream: ProtocolAdapter,
    route: Route,
    model: Model,
    info: RequestInfo,
    body: bytes,
    output_cap: int | None,
) -> UpstreamCall:
    """The call to ``model``'s upstream (``output_cap``: see ``upstream_edits``)."""
    provider = model.provider
    return UpstreamCall(
        provider=provider.name,
        model=model.id,
        method="POST",
        url=upstream.upstream_url(
            provider.base_url,
            route,
            model.upstream_id,
            request.path,
            gateway_key_free(request.query.items()),
        ),
        headers=upstream_request_headers(request.headers, provider.upstream_headers),
        body=upstream.prepare_upstream_body(route, body, info, upstream_edits(model, output_cap)),
        connect_timeout_s=provider.connect_timeout_s,
        total_timeout_s=provider.timeout_s,
        parse_usage=lambda data: upstream.usage_from_body(route, data),
        new_tap=upstream.answer_tap(route, info, request.query),
    )


async def _passthrough(
    request: web.Request,
    svc: Services,
    ctx: RequestContext,
    caller: ProtocolAdapter,
    route: Route,
    path_model: str | None,
) -> web.StreamResponse:
    """Benchmark baseline only: relay with no key, limit, balance or settlement."""
    body = await svc.bodies.read(request, ctx)
    info = caller.parse_request(route, body, path_model)
    model = svc.catalog.resolve(info.model or "", ctx.protocol)
    call = _upstream_call(request, ADAPTERS[model.protocol], route, model, info, body, None)
    return await svc.relay.forward(request, call, RelayResult(), own_headers(ctx))
