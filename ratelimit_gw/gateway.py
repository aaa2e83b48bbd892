"""The native routes (§1): authenticate → parse → resolve → admit → relay → settle."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlencode

import msgspec
from aiohttp import web

from .accounts import KeyRecord
from .errors import GatewayError
from .headers import rate_limit_headers
from .limiter import AdmissionRequest, Decision, Settlement
from .metrics import labelled
from .money import cost_nano
from .protocols import ADAPTERS, RequestInfo, Route, Usage, estimate_input_tokens
from .quota import Ceiling, QuotaDecision, provider_ceiling
from .rejections import rejection_error, upstream_quota_error
from .relay import RelayResult, UpstreamCall, upstream_request_headers
from .services import SERVICES, RequestContext, Services, context
from .settings import Model
from .storage import StorageError

log = logging.getLogger("ratelimit_gw.storage")
# A hold outlives the longest upstream call by this much before a sweep may release it.
HOLD_MARGIN_MS = 60_000
# The most tokens one count of an upstream's usage report is believed (a protobuf int32).
MAX_REPORTED_TOKENS = 2**31 - 1
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
        # A broken upstream may report any integer: a negative count must not credit the
        # account, nor a huge one overflow storage arithmetic (settle.lua would fail halfway).
        reported = Usage(
            min(max(result.usage.input_tokens, 0), MAX_REPORTED_TOKENS),
            min(max(result.usage.output_tokens, 0), MAX_REPORTED_TOKENS),
        )
        if result.outcome == "ok":
            return reported
        # Cut short: the usage seen so far may be a placeholder (Anthropic's message_start).
        return Usage(reported.input_tokens, max(reported.output_tokens, relayed_estimate))
    if result.outcome == "ok" and result.output_chars == 0:
        return Usage(input_estimate, output_cap)  # an answer without usage: the held worst case
    # Cut short before usage arrived: the prompt was sent, and the text relayed so far.
    return Usage(input_estimate, relayed_estimate)


def _forward(
    request: web.Request,
    svc: Services,
    ctx: RequestContext,
    route: Route,
    model: Model,
    info: RequestInfo,
    body: bytes,
    result: RelayResult,
) -> Awaitable[web.StreamResponse]:
    """Build the upstream call for ``model`` and relay it, streamed or buffered."""
    adapter = ADAPTERS[ctx.protocol]
    provider = model.provider
    upstream_body = adapter.prepare_upstream_body(route, body, info)
    if model.upstream_id != model.id and route not in (Route.GENERATE, Route.STREAM_GENERATE):
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
    return svc.relay.forward(
        request,
        call,
        result,
        own_headers(ctx),
        parse_usage=lambda data: adapter.usage_from_body(route, data),
        new_tap=(lambda: adapter.new_stream_tap(route, strip_usage, sse=sse))
        if streaming
        else None,
    )


async def admit_request(
    svc: Services,
    ctx: RequestContext,
    key: KeyRecord,
    estimated_tokens: int,
    hold_nano: int,
    upstream_timeout_s: float,
    ceiling: Ceiling | None,
    reject: Callable[[Decision], GatewayError],
) -> QuotaDecision | None:
    """The shared upstream ceiling (§10), then the account's limits and balance (§4, §5).

    A ceiling is one more storage round trip, before admit.lua; if the account then refuses,
    the ceiling gets its reservation back, so a rejected request consumes nothing anywhere.
    Raises the 429/402/401 to answer; returns the ceiling reservation for settlement.

    Storage failing raises StorageError (503), unless ``storage.on_error = "allow"`` (§11):
    then the request goes on without limits or balance, ``ctx.storage_bypassed`` is set (the
    caller must not settle it: nothing was held) and it is counted and logged.
    """
    admission = AdmissionRequest(
        account_id=key.account,
        key_id=key.id,
        request_id=ctx.settlement_id,
        estimated_tokens=estimated_tokens,
        hold_nano=hold_nano,
        # Holds and leases outlive the longest upstream call, so only a dead gateway's expire.
        ttl_ms=int(upstream_timeout_s * 1000) + HOLD_MARGIN_MS,
    )
    try:
        return await _admit(svc, ctx, admission, ceiling, reject)
    except StorageError as exc:
        if svc.settings.storage.on_error != "allow":
            raise
        failure = exc
    ctx.storage_bypassed = True
    svc.metrics.storage_bypass.inc()
    log.warning(
        "storage failed; serving %s for account %s without limits or balance "
        '(storage.on_error = "allow"): %s',
        ctx.request_id,
        admission.account_id,
        failure,
    )
    return None


async def _admit(
    svc: Services,
    ctx: RequestContext,
    admission: AdmissionRequest,
    ceiling: Ceiling | None,
    reject: Callable[[Decision], GatewayError],
) -> QuotaDecision | None:
    quota = None
    if ceiling is not None:
        quota = await svc.quota.reserve(ceiling, admission.estimated_tokens)
        if not quota.allowed:
            raise upstream_quota_error(quota)
    try:
        decision = await svc.limiter.admit(admission)
        ctx.decision = decision
        if decision.holds_expired:
            labelled(svc.metrics.holds, "expired").inc(decision.holds_expired)
        if not decision.allowed:
            raise reject(decision)
    except BaseException:
        if quota is not None:
            with contextlib.suppress(StorageError):  # the error being raised says more
                await svc.quota.refund(quota)
        raise
    if admission.hold_nano:  # admit.lua records a hold on every account, prepaid or not
        labelled(svc.metrics.holds, "placed").inc()
    return quota


def settle_request(
    svc: Services,
    ctx: RequestContext,
    result: RelayResult,
    usage: Usage,
    cost: int,
    estimated_tokens: int,
    model_id: str,
    quota: QuotaDecision | None,
) -> None:
    """Note what the request used (for the access log) and hand it to settlement."""
    ctx.input_tokens, ctx.output_tokens = usage.input_tokens, usage.output_tokens
    ctx.cost_nano = cost
    ctx.upstream_ttfb_s = result.ttfb_s
    if ctx.storage_bypassed or ctx.key is None:  # on_error = "allow": nothing was held
        return
    svc.settler.submit(
        Settlement(
            account_id=ctx.key.account,
            key_id=ctx.key.id,
            request_id=ctx.settlement_id,
            client_request_id=ctx.request_id,
            estimated_tokens=estimated_tokens,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cost_nano=cost,
            model=model_id,
            outcome=result.outcome,
        ),
        quota,
    )


async def handle_llm(
    request: web.Request, route: Route, path_model: str | None = None
) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ctx = context(request)
    adapter = ADAPTERS[ctx.protocol]
    if svc.passthrough:
        return await _passthrough(request, svc, ctx, route, path_model)
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
    quota = await admit_request(
        svc,
        ctx,
        key,
        estimated_tokens,
        hold_nano,
        provider.timeout_s,
        provider_ceiling(provider),
        lambda decision: rejection_error(decision, model, input_estimate, output_cap, hold_nano),
    )

    result = RelayResult()
    try:
        return await _forward(request, svc, ctx, route, model, info, body, result)
    except asyncio.CancelledError:
        result.outcome = "client_disconnect"  # the handler is cancelled when the client leaves
        raise
    finally:
        if result.outcome == "pending":
            result.outcome = "upstream_error"
        usage = billable_usage(result, input_estimate, output_cap)
        cost = cost_nano(
            usage.input_tokens,
            usage.output_tokens,
            model.input_nano_usd_per_mtok,
            model.output_nano_usd_per_mtok,
        )
        settle_request(svc, ctx, result, usage, cost, estimated_tokens, model.id, quota)


async def _passthrough(
    request: web.Request, svc: Services, ctx: RequestContext, route: Route, path_model: str | None
) -> web.StreamResponse:
    """Benchmark baseline only: relay with no key, limit, balance or settlement."""
    body = await request.read()
    info = ADAPTERS[ctx.protocol].parse_request(route, body, path_model)
    model = svc.catalog.resolve(info.model or "", ctx.protocol)
    return await _forward(request, svc, ctx, route, model, info, body, RelayResult())


# Gateway request ids: random per process + a counter — unique across processes and
# restarts without paying for a uuid4 per request.
_ID_PREFIX = secrets.token_hex(10)
_ID_COUNTER = itertools.count()


def new_request_ids(client_value: str | None) -> tuple[str, str]:
    """(id to echo, id to settle under): the client's sane ``x-request-id`` is echoed, but
    storage always gets an id of the gateway's own, so a reused client id can neither make
    a request look already settled nor collide with another request's hold."""
    own = f"req_{_ID_PREFIX}{next(_ID_COUNTER):012x}"
    if (
        client_value
        and len(client_value) <= 128
        and client_value.isascii()
        and client_value.isprintable()
        and " " not in client_value
    ):
        return client_value, own
    return own, own
