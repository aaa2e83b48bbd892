"""The audit trail of admin changes: one JSON line per change, on its own logger.

Every change made through the admin API or the CLI (accounts, keys, balances, config) is
recorded here with who made it (the admin token's name, or ``cli:<os user>``), what it was,
on what, and the state before and after. Reads are not recorded. The logger is
``ratelimit_gw.audit`` so operators can route it to its own file or sink; secrets never
appear in it (callers pass records, never keys).
"""

from __future__ import annotations

import getpass
import logging
from typing import Any

import msgspec
from aiohttp import web

from .limits import flatten

log = logging.getLogger("ratelimit_gw.audit")

# Where the admin guard leaves the name of the token that authenticated the request.
ADMIN_ACTOR: web.RequestKey[str] = web.RequestKey("admin_actor", str)


def set_admin_actor(request: web.Request, token_name: str) -> None:
    request[ADMIN_ACTOR] = token_name


def admin_actor(request: web.Request) -> str:
    """The name of the admin token the request came with (``default`` for RLGW_ADMIN_TOKEN)."""
    return str(request.get(ADMIN_ACTOR, "default"))


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (some containers)
        user = "unknown"
    return f"cli:{user}"


def record(actor: str, action: str, target: str, before: Any = None, after: Any = None) -> None:
    """Log one change: ``action`` is ``<noun>.<verb>`` (``account.update``), ``target`` its id."""
    line = {
        "actor": actor,
        "action": action,
        "target": target,
        "before": flatten(before),
        "after": flatten(after),
    }
    log.info("%s", msgspec.json.encode(line).decode())
