"""The admin API's route table and its guard: what a route is, who may call it, what it reads.

An :class:`AdminRoute` is the one description of an admin endpoint. :func:`register` puts
every route of the table on the app behind the guard, and :mod:`ratelimit_gw.admin_openapi`
writes the OpenAPI document from the same table, so no route answers undocumented and no body
is decoded as anything but the type the document shows.

The guard promises, for every route: no admin token configured → 404 ``admin_disabled``; a
missing or unknown bearer token → 401 (counted in ``rlgw_admin_auth_failures``), checked
against every token in constant time; a read-only token on a route that changes state → 403
``read_only_admin_token``; the matched token's name is the actor of the route's audit line.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import msgspec
from aiohttp import web

from .accounts import AccountStore
from .audit import set_admin_actor
from .context import context
from .errors import GatewayError
from .keyspace import ID_PATTERN
from .limits import MAX_LIMIT, flat_type, nest
from .management import AccountError
from .money import MoneyError, format_usd, parse_usd
from .services import SERVICES
from .settings import AdminToken

T = TypeVar("T")
Handler = Callable[[web.Request, AccountStore], Awaitable[web.Response]]

# The body the guard decoded for the route, as the table's type (see :func:`route_body`).
_BODY: web.RequestKey[msgspec.Struct] = web.RequestKey("admin_body", msgspec.Struct)
# A body's field that holds an account's or key's limits travels flat (limits.flat_type).
_LIMITS_FIELD = "limits"
# msgspec's complaint about a JSON number where a string is required, at a top-level field.
_NUMBER_FOR_STRING = re.compile(r"Expected `str[^`]*`, got `(?:int|float)` - at `\$\.(\w+)`")


# Wire types whose schemas say what the gateway accepts. The constraints are documentation
# (extra_json_schema), not decoding rules: the gateway's own checks (money.parse_usd,
# accounts) enforce them, with messages that say what is wrong and how to fix it.
UsdAmount = Annotated[
    str,
    msgspec.Meta(
        description='USD as a decimal string with at most 9 decimals, e.g. "10.00"',
        extra_json_schema={"pattern": r"^[0-9]+(\.[0-9]{1,9})?$", "examples": ["10.00"]},
    ),
]
SignedUsdAmount = Annotated[
    str,
    msgspec.Meta(
        description='USD as a signed decimal string, e.g. "5.00" (credit) or "-5.00" (debit)',
        extra_json_schema={"pattern": r"^-?[0-9]+(\.[0-9]{1,9})?$", "examples": ["-5.00"]},
    ),
]
AccountId = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": ID_PATTERN.pattern})]
KeyId = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": r"^key_[0-9a-f]{16}$"})]
PositiveCount = Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": MAX_LIMIT})]
IdempotencyKey = Annotated[str, msgspec.Meta(extra_json_schema={"minLength": 1, "maxLength": 200})]


@dataclass(frozen=True)
class QueryParam:
    name: str
    type: Any  # a type, or an Annotated one such as AccountId
    description: str
    required: bool = False


@dataclass(frozen=True, eq=False)
class AdminRoute:
    """One admin endpoint. ``body``: the request body's Struct (limits as one ``Limits``
    field; the wire and the document have them flat); ``answer``: what a success carries;
    ``body_optional``: an empty body reads as ``{}`` (every field of ``body`` has a default);
    ``path_types``: the types of path parameters that are not any string (``{"id": KeyId}``);
    ``errors``: statuses the route may answer beyond those every admin route may;
    ``csv``: a success may be CSV instead (the route's ``format=csv``)."""

    method: str
    path: str
    handler: Handler
    summary: str
    answer: type
    status: int = 200
    body: type[msgspec.Struct] | None = None
    body_optional: bool = False
    query: tuple[QueryParam, ...] = ()
    path_types: dict[str, Any] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    csv: bool = False

    @property
    def changes_state(self) -> bool:
        """Everything but a read needs a full token and writes an audit line."""
        return self.method != "GET"

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


def route_body(request: web.Request, kind: type[T]) -> T:
    """The body the guard decoded for this route; ``kind`` must be the table's body type."""
    body = request[_BODY]
    if not isinstance(body, kind):
        raise TypeError(f"the route's body is a {type(body).__name__}, not a {kind.__name__}")
    return body


def register(app: web.Application, routes: tuple[AdminRoute, ...]) -> None:
    operation_ids = [route.operation_id for route in routes]
    if len(set(operation_ids)) != len(operation_ids):  # the document's operationIds
        raise ValueError(f"two admin routes share a handler: {sorted(operation_ids)}")
    for route in routes:
        app.router.add_route(route.method, route.path, _guarded(route))


def _guarded(route: AdminRoute) -> Callable[[web.Request], Awaitable[web.Response]]:
    body_decoder = None if route.body is None else _BodyDecoder(route.body, route.body_optional)

    async def guarded(request: web.Request) -> web.Response:
        svc = request.app[SERVICES]
        token = _authenticate(request, svc.config.settings.admin_tokens)
        if token is None:
            svc.metrics.admin_auth_failures.inc()
            raise GatewayError(401, "invalid_admin_token", "Invalid admin token.")
        if route.changes_state and token.access != "full":
            raise GatewayError(
                403,
                "read_only_admin_token",
                f"The admin token {token.name!r} is read-only: it may only read (GET).",
            )
        set_admin_actor(request, token.name)
        if body_decoder is not None:
            raw = await svc.bodies.read(request, context(request))
            request[_BODY] = body_decoder.decode(raw)
        try:
            return await route.handler(request, svc.accounts)
        except AccountError as exc:
            raise GatewayError(exc.status, exc.reason, exc.message) from None

    guarded.__name__ = route.operation_id
    return guarded


def _authenticate(request: web.Request, tokens: tuple[AdminToken, ...]) -> AdminToken | None:
    if not tokens:
        raise GatewayError(
            404, "admin_disabled", "The admin API is disabled (RLGW_ADMIN_TOKEN is not set)."
        )
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # surrogateescape: header bytes that are not UTF-8 compare as the bytes they are.
    offered = presented.strip().encode(errors="surrogateescape")
    matched = None
    for token in tokens:  # every one compared, so the time does not tell which matched
        if hmac.compare_digest(offered, token.token.encode(errors="surrogateescape")):
            matched = token
    return matched if scheme.lower() == "bearer" else None


class _BodyDecoder:
    """A route's body from the wire into the table's Struct. Limits travel flat, so the wire
    type spells them out and errors name a field as sent (``$.rpm``)."""

    def __init__(self, kind: type[msgspec.Struct], optional: bool) -> None:
        self._kind = kind
        self._optional = optional
        self._nested = _LIMITS_FIELD in kind.__struct_fields__
        self._decoder = msgspec.json.Decoder(flat_type(kind) if self._nested else kind)

    def decode(self, raw: bytes) -> msgspec.Struct:
        if self._optional and not raw.strip():
            raw = b"{}"
        try:
            decoded: msgspec.Struct = self._decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise _invalid(raw, str(exc)) from None
        except msgspec.DecodeError as exc:
            raise GatewayError(
                400, "invalid_json", f"Request body is not valid JSON: {exc}"
            ) from None
        return nest(decoded, self._kind) if self._nested else decoded


def _invalid(raw: bytes, problem: str) -> GatewayError:
    """A 400 naming the problem; a JSON number in a USD field gets the string to send instead."""
    found = _NUMBER_FOR_STRING.match(problem)
    if found is None or not found[1].endswith("_usd"):
        return GatewayError(400, "invalid_request", problem)
    name = found[1]
    sent = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal).decode(raw)[name]
    try:
        as_string = format_usd(parse_usd(str(sent), signed=True))
    except MoneyError:  # out of range or too precise: still a string, as sent
        as_string = str(sent)
    return GatewayError(
        400,
        "invalid_amount",
        f'USD amounts are decimal strings, not JSON numbers: send "{as_string}" - at `$.{name}`',
        param=name,
    )
