"""Request-scoped state: the ids a request is known by, its context, the gateway's headers.

The error middleware makes the context when a request arrives; routes and the metering fill
it in; the middleware answers and logs from it, whatever route (if any) the request reached.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass

from aiohttp import web

from .keys import KeyRecord
from .limiter import Decision
from .protocols import ADAPTERS
from .rate_limit_headers import rate_limit_headers


@dataclass(slots=True)
class RequestContext:
    """What the error middleware needs to answer in the caller's protocol with its headers."""

    request_id: str  # echoed in x-request-id (the client's own, if it sent a sane one)
    protocol: str  # the caller's protocol, or "admin"
    started: float  # time.perf_counter() at arrival
    settlement_id: str  # always the gateway's own: the key of holds, leases and the ledger
    key: KeyRecord | None = None
    decision: Decision | None = None
    model: str = "-"  # a configured model id once resolved (never the caller's raw string)
    reason: str = ""  # why the gateway refused or failed, if it did
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int = 0
    upstream_ttfb_s: float | None = None
    # Storage failed and storage.on_error = "allow": served without limits, balance or
    # settlement (counted in rlgw_storage_bypass_total).
    storage_bypassed: bool = False
    # Request body bytes this request holds of the process's budget (body.py).
    body_bytes_reserved: int = 0
    # A converter route's caller fields not sent on (docs/converters.md).
    dropped_params: tuple[str, ...] = ()
    # The upstream (provider or custom endpoint) and pool key of the last upstream attempt,
    # and how many attempts were made (docs/upstream-pools.md); the key's name, never it.
    upstream: str | None = None
    upstream_key: str | None = None
    attempts: int = 0


CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("context", RequestContext)


def context(request: web.Request) -> RequestContext:
    ctx: RequestContext = request[CONTEXT]
    return ctx


def own_headers(ctx: RequestContext) -> dict[str, str]:
    """The gateway's own headers on every answer: the request id and the caller's limits."""
    headers = {"x-request-id": ctx.request_id}
    if ctx.decision is not None:
        headers.update(rate_limit_headers(ctx.decision))
    adapter = ADAPTERS.get(ctx.protocol)  # none for the admin API
    if adapter is not None:
        adapter.add_own_headers(ctx.request_id, ctx.decision, headers)
    if ctx.dropped_params:
        headers["x-rlgw-dropped-params"] = ", ".join(ctx.dropped_params)
    return headers


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
