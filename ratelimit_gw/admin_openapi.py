"""The admin API's OpenAPI 3.1 document, written from the route table (admin_routes.py).

Schemas come from the very msgspec types the guard decodes bodies into and the handlers
answer with; a ``limits`` object is spelled out flat, as it travels. Every route lists the
typed errors it may answer (the OpenAI envelope, docs/admin.md).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import msgspec

from .admin_routes import AdminRoute
from .limits import Limits

_REF = "#/components/schemas/{name}"
_LIMITS_FIELD = "limits"


class ErrorDetail(msgspec.Struct, kw_only=True):
    type: str
    code: str  # the HTTP status, as a string
    reason: str  # machine-readable: account_not_found, invalid_amount, …
    message: str
    param: str | None  # the body field at fault, when one is


class AdminError(msgspec.Struct, kw_only=True):
    error: ErrorDetail


# Why an admin route may refuse; which of them a route lists: :func:`_error_statuses`.
_ERRORS = {
    400: "The body, a parameter or an amount is invalid",
    401: "The bearer token is missing or is no admin token",
    403: "A read-only admin token on a route that changes state",
    404: "The admin API is off (no admin token configured), or no such account or key",
    408: "The body arrived too slowly",
    409: "Conflicts with what exists",
    413: "The body is too large",
    503: "Storage is unavailable; retry after retry-after",
    529: "The gateway is overloaded; retry shortly",
}


@cache
def openapi_json(routes: tuple[AdminRoute, ...]) -> bytes:
    return msgspec.json.encode(openapi_document(routes))


def openapi_document(routes: tuple[AdminRoute, ...]) -> dict[str, Any]:
    types: list[Any] = [AdminError]
    for route in routes:
        types.append(route.answer)
        if route.body is not None:
            types.append(route.body)
    refs, components = msgspec.json.schema_components(types, ref_template=_REF)
    answer_schemas = dict(zip(types, refs, strict=True))
    schemas = {name: _flat(schema, components) for name, schema in components.items()}
    schemas.pop(Limits.__name__, None)  # only ever shown spelled out
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, answer_schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ratelimit-gw admin API",
            "version": "1",
            "description": "Accounts, keys, top-ups and the ledger (docs/admin.md). USD amounts "
            "are decimal strings.",
        },
        "security": [{"adminToken": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(route: AdminRoute, schemas: dict[Any, Any]) -> dict[str, Any]:
    json_of: dict[str, Any] = {"application/json": {"schema": schemas[route.answer]}}
    if route.csv:
        json_of["text/csv"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {str(route.status): {"description": "OK", "content": json_of}}
    error = {"application/json": {"schema": schemas[AdminError]}}
    for status in _error_statuses(route):
        responses[str(status)] = {"description": _ERRORS[status], "content": error}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "parameters": [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": msgspec.json.schema(route.path_types.get(name, str)),
            }
            for name in re.findall(r"\{(\w+)\}", route.path)
        ]
        + [
            {
                "name": q.name,
                "in": "query",
                "required": q.required,
                "description": q.description,
                "schema": msgspec.json.schema(q.type),
            }
            for q in route.query
        ],
        "responses": responses,
    }
    if route.body is not None:
        operation["requestBody"] = {
            "required": not route.body_optional,
            "content": {"application/json": {"schema": schemas[route.body]}},
        }
    return operation


def _error_statuses(route: AdminRoute) -> list[int]:
    statuses = {401, 404, 503, 529, *route.errors}
    if route.body is not None or route.query or "{" in route.path:
        statuses.add(400)
    if route.changes_state:
        statuses.add(403)
    if route.body is not None:
        statuses |= {408, 413}
    return sorted(statuses)


def _flat(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a ``limits`` property spelled out as the limits' own, in its place."""
    properties = schema.get("properties", {})
    if _LIMITS_FIELD not in properties:
        return schema
    limits = components[Limits.__name__]
    spelled: dict[str, Any] = {}
    for name, value in properties.items():
        spelled.update(limits["properties"] if name == _LIMITS_FIELD else {name: value})
    required = [name for name in schema.get("required", []) if name != _LIMITS_FIELD]
    if _LIMITS_FIELD in schema.get("required", []):
        required += list(limits["properties"])
    return {**schema, "properties": spelled, "required": required}
