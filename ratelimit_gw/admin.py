"""The admin API (docs/admin.md): accounts, keys, balances and the ledger, behind one bearer
token.

Off unless ``RLGW_ADMIN_TOKEN`` is set; the token is compared in constant time. USD amounts
travel as decimal strings, never floats.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from .accounts import AccountStore, RpmPolicy
from .audit import admin_actor, record, set_admin_actor
from .context import context
from .errors import GatewayError
from .keys import DEFAULT_GRACE_S
from .limits import NO_LIMITS, Limits, flat_type, flatten, nest
from .management import AccountError
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


class AdjustBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    amount_usd: str  # signed: "-5.00" debits
    reason: str
    idempotency_key: str


class RotateKeyBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    grace_s: int = DEFAULT_GRACE_S  # how long the old secret keeps working; 0: not at all


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


async def _read_json(request: web.Request, kind: type[T], *, optional: bool = False) -> T:
    """The body as ``kind``; with ``optional``, no body at all reads as ``{}``."""
    request_body = await request.app[SERVICES].bodies.read(request, context(request))
    if optional and not request_body.strip():
        request_body = b"{}"
    try:
        return msgspec.json.decode(request_body, type=kind)
    except msgspec.ValidationError as exc:
        raise GatewayError(400, "invalid_request", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise GatewayError(400, "invalid_json", f"Request body is not valid JSON: {exc}") from None


def _usd(text: str, *, positive: bool = False, signed: bool = False) -> int:
    try:
        return parse_usd(text, allow_zero=not positive, signed=signed)
    except MoneyError as exc:
        raise GatewayError(400, "invalid_amount", str(exc)) from None


def _query_int(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, str(default)))
    except ValueError:
        raise GatewayError(400, "invalid_request", f"{name} must be an integer") from None


def _query_flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise GatewayError(400, "invalid_request", f"{name} must be true or false")
    return value in ("true", "1")


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


async def _set_disabled(
    request: web.Request, accounts: AccountStore, disabled: bool
) -> web.Response:
    account_id = request.match_info["id"]
    before = await accounts.get_account(account_id)
    changed = await accounts.set_disabled(account_id, disabled)
    after = await accounts.get_account(account_id)
    if changed:
        action = "account.disable" if disabled else "account.enable"
        record(admin_actor(request), action, account_id, before, after)
    return _json(after)


async def disable_account(request: web.Request, accounts: AccountStore) -> web.Response:
    return await _set_disabled(request, accounts, True)


async def enable_account(request: web.Request, accounts: AccountStore) -> web.Response:
    return await _set_disabled(request, accounts, False)


async def delete_account(request: web.Request, accounts: AccountStore) -> web.Response:
    account_id = request.match_info["id"]
    force = _query_flag(request, "force")
    before = await accounts.get_account(account_id)
    deleted = await accounts.delete_account(account_id, force=force)
    record(admin_actor(request), "account.delete", account_id, before, deleted)
    return _json(deleted)


async def adjust(request: web.Request, accounts: AccountStore) -> web.Response:
    body = await _read_json(request, AdjustBody)
    account_id = request.match_info["id"]
    amount = _usd(body.amount_usd, positive=True, signed=True)
    before = await accounts.get_account(account_id)
    adjusted = await accounts.adjust(account_id, amount, body.reason, body.idempotency_key)
    account = await accounts.get_account(account_id)
    if adjusted:
        record(admin_actor(request), "account.adjust", account_id, before, account)
    return _json({"adjusted": adjusted, "account": account})


async def ledger(request: web.Request, accounts: AccountStore) -> web.Response:
    limit = _query_int(request, "limit", 100)
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
    """One account's keys (``account=``), or every account's; paged (``limit``, ``cursor``)."""
    account_id = request.query.get("account")
    if account_id == "":
        raise GatewayError(400, "invalid_request", "account must not be empty")
    page = await accounts.page_keys(
        account_id, limit=_query_int(request, "limit", 100), cursor=request.query.get("cursor")
    )
    return _json(page)


async def update_key(request: web.Request, accounts: AccountStore) -> web.Response:
    changes = await _read_json(request, dict[str, Any])
    key_id = request.match_info["id"]
    before = await accounts.key_by_id(key_id)
    after = await accounts.update_key(key_id, changes)
    record(admin_actor(request), "key.update", key_id, before, after)
    return _json(after)


async def rotate_key(request: web.Request, accounts: AccountStore) -> web.Response:
    body = await _read_json(request, RotateKeyBody, optional=True)
    key_id = request.match_info["id"]
    before = await accounts.key_by_id(key_id)
    rotated = await accounts.rotate_key(key_id, body.grace_s)
    after = rotated.without_secret()
    record(admin_actor(request), "key.rotate", key_id, before, after)  # never the secret
    return _json({**after, "key": rotated.key})  # the only time the new key is shown


async def revoke_key(request: web.Request, accounts: AccountStore) -> web.Response:
    key_id = request.match_info["id"]
    before = await accounts.key_by_id(key_id)
    revoked = await accounts.revoke_key(key_id)
    record(admin_actor(request), "key.revoke", revoked.id, before, revoked)
    return _json(revoked)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/admin/accounts", _admin(create_account))
    r.add_get("/admin/accounts", _admin(list_accounts))
    r.add_get("/admin/accounts/{id}", _admin(show_account))
    r.add_patch("/admin/accounts/{id}", _admin(update_account))
    r.add_post("/admin/accounts/{id}/topup", _admin(topup))
    r.add_delete("/admin/accounts/{id}", _admin(delete_account))
    r.add_post("/admin/accounts/{id}/disable", _admin(disable_account))
    r.add_post("/admin/accounts/{id}/enable", _admin(enable_account))
    r.add_post("/admin/accounts/{id}/adjust", _admin(adjust))
    r.add_get("/admin/accounts/{id}/ledger", _admin(ledger))
    r.add_post("/admin/keys", _admin(create_key))
    r.add_get("/admin/keys", _admin(list_keys))
    r.add_patch("/admin/keys/{id}", _admin(update_key))
    r.add_post("/admin/keys/{id}/rotate", _admin(rotate_key))
    r.add_delete("/admin/keys/{id}", _admin(revoke_key))
