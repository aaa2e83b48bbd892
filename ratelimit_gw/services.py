"""The per-process objects every handler uses."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry

from .accounts import AccountStore
from .auth import KeyCache
from .body import BodyReader
from .catalog import Catalog
from .client_address import ClientAddresses
from .limiter import Limiter
from .metrics import Metrics
from .relay import Relay
from .settings import Settings
from .settler import Settler
from .storage import Storage
from .upstream_quota import UpstreamQuota


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
    quota: UpstreamQuota  # upstream quotas (docs/custom-endpoints.md)
    bodies: BodyReader  # reads request bodies within the [server] limits
    client_addresses: ClientAddresses  # who sent a request (server.trusted_proxies)
    # Benchmark baseline: relay without keys, limits or balance (``serve --passthrough-…``).
    passthrough: bool = False
    draining: bool = False  # set at shutdown: /readyz answers 503 so load balancers move on
    # The handler tasks of the requests being served (probes and scrapes excepted): bounded
    # by server.max_inflight, and what a graceful shutdown waits for (serve.py).
    inflight: set[asyncio.Task[object]] = field(default_factory=set)


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
