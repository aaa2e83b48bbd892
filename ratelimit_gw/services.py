"""The per-process objects every handler uses, and the per-request context."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry

from .accounts import AccountStore, KeyRecord
from .auth import KeyCache
from .catalog import Catalog
from .limiter import Decision, Limiter
from .metrics import Metrics
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
    draining: bool = False  # set at shutdown: /readyz answers 503 so load balancers move on


@dataclass(slots=True)
class RequestContext:
    """What the error middleware needs to answer in the caller's protocol with its headers."""

    request_id: str
    protocol: str
    started: float  # time.perf_counter() at arrival
    key: KeyRecord | None = None
    decision: Decision | None = None
    model: str = "-"  # a configured model id once resolved (never the caller's raw string)
    reason: str = ""  # why the gateway refused or failed, if it did
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int = 0
    upstream_ttfb_s: float | None = None


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("context", RequestContext)


def context(request: web.Request) -> RequestContext:
    ctx: RequestContext = request[CONTEXT]
    return ctx
