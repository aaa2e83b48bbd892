"""The per-process objects every handler uses, and the per-request context."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .accounts import AccountStore, KeyRecord
from .auth import KeyCache
from .catalog import Catalog
from .limiter import Decision, Limiter
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


@dataclass(slots=True)
class RequestContext:
    """What the error middleware needs to answer in the caller's protocol with its headers."""

    request_id: str
    protocol: str
    key: KeyRecord | None = None
    decision: Decision | None = None


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("context", RequestContext)


def context(request: web.Request) -> RequestContext:
    ctx: RequestContext = request[CONTEXT]
    return ctx
