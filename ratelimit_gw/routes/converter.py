"""The converter routes (docs/converters.md): a caller keeps its own protocol and SDK and
reaches a model of any protocol.

authenticate → parse → resolve (any protocol) → a model of the caller's own protocol is
relayed natively, bytes unchanged; any other is translated (the caller's codec reads the
request into the intermediate shape, the upstream's codec writes it) and then priced,
metered and relayed exactly as a native request of the upstream's protocol would be, with
the answer translated back on its way out. The hold is the worst case of the body the
upstream gets, so every limit and the unbounded-input policy apply after translation.
"""

from __future__ import annotations

from aiohttp import web

from ..context import context
from ..errors import GatewayError
from ..protocols import ADAPTERS, Route
from ..protocols.translation import CODECS
from ..protocols.translation.relaying import AnswerTranslation
from ..services import SERVICES
from .native import (
    UpstreamRequest,
    allowed_model,
    authenticate,
    gemini_action,
    relay_native,
    relay_priced,
)

# What a converted Gemini stream is asked for: SSE (the JSON-array form is the caller's
# choice only).
_GEMINI_SSE = {"alt": "sse"}


async def handle_converter(
    request: web.Request, route: Route, path_model: str | None = None
) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ctx = context(request)
    caller = ADAPTERS[ctx.protocol]
    key = await authenticate(request, svc, ctx, caller)
    body = await svc.bodies.read(request, ctx)
    info = caller.parse_request(route, body, path_model)
    model = allowed_model(svc, ctx, key, svc.config.catalog.find(info.model or ""))
    if model.protocol == ctx.protocol:
        return await relay_native(request, svc, ctx, key, model, route, body, info)

    caller_codec, upstream_codec = CODECS[ctx.protocol], CODECS[model.protocol]
    chat = caller_codec.read_request(body, route, path_model)
    if route is Route.STREAM_GENERATE and request.query.get("alt") != "sse":
        chat.json_array_stream = True
    upstream_route = upstream_codec.upstream_route(chat)
    upstream_body = upstream_codec.write_request(chat, model.id, model.max_output_tokens)
    ctx.dropped_params = tuple(chat.dropped)
    adapter = ADAPTERS[model.protocol]
    path = adapter.converter_route.format(model=model.upstream_id)
    upstream = UpstreamRequest(
        adapter=adapter,
        route=upstream_route,
        body=upstream_body,
        info=adapter.parse_request(upstream_route, upstream_body, model.id),
        path=path,
        query=_GEMINI_SSE if upstream_route is Route.STREAM_GENERATE else {},
        caller_headers=request.headers,
        translation=AnswerTranslation(
            caller=caller,
            caller_codec=caller_codec,
            upstream_codec=upstream_codec,
            request=chat,
            request_id=ctx.request_id,
        ),
    )
    return await relay_priced(request, svc, ctx, key, model, upstream)


async def gemini_converter_action(request: web.Request) -> web.StreamResponse:
    """POST /gemini/{version}/models/{model}:generateContent | :streamGenerateContent."""
    route, model = gemini_action(request)
    return await handle_converter(request, route, model)


async def responses_not_offered(request: web.Request) -> web.StreamResponse:
    """POST /openai/v1/responses: not translated (docs/converters.md)."""
    raise GatewayError(
        404,
        "route_not_found",
        "The Responses API is not available on the converter routes: call "
        "/openai/v1/chat/completions (Chat Completions) to reach any model in the OpenAI format.",
    )
