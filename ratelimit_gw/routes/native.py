"""The native routes (README.md, Routes): authenticate → parse → price → meter (admit → relay →
settle).

The caller's protocol (from the path) reads the key, the request and renders errors; the
upstream's protocol (the model's provider) builds the upstream call and reads its usage.
The two are one adapter here: a model of another protocol is refused (``protocol_mismatch``);
the converter routes (``routes/converter.py``) serve it, through the same pricing and metering.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from ..context import RequestContext, context, own_headers
from ..errors import GatewayError
from ..itinerary import Destination
from ..keys import KeyRecord
from ..metering import MeteredRequest
from ..protocols import ADAPTERS, ProtocolAdapter, RequestInfo, Route
from ..protocols.translation.relaying import AnswerTranslation
from ..relay import (
    RelayResult,
    UpstreamCall,
    gateway_key_free,
    translated_request_headers,
    upstream_request_headers,
)
from ..services import SERVICES, Services
from ..settings import Model
from ..worst_case import plan_hold, refuse_unbounded_input, upstream_edits


async def handle_llm(
    request: web.Request, route: Route, path_model: str | None = None
) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ctx = context(request)
    caller = ADAPTERS[ctx.protocol]
    if svc.passthrough:
        return await _passthrough(request, svc, ctx, caller, route, path_model)
    key = await authenticate(request, svc, ctx, caller)
    body = await svc.bodies.read(request, ctx)
    info = caller.parse_request(route, body, path_model)
    model = allowed_model(svc, ctx, key, svc.config.catalog.resolve(info.model or "", ctx.protocol))
    return await relay_native(request, svc, ctx, key, model, route, body, info)


async def gemini_model_action(request: web.Request) -> web.StreamResponse:
    """POST …/models/{model}:generateContent | :streamGenerateContent."""
    route, model = gemini_action(request)
    return await handle_llm(request, route, model)


def gemini_action(request: web.Request) -> tuple[Route, str]:
    """The route and model of a Gemini ``{model}:{action}`` path (404 for another action)."""
    model, sep, action = request.match_info["model_action"].rpartition(":")
    if sep and action == "generateContent":
        return Route.GENERATE, model
    if sep and action == "streamGenerateContent":
        return Route.STREAM_GENERATE, model
    raise web.HTTPNotFound()


async def authenticate(
    request: web.Request, svc: Services, ctx: RequestContext, caller: ProtocolAdapter
) -> KeyRecord:
    key = await svc.keys.authenticate(caller.credential(request.headers, request.query))
    ctx.key = key
    return key


def allowed_model(svc: Services, ctx: RequestContext, key: KeyRecord, model: Model) -> Model:
    ctx.model = model.id
    if not key.allows_model(model.id):
        raise GatewayError(
            403,
            "model_not_allowed",
            f"This API key may not use the model `{model.id}`.",
            param="model",
        )
    return model


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """A request in the upstream's own protocol: the caller's, or a converter's translation."""

    adapter: ProtocolAdapter
    route: Route
    body: bytes
    info: RequestInfo
    path: str  # the path its URL is built from (Gemini reads its API version there)
    query: Mapping[str, str]  # the caller's (a gateway key in it is never sent on)
    caller_headers: Mapping[str, str]  # each attempt's headers are built from them
    translation: AnswerTranslation | None = None

    def headers_for(self, destination: Destination, key: str) -> dict[str, str]:
        """An attempt's headers at ``destination`` with its pool's ``key``: the caller's that
        the provider forwards (a converter's less every protocol's own), then the
        provider's, then the key's credential."""
        provider = destination.provider
        assert provider is not None  # a model's destinations are providers
        if self.translation is None:
            headers = upstream_request_headers(
                self.caller_headers, provider.upstream_headers, provider.client_headers
            )
        else:
            headers = translated_request_headers(
                self.caller_headers,
                self.adapter,
                provider.upstream_headers,
                provider.client_headers,
            )
        headers.update(destination.key_headers[key])
        return headers


async def relay_native(
    request: web.Request,
    svc: Services,
    ctx: RequestContext,
    key: KeyRecord,
    model: Model,
    route: Route,
    body: bytes,
    info: RequestInfo,
) -> web.StreamResponse:
    """Price, meter and relay the caller's own request, bytes unchanged (docs/relay.md)."""
    upstream = _as_sent(request, model, route, body, info)
    return await relay_priced(request, svc, ctx, key, model, upstream)


def _as_sent(
    request: web.Request, model: Model, route: Route, body: bytes, info: RequestInfo
) -> UpstreamRequest:
    """The caller's own request, for ``model``'s upstream (its protocol is the caller's)."""
    return UpstreamRequest(
        adapter=ADAPTERS[model.protocol],
        route=route,
        body=body,
        info=info,
        path=request.path,
        query=request.query,
        caller_headers=request.headers,
    )


async def relay_priced(
    request: web.Request,
    svc: Services,
    ctx: RequestContext,
    key: KeyRecord,
    model: Model,
    upstream: UpstreamRequest,
) -> web.StreamResponse:
    """Price ``upstream`` (the worst case of the body the upstream gets), then admit, relay and
    settle it (metering.py)."""
    hold, refused = plan_hold(upstream.adapter, upstream.route, upstream.body, upstream.info, model)
    if refused:
        await refuse_unbounded_input(svc, key, model, refused)
    metered = MeteredRequest(
        ctx=ctx,
        key=key,
        hold=hold,
        model=model,
        charged_as=model.id,
        itinerary=svc.config.itineraries.of_model(model),
    )
    await metered.admit(svc)
    output_cap = metered.upstream_output_cap()
    return await metered.relay(
        svc,
        request,
        lambda destination, key_name: _upstream_call(
            upstream, model, output_cap, destination, key_name
        ),
    )


def _upstream_call(
    upstream: UpstreamRequest,
    model: Model,
    output_cap: int | None,
    destination: Destination,
    key_name: str,
) -> UpstreamCall:
    """One attempt's call to ``destination`` with its pool's key ``key_name`` (``output_cap``:
    see ``upstream_edits``)."""
    provider = destination.provider
    assert provider is not None  # a model's destinations are providers
    adapter, route, info = upstream.adapter, upstream.route, upstream.info
    translation = upstream.translation
    new_tap = adapter.answer_tap(route, info, upstream.query)
    if translation is not None and new_tap is not None:
        upstream_tap = new_tap
        new_tap = lambda: translation.new_tap(upstream_tap())  # noqa: E731
    return UpstreamCall(
        provider=provider.name,
        model=model.id,
        method="POST",
        url=adapter.upstream_url(
            provider.base_url,
            route,
            destination.upstream_id,
            upstream.path,
            gateway_key_free(upstream.query.items()),
        ),
        headers=upstream.headers_for(destination, key_name),
        body=adapter.prepare_upstream_body(
            route,
            upstream.body,
            info,
            upstream_edits(model, output_cap, provider, destination.upstream_id),
        ),
        connect_timeout_s=provider.connect_timeout_s,
        total_timeout_s=provider.timeout_s,
        parse_usage=lambda data: adapter.usage_from_body(route, data),
        new_tap=new_tap,
        translation=translation,
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
    model = svc.config.catalog.resolve(info.model or "", ctx.protocol)
    destination = svc.config.itineraries.of_model(model).destinations[0]
    upstream = _as_sent(request, model, route, body, info)
    call = _upstream_call(upstream, model, None, destination, destination.pool.keys[0].name)
    return await svc.relay.forward(request, call, RelayResult(), own_headers(ctx))
