"""The native routes (§1): authenticate → parse → resolve → admit → relay → settle."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlencode

from aiohttp import web

from .accounts import KeyRecord
from .errors import GatewayError
from .headers import rate_limit_headers
from .limiter import AdmissionRequest, Decision, Settlement
from .metrics import labelled
from .protocols import ADAPTERS, RequestInfo, Route, UpstreamEdits, Usage
from .quota import Ceiling, QuotaDecision, provider_ceiling
from .rejections import rejection_error, upstream_quota_error
from .relay import RelayResult, UpstreamCall, carries_gateway_key, upstream_request_headers
from .services import SERVICES, RequestContext, Services, context
from .settings import Model
from .storage import StorageError
from .worst_case import Hold, plan_hold, protects_money, upstream_edits, usage_cost_nano

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


def _upstream_url(request: web.Request, route: Route, model: Model) -> str:
    base = model.provider.base_url
    if route in _UPSTREAM_PATH:
        return base + _UPSTREAM_PATH[route]
    version = request.path.split("/", 2)[1]  # "v1beta" or "v1", as the client called it
    action = "streamGenerateContent" if route is Route.STREAM_GENERATE else "generateContent"
    url = f"{base}/{version}/models/{model.upstream_id}:{action}"
    # `key` is the gateway key here (§2); a gateway key under another name is dropped too.
    query = [
        (k, v) for k, v in request.query.items() if k != "key" and not carries_gateway_key(k, v)
    ]
    if query:
        url += "?" + urlencode(query, quote_via=quote)  # re-encode what aiohttp decoded
    return url


def _believed(count: int) -> int:
    # A broken upstream may report any integer: a negative count must not credit the
    # account, nor a huge one overflow storage arithmetic (settle.lua would fail halfway).
    return min(max(count, 0), MAX_REPORTED_TOKENS)


def billable_usage(result: RelayResult, hold: Hold) -> Usage:
    """The usage to charge for what the relay saw (§5)."""
    if result.outcome == "upstream_error":
        return Usage(0, 0)  # the provider refused or was unreachable: nothing was produced
    if result.usage is not None:
        usage = result.usage
        reported = Usage(
            _believed(usage.input_tokens),
            _believed(usage.output_tokens),
            _believed(usage.cache_read_tokens),
            _believed(usage.cache_write_tokens),
        )
        if result.outcome == "ok":
            return reported
        # Cut short: the usage seen so far may be a placeholder (Anthropic's message_start).
        relayed = math.ceil(result.output_chars / 4)
        return dataclasses.replace(reported, output_tokens=max(reported.output_tokens, relayed))
    if result.outcome == "ok":
        # A complete answer that reported no usage: the held worst case (relayed text / 4
        # would undercount any script but English, and the upstream bills what it allowed).
        return Usage(hold.input_tokens, hold.output_tokens)
    # Cut short before usage arrived: the prompt was sent (at its usual size: an estimate,
    # not the worst case), and the text relayed so far.
    return Usage(hold.estimated_input_tokens, math.ceil(result.output_chars / 4))


def _forward(
    request: web.Request,
    svc: Services,
    ctx: RequestContext,
    route: Route,
    model: Model,
    info: RequestInfo,
    body: bytes,
    edits: UpstreamEdits,
    result: RelayResult,
) -> Awaitable[web.StreamResponse]:
    """Build the upstream call for ``model`` and relay it, streamed or buffered."""
    adapter = ADAPTERS[ctx.protocol]
    provider = model.provider
    upstream_body = adapter.prepare_upstream_body(route, body, info, edits)
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
    An admission whose caller gives up on it (cancelled, or a storage failure after the call
    was sent) is released through the settler, whether or not it ran.

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
        try:
            decision = await svc.limiter.admit(admission)
        except asyncio.CancelledError:
            # The client hung up (or shutdown cut the handler) while admit.lua was on its way:
            # it runs anyway, and nobody would settle what it places before its TTL.
            release = admission.abandoned(ctx.model, ctx.request_id)
            svc.settler.abandon(release, "client_disconnect")
            raise
        except StorageError as exc:
            if not exc.never_sent:  # it may have run, its reply lost
                release = admission.abandoned(ctx.model, ctx.request_id)
                svc.settler.abandon(release, "storage_error")
            raise
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
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
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
    body = await svc.bodies.read(request)
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

    hold = await plan_hold(svc, key, adapter, route, body, info, model)
    provider = model.provider
    quota = await admit_request(
        svc,
        ctx,
        key,
        hold.tokens,
        hold.nano,
        provider.timeout_s,
        provider_ceiling(provider),
        lambda decision: rejection_error(decision, model, hold),
    )
    # Whatever the hold assumed is what the upstream is allowed (§5); metered accounts keep
    # their bytes.
    edits = upstream_edits(model, hold.output_cap if protects_money(ctx.decision) else None)

    result = RelayResult()
    try:
        return await _forward(request, svc, ctx, route, model, info, body, edits, result)
    except asyncio.CancelledError:
        result.outcome = "client_disconnect"  # the handler is cancelled when the client leaves
        raise
    finally:
        if result.outcome == "pending":
            result.outcome = "upstream_error"
        usage = billable_usage(result, hold)
        cost = usage_cost_nano(usage, model)
        settle_request(svc, ctx, result, usage, cost, hold.tokens, model.id, quota)


async def _passthrough(
    request: web.Request, svc: Services, ctx: RequestContext, route: Route, path_model: str | None
) -> web.StreamResponse:
    """Benchmark baseline only: relay with no key, limit, balance or settlement."""
    body = await svc.bodies.read(request)
    info = ADAPTERS[ctx.protocol].parse_request(route, body, path_model)
    model = svc.catalog.resolve(info.model or "", ctx.protocol)
    edits = upstream_edits(model, None)
    return await _forward(request, svc, ctx, route, model, info, body, edits, RelayResult())


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
