"""Custom endpoints (docs/custom-endpoints.md): ``ANY
/proxy-api/{provider_account}/{endpoint}/{path…}``.

The request goes to the endpoint's base URL untranslated — method, path suffix, query,
headers and body — with the endpoint's configured headers (its upstream credential) in place
of the caller's gateway key. Authentication, limits, balance and the endpoint's upstream
pool (its upstream keys, their ceilings and failover: docs/upstream-pools.md) apply as on
the native routes, through the same metering (``metering.py``).

Metering: when the JSON body names a model with a configured price, the request is held and
charged like a native OpenAI call, from the OpenAI-shaped answer's usage (a streamed chat
answer is asked for its usage chunk, which the client only sees if it asked for it too).
Anything else is opaque to the gateway: it holds and charges the endpoint's per-request
price, counts tokens at the admission estimate (body size, plus the body's ``max_tokens``
if it has one), and relays the answer as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_plus

import msgspec
from aiohttp import web

from ..context import context
from ..errors import GatewayError
from ..itinerary import Destination
from ..keys import KeyRecord
from ..metering import MeteredRequest
from ..protocols import (
    ADAPTERS,
    RequestInfo,
    Route,
    StreamTap,
    UpstreamEdits,
    estimate_input_tokens,
)
from ..relay import UpstreamCall, carries_gateway_key, upstream_request_headers
from ..services import SERVICES
from ..settings import CustomEndpoint, Model
from ..worst_case import Hold, plan_hold, refuse_unbounded_input

_OPENAI = ADAPTERS["openai"]


class _ModelView(msgspec.Struct):
    model: str | None = None


_MODEL_VIEW = msgspec.json.Decoder(_ModelView)


class PassThroughTap(StreamTap):
    """Relays any answer unchanged as it arrives; an opaque request reads no usage from it."""

    def feed(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def _named_model(body: bytes) -> str | None:
    """The ``model`` a JSON object body names, if it names one."""
    try:
        return _MODEL_VIEW.decode(body).model
    except msgspec.DecodeError:  # not JSON, not an object, or a non-string model
        return None


def _check_restricted_key(key: KeyRecord, body: bytes) -> None:
    """A key restricted to some models may send a body-less request, or a JSON body naming
    one of them; any other body (no model, not JSON, multipart…) could reach any model."""
    if not key.models or not body:
        return
    name = _named_model(body)
    if name is None:
        raise GatewayError(
            403,
            "model_not_allowed",
            "This API key may only use some models: a request body to a custom endpoint "
            "must be a JSON object whose `model` is one of them.",
            param="model",
        )
    if not key.allows_model(name):
        raise GatewayError(
            403,
            "model_not_allowed",
            f"This API key may not use the model `{name}`.",
            param="model",
        )


def _priced_model(body: bytes, models: dict[str, Model]) -> Model | None:
    """The configured model with a price that a JSON body names, if any."""
    model = models.get(_named_model(body) or "")
    if model is None or not (model.input_nano_usd_per_mtok or model.output_nano_usd_per_mtok):
        return None
    return model


def _declared_output_cap(route: Route, body: bytes) -> int:
    try:
        info = _OPENAI.parse_request(route, body, None)
    except GatewayError:
        return 0
    return info.max_output_tokens or 0


def _upstream_url(endpoint: CustomEndpoint, request: web.Request) -> str:
    # The raw (still percent-encoded) suffix and query, so they reach the upstream as sent,
    # less any parameter that carries a gateway key.
    suffix = request.rel_url.raw_path.split("/", 4)[4]
    url = f"{endpoint.base_url}/{suffix}"
    if query := _forwarded_query(request.rel_url.raw_query_string):
        url += "?" + query
    return url


def _forwarded_query(raw_query: str) -> str:
    kept = []
    for part in raw_query.split("&"):
        name, _, value = part.partition("=")
        if not carries_gateway_key(unquote_plus(name), unquote_plus(value)):
            kept.append(part)
    return "&".join(kept)


async def handle_custom_endpoint(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ctx = context(request)
    key = await svc.keys.authenticate(_OPENAI.credential(request.headers, request.query))
    ctx.key = key
    info = request.match_info
    config = svc.config  # once: the endpoint and the model prices of one configuration
    endpoint = config.settings.custom_endpoints.get((info["provider_account"], info["endpoint"]))
    if endpoint is None:
        raise GatewayError(
            404,
            "endpoint_not_found",
            f"No custom endpoint `{info['provider_account']}/{info['endpoint']}` is configured.",
        )
    if not endpoint.allows_account(key.account):
        raise GatewayError(
            403,
            "endpoint_not_allowed",
            f"The account `{key.account}` may not use the custom endpoint `{endpoint.id}`.",
        )
    suffix = info["path"]  # percent-decoded, so "%2e%2e" and "%2F" are seen for what they are
    segments = suffix.split("/")
    if (
        # "..;x" too: servers that take ";" as a segment's parameters (Tomcat) see "..".
        any(segment.partition(";")[0] in (".", "..") for segment in segments)
        or "" in segments[:-1]  # "//": an empty segment, or an absolute URL ("http://…")
        or any(c == "\\" or c < " " or c == "\x7f" for c in suffix)
    ):
        raise GatewayError(
            400,
            "invalid_request",
            "The path after the endpoint may not contain '.' or '..' segments (with or "
            "without ';' parameters), empty segments ('//'), backslashes or control "
            "characters.",
        )
    body = await svc.bodies.read(request, ctx)
    _check_restricted_key(key, body)
    route = Route.RESPONSES if suffix.rstrip("/").endswith("responses") else Route.CHAT
    model = _priced_model(body, config.settings.models)
    request_info = None
    new_tap: Callable[[], StreamTap] | None
    if model is not None:  # a restricted key may use it: _check_restricted_key said so
        ctx.model = model.id
        request_info = _OPENAI.parse_request(route, body, None)
        hold, refused = plan_hold(_OPENAI, route, body, request_info, model)
        if refused:
            await refuse_unbounded_input(svc, key, model, refused)
        new_tap = _OPENAI.answer_tap(route, request_info, request.query)
    else:
        # Opaque: nothing to hold but the price, so the body's usual size is both numbers.
        input_estimate = estimate_input_tokens(len(body))
        hold = Hold(
            input_estimate,
            input_estimate,
            _declared_output_cap(route, body),
            1,
            endpoint.price_per_request_nano,
        )
        new_tap = PassThroughTap

    metered = MeteredRequest(
        ctx=ctx,
        key=key,
        hold=hold,
        model=model,
        charged_as=model.id if model is not None else endpoint.id,
        itinerary=config.itineraries.of_endpoint(endpoint),
    )
    await metered.admit(svc)
    output_cap = metered.upstream_output_cap()

    def upstream_call(destination: Destination, key_name: str) -> UpstreamCall:
        headers = upstream_request_headers(
            request.headers, endpoint.upstream_headers, endpoint.client_headers
        )
        headers.update(destination.key_headers[key_name])
        return UpstreamCall(
            provider=endpoint.id,
            model=ctx.model,
            method=request.method,
            url=_upstream_url(endpoint, request),
            headers=headers,
            body=_upstream_body(endpoint, route, body, request_info, output_cap),
            connect_timeout_s=endpoint.connect_timeout_s,
            total_timeout_s=endpoint.timeout_s,
            parse_usage=lambda data: _OPENAI.usage_from_body(route, data),
            new_tap=new_tap,
        )

    return await metered.relay(svc, request, upstream_call)


def _upstream_body(
    endpoint: CustomEndpoint,
    route: Route,
    body: bytes,
    info: RequestInfo | None,
    output_cap: int | None,
) -> bytes:
    """The caller's bytes; for a priced model, with the cap the request was held for when
    it sets none (docs/limits-and-balance.md), and the usage chunk a stream must ask for."""
    if info is None:
        return body
    edits = UpstreamEdits(output_cap=output_cap, chat_cap_field=endpoint.chat_cap_field)
    return _OPENAI.prepare_upstream_body(route, body, info, edits)
