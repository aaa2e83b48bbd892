"""The model-list routes (README.md, Routes): only the models the caller's key may use."""

from __future__ import annotations

import msgspec
from aiohttp import web

from ..accounts import KeyRecord
from ..catalog import gemini_model
from ..context import context
from ..errors import GatewayError
from ..protocols import ADAPTERS
from ..rejections import key_error
from ..services import SERVICES


async def _authenticated(request: web.Request) -> KeyRecord:
    """Authenticate and read the caller's bucket state (for headers) without consuming."""
    svc = request.app[SERVICES]
    ctx = context(request)
    # GET /v1/models is shared by the OpenAI SDK (Bearer) and the Anthropic SDK (x-api-key):
    # the Anthropic adapter reads both (README.md Routes, docs/admin.md).
    reader = ADAPTERS["anthropic" if ctx.protocol == "openai" else ctx.protocol]
    key = await svc.keys.authenticate(reader.credential(request.headers, request.query))
    decision = await svc.limiter.peek(key.account, key.id)
    if (refused := key_error(decision.reason)) is not None:
        raise refused
    ctx.key, ctx.decision = key, decision
    return key


def _json(document: object) -> web.Response:
    return web.Response(body=msgspec.json.encode(document), content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: Gemini's shape for a Gemini key, else the OpenAI/Anthropic shape."""
    key = await _authenticated(request)
    catalog = request.app[SERVICES].catalog
    if context(request).protocol == "gemini":
        return _json(catalog.gemini_list(key))
    return _json(catalog.openai_list(key))


async def list_gemini_models(request: web.Request) -> web.Response:
    key = await _authenticated(request)
    return _json(request.app[SERVICES].catalog.gemini_list(key))


async def get_gemini_model(request: web.Request) -> web.Response:
    key = await _authenticated(request)
    name = request.match_info["name"]
    for model in request.app[SERVICES].catalog.allowed(key):
        if model.id == name:
            return _json(gemini_model(model))
    raise GatewayError(404, "model_not_found", f"The model `{name}` does not exist.")
