"""The admin API (docs/admin.md): accounts, keys, top-ups and the ledger, behind named tokens.

Every endpoint is one entry of :data:`ROUTES` (see :mod:`ratelimit_gw.admin_routes`): that
entry registers it, guards it and documents it at ``/admin/openapi.json``. USD amounts
travel as decimal strings, never floats.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from .accounts import Account, AccountStore, KeyRecord, LedgerEntry, RpmPolicy
from .admin_openapi import openapi_json
from .admin_routes import (
    AccountId,
    AdminRoute,
    IdempotencyKey,
    KeyId,
    PositiveCount,
    QueryParam,
    UsdAmount,
    register,
    route_body,
)
from .audit import admin_actor, record
from .errors import GatewayError
from .limits import NO_LIMITS, Limits, flatten
from .money import MoneyError, parse_usd

# --- bodies ----------------------------------------------------------------------------------


class CreateAccountBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: AccountId
    balance_usd: UsdAmount | None = None
    limits: Limits = NO_LIMITS  # flat in the body: rpm, tpm, concurrency
    rpm_policy: RpmPolicy = "fixed"
    rpm_override: PositiveCount | None = None


class UpdateAccountBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Only the fields sent change; null clears a limit or the override."""

    rpm: PositiveCount | UnsetType | None = UNSET
    tpm: PositiveCount | UnsetType | None = UNSET
    concurrency: PositiveCount | UnsetType | None = UNSET
    rpm_override: PositiveCount | UnsetType | None = UNSET
    rpm_policy: RpmPolicy | UnsetType = UNSET
    prepaid: bool | UnsetType = UNSET


class TopupBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    amount_usd: UsdAmount
    idempotency_key: IdempotencyKey  # not starting with "rlgw:" (the gateway's own)


class CreateKeyBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    account: AccountId
    name: str = ""
    limits: Limits = NO_LIMITS  # flat in the body: rpm, tpm, concurrency
    models: list[str] | None = None
    expires_at: str | None = None


# --- answers ---------------------------------------------------------------------------------


class AccountIds(msgspec.Struct, kw_only=True):
    data: list[str]


class Keys(msgspec.Struct, kw_only=True):
    data: list[KeyRecord]


class Ledger(msgspec.Struct, kw_only=True):
    data: list[LedgerEntry]  # newest first


class Topup(msgspec.Struct, kw_only=True):
    credited: bool  # false: this idempotency key was already credited
    account: Account


class IssuedKey(KeyRecord, frozen=True, kw_only=True):
    key: str  # the only time the key is ever shown


def _usd(text: str, *, positive: bool = False) -> int:
    try:
        return parse_usd(text, allow_zero=not positive)
    except MoneyError as exc:
        raise GatewayError(400, "invalid_amount", str(exc)) from None


def _json(document: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(flatten(document)), status=status, content_type="application/json"
    )


# --- handlers --------------------------------------------------------------------------------


async def create_account(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, CreateAccountBody)
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
    return _json(AccountIds(data=await accounts.list_accounts()))


async def show_account(request: web.Request, accounts: AccountStore) -> web.Response:
    return _json(await accounts.get_account(request.match_info["id"]))


async def update_account(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, UpdateAccountBody)
    changes: dict[str, Any] = {
        name: value for name, value in msgspec.structs.asdict(body).items() if value is not UNSET
    }
    account_id = request.match_info["id"]
    before = await accounts.get_account(account_id)
    after = await accounts.update_account(account_id, changes)
    record(admin_actor(request), "account.update", account_id, before, after)
    return _json(after)


async def topup(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, TopupBody)
    account_id = request.match_info["id"]
    before = await accounts.get_account(account_id)
    credited = await accounts.topup(
        account_id, _usd(body.amount_usd, positive=True), body.idempotency_key
    )
    account = await accounts.get_account(account_id)
    if credited:
        record(admin_actor(request), "account.topup", account_id, before, account)
    return _json(Topup(credited=credited, account=account))


async def ledger(request: web.Request, accounts: AccountStore) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise GatewayError(400, "invalid_request", "limit must be an integer") from None
    entries = await accounts.ledger(request.match_info["id"], max(1, min(limit, 10_000)))
    return _json(Ledger(data=entries))


async def create_key(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, CreateKeyBody)
    created = await accounts.create_key(
        body.account,
        name=body.name,
        models=body.models,
        limits=body.limits,
        expires_at=body.expires_at,
    )
    record(admin_actor(request), "key.create", created.record.id, None, created.record)
    issued = IssuedKey(**msgspec.structs.asdict(created.record), key=created.key)
    return _json(issued, status=201)


async def list_keys(request: web.Request, accounts: AccountStore) -> web.Response:
    account_id = request.query.get("account")
    if not account_id:
        raise GatewayError(400, "invalid_request", "the account query parameter is required")
    return _json(Keys(data=await accounts.list_keys(account_id)))


async def revoke_key(request: web.Request, accounts: AccountStore) -> web.Response:
    revoked = await accounts.revoke_key(request.match_info["id"])
    record(admin_actor(request), "key.revoke", revoked.id, None, revoked)
    return _json(revoked)


async def openapi(request: web.Request, accounts: AccountStore) -> web.Response:
    return web.Response(body=openapi_json(ROUTES), content_type="application/json")


# --- the route table: an endpoint is one entry here (docs/admin.md) --------------------------

ROUTES: tuple[AdminRoute, ...] = (
    AdminRoute(
        "POST",
        "/admin/accounts",
        create_account,
        "Create an account",
        Account,
        status=201,
        body=CreateAccountBody,
        errors=(409,),
    ),
    AdminRoute("GET", "/admin/accounts", list_accounts, "List account ids", AccountIds),
    AdminRoute(
        "GET",
        "/admin/accounts/{id}",
        show_account,
        "Show an account",
        Account,
        path_types={"id": AccountId},
    ),
    AdminRoute(
        "PATCH",
        "/admin/accounts/{id}",
        update_account,
        "Change an account's limits, rpm policy or prepaid flag",
        Account,
        body=UpdateAccountBody,
        path_types={"id": AccountId},
    ),
    AdminRoute(
        "POST",
        "/admin/accounts/{id}/topup",
        topup,
        "Credit an account once per idempotency key",
        Topup,
        body=TopupBody,
        path_types={"id": AccountId},
        errors=(409,),
    ),
    AdminRoute(
        "GET",
        "/admin/accounts/{id}/ledger",
        ledger,
        "An account's ledger, newest first",
        Ledger,
        path_types={"id": AccountId},
        query=(QueryParam("limit", int, "entries to show, 1 to 10000 (default 100)"),),
    ),
    AdminRoute(
        "POST",
        "/admin/keys",
        create_key,
        "Issue a key (the only answer that shows it)",
        IssuedKey,
        status=201,
        body=CreateKeyBody,
    ),
    AdminRoute(
        "GET",
        "/admin/keys",
        list_keys,
        "An account's keys, without secrets",
        Keys,
        query=(QueryParam("account", AccountId, "the account whose keys to list", required=True),),
    ),
    AdminRoute(
        "DELETE",
        "/admin/keys/{id}",
        revoke_key,
        "Revoke a key",
        KeyRecord,
        path_types={"id": KeyId},
    ),
    AdminRoute(
        "GET", "/admin/openapi.json", openapi, "This document (OpenAPI 3.1)", dict[str, Any]
    ),
)


def add_routes(app: web.Application) -> None:
    register(app, ROUTES)
