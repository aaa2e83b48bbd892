"""The admin API (docs/admin.md): accounts, keys, top-ups and the ledger, behind named tokens.

Every endpoint is one entry of :data:`ROUTES` (see :mod:`ratelimit_gw.admin_routes`): that
entry registers it, guards it and documents it at ``/admin/openapi.json``. USD amounts
travel as decimal strings, never floats.
"""

from __future__ import annotations

import os
import signal
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from .account_webhooks import (
    AccountWebhookShown,
    SetWebhookBody,
    delete_account_webhook,
    set_account_webhook,
    show_account_webhook,
)
from .accounts import Account, AccountStore, Deletion, RpmPolicy
from .admin_archive import LEDGER_QUERY, USAGE_QUERY, ledger, usage
from .admin_openapi import openapi_json
from .admin_routes import (
    AccountId,
    AdminRoute,
    IdempotencyKey,
    KeyId,
    PositiveCount,
    QueryParam,
    SignedUsdAmount,
    UsdAmount,
    register,
    route_body,
)
from .archive.history import LedgerPage
from .archive.reports import UsageReport
from .audit import admin_actor, record
from .audited_changes import AuditedChanges
from .budgets import MAX_CUSTOM_PERIOD_S
from .config_reload import ConfigReload, NoConfigFile, reload_config
from .errors import GatewayError
from .keys import DEFAULT_GRACE_S, MAX_GRACE_S, MAX_PAGE, KeyPage, KeyRecord
from .limits import NO_LIMITS, Limits, flatten
from .model_limits import ModelLimitsBody
from .money import MoneyError, parse_usd
from .services import SERVICES
from .settings import ConfigError

# --- bodies ----------------------------------------------------------------------------------

BudgetPeriod = Literal["day", "week", "month", "custom"]
BudgetPeriodSeconds = Annotated[
    int, msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": MAX_CUSTOM_PERIOD_S})
]
TimeZone = Annotated[
    str,
    msgspec.Meta(
        description="An IANA time zone name", extra_json_schema={"examples": ["Europe/Paris"]}
    ),
]


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
    # A budget: its cap with its period (budget_period_s for custom); budget_usd null clears it.
    budget_usd: UsdAmount | UnsetType | None = UNSET
    budget_period: BudgetPeriod | UnsetType = UNSET
    budget_period_s: BudgetPeriodSeconds | UnsetType = UNSET
    timezone: TimeZone | UnsetType | None = UNSET  # null: [accounts] default_timezone
    # Per-model rpm/tpm limits, every pattern at once; null or {} clears them.
    model_limits: ModelLimitsBody | UnsetType | None = UNSET


class TopupBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    amount_usd: UsdAmount
    idempotency_key: IdempotencyKey  # not starting with "rlgw:" (the gateway's own)


class AdjustBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    amount_usd: SignedUsdAmount  # "-5.00" debits
    reason: Annotated[str, msgspec.Meta(extra_json_schema={"minLength": 1, "maxLength": 500})]
    idempotency_key: IdempotencyKey  # shared with top-ups: one key moves money once


class CreateKeyBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    account: AccountId
    name: str = ""
    limits: Limits = NO_LIMITS  # flat in the body: rpm, tpm, concurrency
    models: list[str] | None = None
    expires_at: str | None = None


class UpdateKeyBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Only the fields sent change; null clears a limit, the model list (every model) or the
    expiry (never)."""

    name: str | UnsetType = UNSET
    models: list[str] | UnsetType | None = UNSET
    expires_at: str | UnsetType | None = UNSET
    rpm: PositiveCount | UnsetType | None = UNSET
    tpm: PositiveCount | UnsetType | None = UNSET
    concurrency: PositiveCount | UnsetType | None = UNSET
    # A budget: its cap with its period (budget_period_s for custom); budget_usd null clears it.
    budget_usd: UsdAmount | UnsetType | None = UNSET
    budget_period: BudgetPeriod | UnsetType = UNSET
    budget_period_s: BudgetPeriodSeconds | UnsetType = UNSET
    # Per-model rpm/tpm limits, every pattern at once; null or {} clears them.
    model_limits: ModelLimitsBody | UnsetType | None = UNSET


class RotateKeyBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # How long the old secret keeps working; 0: it stops at once.
    grace_s: Annotated[
        int, msgspec.Meta(extra_json_schema={"minimum": 0, "maximum": MAX_GRACE_S})
    ] = DEFAULT_GRACE_S


# --- answers ---------------------------------------------------------------------------------


class AccountIds(msgspec.Struct, kw_only=True):
    data: list[str]


class Topup(msgspec.Struct, kw_only=True):
    credited: bool  # false: this idempotency key was already credited
    account: Account


class IssuedKey(KeyRecord, frozen=True, kw_only=True):
    key: str  # the only time the key is ever shown


class Adjustment(msgspec.Struct, kw_only=True):
    adjusted: bool  # false: this idempotency key already moved money
    account: Account


class RotatedKey(KeyRecord, frozen=True, kw_only=True):
    key: str  # the new secret, shown this once
    old_key_expires_at: str  # when the old secret stops working


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


def _sent_fields(body: msgspec.Struct) -> dict[str, Any]:
    """The fields a PATCH body sent (null included: it clears)."""
    sent = msgspec.structs.asdict(body).items()
    return {name: value for name, value in sent if value is not UNSET}


def _json(document: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(flatten(document)), status=status, content_type="application/json"
    )


# --- handlers --------------------------------------------------------------------------------


def _by(request: web.Request, accounts: AccountStore) -> AuditedChanges:
    """The changes this request may make, each audited as made by its token's name."""
    return AuditedChanges(accounts, admin_actor(request))


