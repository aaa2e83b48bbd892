"""The admin API (docs/admin.md): accounts, keys, top-ups and the ledger, behind one bearer token.

Off unless ``RLGW_ADMIN_TOKEN`` is set; the token is compared in constant time. USD amounts
travel as decimal strings, never floats.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from .accounts import AccountError, AccountStore, RpmPolicy
from .audit import admin_actor, record, set_admin_actor
from .context import context
from .errors import GatewayError
from .limits import NO_LIMITS, Limits, flat_type, flatten, nest
from .money import MoneyError, parse_usd
from .services import SERVICES

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)


class CreateAccountBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    balance_usd: str | None = None
    limits: Limits = NO_LIMITS  # flat in the body: rpm, tpm, concurrency
    rpm_policy: RpmPolicy = "fixed"
    rpm_override: int | None = None


class TopupBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    amount_usd: str
    idempotency_key: str


class CreateKeyBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    account: str
    name: str = ""
    limits: Limits = NO_LIMITS  # flat in the body: rpm, tpm, concurrency
    models: list[str] | None = None
    expires_at: str | None = None


# The bodies as they travel: limits flat, so errors name the field as sent (``$.rpm``).
_FLAT_BODIES: dict[type[msgspec.Struct], type[msgspec.Struct]] = {
    kind: flat_type(kind) for kind in (CreateAccountBody, CreateKeyBody)
}


async def _read_body(request: web.Request, kind: type[S]) -> S:
    """A body with limits (sent flat, see :data:`_FLAT_BODIES`)."""
    return nest(await _read_json(request, _FLAT_BODIES[kind]), kind)


async def _read_json(request: web.Request, kind: type[T]) -> T:
    request_body = await request.app[SERVICES].bodies.read(request, context(request))
    try:
        return msgspec.json.decode(request_body, type=kind)
    except msgspec.ValidationError as exc:
        raise GatewayError(400, "invalid_request", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise GatewayError(400, "invalid_json", f"Request body is not valid JSON: {exc}") from None


def _usd(text: str, *, positive: bool = False) -> int:
    try:
        return parse_usd(text, allow_zero=not positive)
    except MoneyError as exc:
        raise GatewayError(400, "invalid_amount", str(exc)) from None


def _json(document: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(flatten(document)), status=status, content_type="application/json"
    )


Handler = Callable[[web.Request, AccountStore], Awaitable[web.Response]]


def _admin(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def guarded(request: web.Request) -> web.Response:
        svc = request.app[SERVICES]
        token = svc.settings.admin_token
        if token is None:
            raise GatewayError(
                404, "admin_disabled", "The admin API is disabled (RLGW_ADMIN_TOKEN is not set)."
            )
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        # surrogateescape: header bytes that are not UTF-8 compare as the bytes they are.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(errors="surrogateescape"),
            token.encode(errors="surrogateescape"),
        ):
            svc.metrics.admin_auth_failures.inc()
            raise GatewayError(401, "invalid_admin_token", "Invalid admin token.")
        set_admin_actor(request, "default")
        try:
            return await handler(request, svc.accounts)
        except AccountError as exc:
            raise GatewayError(exc.status, exc.reason, exc.message) from None

    return guarded


async def create_account(request: web.Request, accounts: AccountStore) -> web.Response:
    body = await _read_body(request, CreateAccountBody)
    account = await accounts.create_account(
        body.id,
        balance_nano=None if body.balance_usd is None else _usd(body.balance_usd),
        limits=body.limits,
        rpm_policy=body.rpm_policy,
        rpm_override=body.rpm_override,
    )
    record(admin_actor(request), "account.create", account.id, None, account)
    return _json(account, status=201)


async def list_accounts(request: web.Request, accounts: AccountStore) -> web.Response:
    return _json({"data": await accounts.list_accounts()})


async def show_account(request: web.Request, accounts: AccountStore) -> web.Response:
    return _json(await accounts.get_account(request.match_info["id"]))


async def update_account(request: web.Request, accounts: AccountStore) -> web.Response:
    changes = await _read_json(request, dict[str, Any])
    account_id = request.match_info["id"]
    before = await accounts.get_account(account_id)
    after = await accounts.update_account(account_id, changes)
    record(admin_actor(request), "account.update", account_id, before, after)
    return _json(after)


async def topup(request: web.Request, accounts: AccountStore) -> web.Response:
    body = await _read_json(request, TopupBody)
    account_id = request.match_info["id"]
    before = await accounts.get_account(account_id)
    credited = await accounts.topup(
        account_id, _usd(body.amount_usd, positive=True), body.idempotency_key
    )
    account = await accounts.get_account(account_id)
    if credited:
        record(admin_actor(request), "account.topup", account_id, before, account)
    return _json({"credited": credited, "account": account})


async def ledger(request: web.Request, accounts: AccountStore) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise GatewayError(400, "invalid_request", "limit must be an integer") from None
    entries = await accounts.ledger(request.match_info["id"], max(1, min(limit, 10_000)))
    return _json({"data": entries})


async def create_key(request: web.Request, accounts: AccountStore) -> web.Response:
    body = await _read_body(request, CreateKeyBody)
    created = await accounts.create_key(
        body.account,
        name=body.name,
        models=body.models,
        limits=body.limits,
        expires_at=body.expires_at,
    )
    record(admin_actor(request), "key.create", created.record.id, None, created.record)
    document = flatten(created.record)
    document["key"] = created.key  # the only time the key is ever shown
    return _json(document, status=201)


async def list_keys(request: web.Request, accounts: AccountStore) -> web.Response:
    account_id = request.query.get("account")
    if not account_id:
        raise GatewayError(400, "invalid_request", "the account query parameter is required")
    return _json({"data": await accounts.list_keys(account_id)})


async def revoke_key(request: web.Request, accounts: AccountStore) -> web.Response:
    revoked = await accounts.revoke_key(request.match_info["id"])
    record(admin_actor(request), "key.revoke", revoked.id, None, revoked)
    return _json(revoked)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/admin/accounts", _admin(create_account))
    r.add_get("/admin/accounts", _admin(list_accounts))
    r.add_get("/admin/accounts/{id}", _admin(show_account))
    r.add_patch("/admin/accounts/{id}", _admin(update_account))
    r.add_post("/admin/accounts/{id}/topup", _admin(topup))
    r.add_get("/admin/accounts/{id}/ledger", _admin(ledger))
    r.add_post("/admin/keys", _admin(create_key))
    r.add_get("/admin/keys", _admin(list_keys))
    r.add_delete("/admin/keys/{id}", _admin(revoke_key))
