"""Custom endpoints (§10): ``ANY /proxy-api/{provider_account}/{endpoint}/{path…}``.

The request goes to the endpoint's base URL untranslated — method, path suffix, query,
headers and body — with the endpoint's configured headers (its upstream credential) in place
of the caller's gateway key. Authentication, limits, balance and the endpoint's shared
ceiling apply as on the native routes, through the same admission, relay and settler.

Metering: when the JSON body names a model with a configured price, the request is held and
charged like a native OpenAI call, from the OpenAI-shaped answer's usage (a streamed chat
answer is asked for its usage chunk, which the client only sees if it asked for it too).
Anything else is opaque to the gateway: it holds and charges the endpoint's per-request
price, counts tokens at the admission estimate (body size, plus the body's ``max_tokens``
if it has one), and relays the answer as it arrives.
"""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from .errors import GatewayError
from .gateway import admit_request, billable_usage, own_headers, settle_request
from .limiter import Decision
from .money import cost_nano
from .protocols import ADAPTERS, Route, StreamTap, Usage, estimate_input_tokens
from .quota import endpoint_ceiling
from .rejections import per_request_rejection_error, rejection_error
from .relay import RelayResult, UpstreamCall, upstream_request_headers
from .services import SERVICES, context
from .settings import CustomEndpoint, Model

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


def _priced_model(body: bytes, models: dict[str, Model]) -> Model | None:
    """The configured model with a price that a JSON body names, if any."""
    try:
        name = _MODEL_VIEW.decode(body).model
    except msgspec.DecodeError:  # not JSON, not an object, or a non-string model
        return None
    model = models.get(name or "")
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
    # The raw (still percent-encoded) suffix and query, so they reach the upstream as sent.
    suffix = request.rel_url.raw_path.split("/", 4)[4]
    url = f"{endpoint.base_url}/{suffix}"
    if request.rel_url.raw_query_string:
        url += "?" + request.rel_url.raw_query_string
    return url


async def handle_proxy(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ctx = context(request)
    key = await svc.keys.authenticate(_OPENAI.credential(request.headers, request.query))
    ctx.key = key
    info = request.match_info
    endpoint = svc.settings.custom_endpoints.get((info["provider_account"], info["endpoint"]))
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
        any(segment in (".", "..") for segment in segments)
        or "" in segments[:-1]  # "//": an empty segment, or an absolute URL ("http://…")
        or any(c == "\\" or c < " " or c == "\x7f" for c in suffix)
    ):
        raise GatewayError(
            400,
            "invalid_request",
            "The path after the endpoint may not contain '.' or '..' segments, empty "
            "segments ('//'), backslashes or control characters.",
        )
    body = await request.read()
    route = Route.RESPONSES if suffix.rstrip("/").endswith("responses") else Route.CHAT
    model = _priced_model(body, svc.settings.models)
    input_estimate = estimate_input_tokens(len(body))
    upstream_body = body
    if model is not None:
        if not key.allows_model(model.id):
            raise GatewayError(
                403,
                "model_not_allowed",
                f"This API key may not use the model `{model.id}`.",
                param="model",
            )
        ctx.model = model.id
        request_info = _OPENAI.parse_request(route, body, None)
        output_cap = request_info.max_output_tokens
        if output_cap is None:
            output_cap = model.default_max_output
        hold_nano = cost_nano(
            input_estimate,
            output_cap,
            model.input_nano_usd_per_mtok,
            model.output_nano_usd_per_mtok,
        )
        upstream_body = _OPENAI.prepare_upstream_body(route, body, request_info)
        strip_usage = (
            route is Route.CHAT and request_info.stream and not request_info.wants_usage_chunk
        )
        new_tap = (
            (lambda: _OPENAI.new_stream_tap(route, strip_usage)) if request_info.stream else None
        )
    else:
        output_cap = _declared_output_cap(route, body)
        hold_nano = endpoint.price_per_request_nano
        new_tap = PassThroughTap

    def reject(decision: Decision) -> GatewayError:
        if model is not None:
            return rejection_error(decision, model, input_estimate, output_cap, hold_nano)
        return per_request_rejection_error(
            decision, endpoint.id, input_estimate, output_cap, hold_nano
        )

    estimated_tokens = input_estimate + output_cap
    quota = await admit_request(
        svc,
        ctx,
        key,
        estimated_tokens,
        hold_nano,
        endpoint.timeout_s,
        endpoint_ceiling(endpoint),
        reject,
    )
    call = UpstreamCall(
        provider=endpoint.id,
        model=ctx.model,
        method=request.method,
        url=_upstream_url(endpoint, request),
        headers=upstream_request_headers(request.headers, endpoint.upstream_headers),
        body=upstream_body,
        connect_timeout_s=endpoint.connect_timeout_s,
        total_timeout_s=endpoint.timeout_s,
    )
    result = RelayResult()
    try:
        return await svc.relay.forward(
            request,
            call,
            result,
            own_headers(ctx),
            parse_usage=lambda data: _OPENAI.usage_from_body(route, data),
            new_tap=new_tap,
        )
    except asyncio.CancelledError:
        result.outcome = "client_disconnect"  # the handler is cancelled when the client leaves
        raise
    finally:
        if result.outcome == "pending":
            result.outcome = "upstream_error"
        if model is not None:
            usage = billable_usage(result, input_estimate, output_cap)
            cost = cost_nano(
                usage.input_tokens,
                usage.output_tokens,
                model.input_nano_usd_per_mtok,
                model.output_nano_usd_per_mtok,
            )
        elif result.outcome == "upstream_error":
            usage, cost = Usage(0, 0), 0  # refused or unreachable: nothing delivered
        else:
            usage, cost = Usage(input_estimate, output_cap), hold_nano
        settle_request(
            svc,
            ctx,
            result,
            usage,
            cost,
            estimated_tokens,
            model.id if model is not None else endpoint.id,
            quota,
        )