async def create_account(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, CreateAccountBody)
    account = await _by(request, accounts).create_account(
        body.id,
        balance_nano=None if body.balance_usd is None else _usd(body.balance_usd),
        limits=body.limits,
        rpm_policy=body.rpm_policy,
        rpm_override=body.rpm_override,
    )
    return _json(account, status=201)


async def list_accounts(request: web.Request, accounts: AccountStore) -> web.Response:
    return _json(AccountIds(data=await accounts.list_accounts()))


async def show_account(request: web.Request, accounts: AccountStore) -> web.Response:
    return _json(await accounts.get_account(request.match_info["id"]))


async def update_account(request: web.Request, accounts: AccountStore) -> web.Response:
    changes = _sent_fields(route_body(request, UpdateAccountBody))
    return _json(await _by(request, accounts).update_account(request.match_info["id"], changes))


async def topup(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, TopupBody)
    credited, account = await _by(request, accounts).topup(
        request.match_info["id"], _usd(body.amount_usd, positive=True), body.idempotency_key
    )
    return _json(Topup(credited=credited, account=account))


async def disable_account(request: web.Request, accounts: AccountStore) -> web.Response:
    return _json(await _by(request, accounts).set_disabled(request.match_info["id"], True))


async def enable_account(request: web.Request, accounts: AccountStore) -> web.Response:
    return _json(await _by(request, accounts).set_disabled(request.match_info["id"], False))


async def delete_account(request: web.Request, accounts: AccountStore) -> web.Response:
    force = _query_flag(request, "force")
    return _json(await _by(request, accounts).delete_account(request.match_info["id"], force=force))


async def adjust(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, AdjustBody)
    amount = _usd(body.amount_usd, positive=True, signed=True)
    adjusted, account = await _by(request, accounts).adjust(
        request.match_info["id"], amount, body.reason, body.idempotency_key
    )
    return _json(Adjustment(adjusted=adjusted, account=account))


async def create_key(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, CreateKeyBody)
    created = await _by(request, accounts).create_key(
        body.account,
        name=body.name,
        models=body.models,
        limits=body.limits,
        expires_at=body.expires_at,
    )
    issued = IssuedKey(**msgspec.structs.asdict(created.record), key=created.key)
    return _json(issued, status=201)


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
    changes = _sent_fields(route_body(request, UpdateKeyBody))
    return _json(await _by(request, accounts).update_key(request.match_info["id"], changes))


async def rotate_key(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, RotateKeyBody)
    rotated = await _by(request, accounts).rotate_key(request.match_info["id"], body.grace_s)
    answer = RotatedKey(
        **msgspec.structs.asdict(rotated.record),
        key=rotated.key,
        old_key_expires_at=rotated.old_key_expires_at,
    )
    return _json(answer)


async def revoke_key(request: web.Request, accounts: AccountStore) -> web.Response:
    return _json(await _by(request, accounts).revoke_key(request.match_info["id"]))


