"""Probes and the scrape: liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

import os

from aiohttp import web

from ..metrics import exposition
from ..services import SERVICES


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: config loaded, storage answering, not shutting down."""
    svc = request.app[SERVICES]
    checks = {
        "config": True,
        "storage": await svc.storage.ping(),
        "draining": svc.draining,
    }
    ready = checks["storage"] and not svc.draining
    return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = exposition(request.app[SERVICES].registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    response.headers["X-Rlgw-Worker"] = str(os.getpid())  # which process of a pool answered
    return response
