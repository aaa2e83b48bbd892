"""The per-process objects every handler uses."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry

from .accounts import AccountStore
from .archive.database import ArchiveDatabase
from .auth import KeyCache
from .body import BodyReader
from .client_address import ClientAddresses
from .limiter import Limiter
from .live_config import ConfigFile, LiveConfig
from .metrics import Metrics
from .relay import Relay
from .settler import Settler
from .storage import Storage
from .upstream_pool import PoolStore


@dataclass
class Services:
    # The reloadable configuration with the restart-only sections it started with: read once
    # per request, at its start (live_config.py); a reload replaces it whole.
    config: LiveConfig
    storage: Storage
    accounts: AccountStore
    keys: KeyCache
    limiter: Limiter
    settler: Settler
    relay: Relay
    metrics: Metrics
    registry: CollectorRegistry
    pools: PoolStore  # upstream key pools: pick, cool down, mark (upstream_pool.py)
    bodies: BodyReader  # reads request bodies within the [server] limits
    client_addresses: ClientAddresses  # who sent a request (server.trusted_proxies)
    # Benchmark baseline: relay without keys, limits or balance (``serve --passthrough-…``).
    passthrough: bool = False
    config_file: ConfigFile | None = None  # what a reload reads; None: built in code, no reload
    # The `serve --workers` parent of this worker process (None: not a worker): a reload asked
    # of one worker over the admin API is passed on to it, which sends SIGHUP to every worker.
    pool_parent_pid: int | None = None
    # The PostgreSQL ledger archive ([archive]): usage reports and old ledger pages read it.
    archive: ArchiveDatabase | None = None
    draining: bool = False  # set at shutdown: /readyz answers 503 so load balancers move on
    # The handler tasks of the requests being served (probes and scrapes excepted): bounded
    # by server.max_inflight, and what a graceful shutdown waits for (serve.py).
    inflight: set[asyncio.Task[object]] = field(default_factory=set)


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