async def reload_configuration(request: web.Request, accounts: AccountStore) -> web.Response:
    """The config file again, as SIGHUP does; audited with the file's digests, no secret."""
    svc = request.app[SERVICES]
    before = {"digest": svc.config.digest}
    try:
        reload = reload_config(svc)
    except NoConfigFile:
        raise GatewayError(
            409,
            "no_config_file",
            "This gateway was built without a config file; there is nothing to reload.",
        ) from None
    except ConfigError as exc:  # logged at ERROR and counted; the running config is kept
        raise GatewayError(
            400, "invalid_config", f"The config file is invalid, nothing changed: {exc}"
        ) from None
    # The after-state says what changed, by name: never a value, so never a secret.
    record(admin_actor(request), "config.reload", "config", before, reload)
    if svc.pool_parent_pid is not None:
        # One worker of a pool answered: its parent sends SIGHUP to every worker, so all of
        # them run on the file this one validated (this one again: a no-op, same digest).
        os.kill(svc.pool_parent_pid, signal.SIGHUP)
    return _json(reload)


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
        "Change an account's limits (per-model too), rpm policy, prepaid flag, budget or time zone",
        Account,
        body=UpdateAccountBody,
        path_types={"id": AccountId},
        errors=(409,),  # the account is deleted
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
        "POST",
        "/admin/accounts/{id}/adjust",
        adjust,
        "Credit or debit an account by hand, with a reason, once per idempotency key",
        Adjustment,
        body=AdjustBody,
        path_types={"id": AccountId},
        errors=(409,),
    ),
    AdminRoute(
        "POST",
        "/admin/accounts/{id}/disable",
        disable_account,
        "Disable an account: its keys get a 403 account_disabled on their next request",
        Account,
        path_types={"id": AccountId},
        errors=(409,),
    ),
    AdminRoute(
        "POST",
        "/admin/accounts/{id}/enable",
        enable_account,
        "Enable a disabled account",
        Account,
        path_types={"id": AccountId},
        errors=(409,),
    ),
    AdminRoute(
        "DELETE",
        "/admin/accounts/{id}",
        delete_account,
        "Delete an account (refused with a balance or live holds unless force=true); its "
        "ledger is kept and its id is never used again",
        Deletion,
        path_types={"id": AccountId},
        query=(QueryParam("force", bool, "forfeit the balance and cancel live holds"),),
        errors=(409,),
    ),
    AdminRoute(
        "GET",
        "/admin/accounts/{id}/ledger",
        ledger,
        "An account's ledger, newest first, a page at a time: Redis's recent entries, then "
        "the archive's older ones (with [archive])",
        LedgerPage,
        path_types={"id": AccountId},
        query=LEDGER_QUERY,
    ),
    AdminRoute(
        "GET",
        "/admin/usage",
        usage,
        "A usage report from the ledger archive: requests, tokens and USD per group, with "
        "exact totals and the time up to which the archive is complete",
        UsageReport,
        query=USAGE_QUERY,
        csv=True,
    ),
    AdminRoute(
        "POST",
        "/admin/keys",
        create_key,
        "Issue a key (the only answer that shows it)",
        IssuedKey,
        status=201,
        body=CreateKeyBody,
        errors=(409,),  # the account is deleted
    ),
    AdminRoute(
        "GET",
        "/admin/keys",
        list_keys,
        "Keys without secrets, of one account or of all, a page at a time",
        KeyPage,
        query=(
            QueryParam("account", AccountId, "only this account's keys (default: every account)"),
            QueryParam("limit", int, f"keys per page, 1 to {MAX_PAGE} (default 100)"),
            QueryParam("cursor", str, "the next_cursor of the page before"),
        ),
    ),
    AdminRoute(
        "PATCH",
        "/admin/keys/{id}",
        update_key,
        "Change a key's name, models, limits (per-model too), budget or expiry (in force "
        "within a second)",
        KeyRecord,
        body=UpdateKeyBody,
        path_types={"id": KeyId},
        errors=(409,),
    ),
    AdminRoute(
        "POST",
        "/admin/keys/{id}/rotate",
        rotate_key,
        "A new secret for the key (shown this once); the old one works for grace_s seconds",
        RotatedKey,
        body=RotateKeyBody,
        body_optional=True,
        path_types={"id": KeyId},
        errors=(409,),
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
        "POST",
        "/admin/config/reload",
        reload_configuration,
        "Read the config file again (as SIGHUP does): providers, models, prices, custom "
        "endpoints and admin tokens; an invalid file changes nothing (400 naming the field)",
        ConfigReload,
        errors=(400, 409),
    ),
    AdminRoute(
        "PUT",
        "/admin/accounts/{id}/webhook",
        set_account_webhook,
        "Set the account's own webhook (docs/webhooks.md); its secret is shown only in the "
        "answer that made it (the first, or new_secret=true)",
        AccountWebhookShown,
        body=SetWebhookBody,
        path_types={"id": AccountId},
        errors=(409,),  # the account is deleted
    ),
    AdminRoute(
        "GET",
        "/admin/accounts/{id}/webhook",
        show_account_webhook,
        "Show the account's own webhook, if it has one (never its secret)",
        AccountWebhookShown,
        path_types={"id": AccountId},
    ),
    AdminRoute(
        "DELETE",
        "/admin/accounts/{id}/webhook",
        delete_account_webhook,
        "Remove the account's own webhook (its undelivered events are dropped when their "
        "lifetime ends)",
        AccountWebhookShown,
        path_types={"id": AccountId},
    ),
    AdminRoute(
        "GET", "/admin/openapi.json", openapi, "This document (OpenAPI 3.1)", dict[str, Any]
    ),
)


def add_routes(app: web.Application) -> None:
    register(app, ROUTES)
