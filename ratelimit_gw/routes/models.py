"""The model-list routes (README.md, Routes): only the models the caller's key may use, in the
list shape of the protocol the caller speaks."""

from __future__ import annotations

import msgspec
from aiohttp import web

from ..context import context
from ..errors import GatewayError
from ..protocols import ADAPTERS, ProtocolAdapter
from ..protocols.model_lists import ModelListing
from ..rejections import key_error
from ..services import SERVICES


async def _listings(request: web.Request) -> tuple[ProtocolAdapter, list[ModelListing]]:
    """The caller's adapter and the models its key may use. Authenticates and reads the
    key's bucket state (for the answer's headers) without consuming."""
    svc = request.app[SERVICES]
    ctx = context(request)
    caller = ADAPTERS[ctx.protocol]
    key = await svc.keys.authenticate(caller.model_list_credential(request.headers, request.query))
    decision = await svc.limiter.peek(key.account, key.id)
    if (refused := key_error(decision.reason)) is not None:
        raise refused
    ctx.key, ctx.decision = key, decision
    return caller, svc.config.catalog.listings(key)


def _json(document: object) -> web.Response:
    return web.Response(body=msgspec.json.encode(document), content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    """GET …/models: the list shape of the caller's protocol (on /v1/models, a Gemini key
    makes the caller a Gemini caller)."""
    caller, models = await _listings(request)
    return _json(caller.model_list(models))


async def get_model(request: web.Request) -> web.Response:
    """GET …/models/{name}, for the protocols that have it (Gemini)."""
    caller, models = await _listings(request)
    name = request.match_info["name"]
    for model in models:
        if model.id == name and (entry := caller.model_entry(model)) is not None:
            return _json(entry)
    raise GatewayError(404, "model_not_found", f"The model `{name}` does not exist.")
