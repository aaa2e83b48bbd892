"""The per-process objects every handler uses, and the per-request context."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry

from .accounts import AccountStore, KeyRecord
from .auth import KeyCache
from .body import BodyReader
from .catalog import Catalog
from .limiter import Decision, Limiter
from .metrics import Metrics
from .quota import UpstreamQuota
from .relay import Relay
from .settings import Settings
from .settler import Settler
from .storage import Storage


@dataclass
class Services:
    settings: Settings
    storage: Storage
    accounts: AccountStore
    keys: KeyCache
    limiter: Limiter
    settler: Settler
    catalog: Catalog
    relay: Relay
    metrics: Metrics
    registry: CollectorRegistry
    quota: UpstreamQuota  # shared upstream ceilings (§10)
    bodies: BodyReader  # reads request bodies within the [server] limits
    # Benchmark baseline: relay without keys, limits or balance (``serve --passthrough-…``).
    passthrough: bool = False
    draining: bool = False  # set at shutdown: /readyz answers 503 so load balancers move on
    # The handler tasks of the requests being served (probes and scrapes excepted): bounded
    # by server.max_inflight, and what a graceful shutdown waits for (serve.py).
    inflight: set[asyncio.Task[object]] = field(default_factory=set)


@dataclass(slots=True)
class RequestContext:
    """What the error middleware needs to answer in the caller's protocol with its headers."""

    request_id: str  # echoed in x-request-id (the client's own, if it sent a sane one)
    protocol: str
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


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("context", RequestContext)


def context(request: web.Request) -> RequestContext:
    ctx: RequestContext = request[CONTEXT]
    return ctx
