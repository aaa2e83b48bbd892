"""An account's own webhook (docs/webhooks.md#per-account-webhooks): set, shown and removed
through the admin API and the CLI, each change with its audit line (audit.py).

What it promises:

- One webhook per account, validated as a ``[[webhooks]]`` entry is (a known event, each
  event's threshold given and no other, an http(s) URL); ``upstream_key.unhealthy`` is about
  no account and stays global.
- Its secret is made by the gateway (``whsec_`` and 32 random bytes, base64: the Standard
  Webhooks form) when the webhook is first set, or again when asked (``new_secret``), and
  shown in that answer only; it is kept in storage, because signing needs it, and never
  shown again nor written to an audit line. Changing the URL, events or thresholds keeps it.
- Every delivering instance uses a change within ``ENDPOINTS_REFRESH_S`` (5 s).
"""

from __future__ import annotations

import base64
import secrets
from typing import Annotated

import msgspec
from aiohttp import web

from .accounts import AccountStore
from .admin_routes import UsdAmount, route_body
from .audit import admin_actor, record
from .management import AccountError
from .money import format_usd
from .settings import ConfigError
from .settings.webhooks import (
    EVENT_THRESHOLDS,
    GLOBAL_ONLY_EVENTS,
    SECRET_PREFIX,
    balance_threshold,
    check_events,
    check_thresholds,
    check_webhook_url,
)
from .webhook_outbox import AccountWebhook, AccountWebhooks

MAX_EXPIRING_WITHIN_S = 30 * 86400  # as the config's key_expiring_within_s
_ACCOUNT_EVENTS = [e for e in EVENT_THRESHOLDS if e not in GLOBAL_ONLY_EVENTS]
EventName = Annotated[str, msgspec.Meta(extra_json_schema={"enum": _ACCOUNT_EVENTS})]
ExpiringWithin = Annotated[
    float,
    msgspec.Meta(extra_json_schema={"exclusiveMinimum": 0, "maximum": MAX_EXPIRING_WITHIN_S}),
]


class SetWebhookBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: Annotated[str, msgspec.Meta(extra_json_schema={"format": "uri"})]
    events: list[EventName]
    balance_below_usd: UsdAmount | None = None  # required by balance.low, only with it
    key_expiring_within_s: ExpiringWithin | None = None  # required by key.expiring
    new_secret: bool = False  # make a new secret (the old one stops signing at once)


class AccountWebhookView(msgspec.Struct, kw_only=True):
    """An account's webhook as the API shows it; ``secret`` only in the answer that made it."""

    url: str
    events: list[str]
    balance_below_usd: str | None
    key_expiring_within_s: float | None
    secret: str | None = None


class AccountWebhookShown(msgspec.Struct, kw_only=True):
    """An account and its own webhook (None: it has none)."""

    account: str
    webhook: AccountWebhookView | None


def _view(stored: AccountWebhook, *, secret: bool = False) -> AccountWebhookView:
    return AccountWebhookView(
        url=stored.url,
        events=list(stored.events),
        balance_below_usd=stored.balance_below_usd,
        key_expiring_within_s=stored.key_expiring_within_s,
        secret=stored.secret if secret else None,
    )


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


class WebhookChanges:
    """Accounts' webhooks changed by ``actor`` (an admin token's name, or ``cli:<user>``)."""

    def __init__(self, accounts: AccountStore, actor: str) -> None:
        self._stored = AccountWebhooks(accounts.storage)
        self._accounts = accounts
        self._actor = actor

    async def show(self, account: str) -> AccountWebhookShown:
        await self._accounts.get_account(account)  # 404 for no such account
        stored = await self._stored.get(account)
        return AccountWebhookShown(
            account=account, webhook=None if stored is None else _view(stored)
        )

    async def set(self, account: str, body: SetWebhookBody) -> AccountWebhookShown:
        """Set (or replace) the account's webhook; the answer shows a secret made now."""
        stored = self._checked(body)
        found = await self._accounts.get_account(account)
        if found.status == "deleted":
            raise AccountError(409, "account_deleted", f"account {account!r} is deleted")
        before = await self._stored.get(account)
        made = before is None or body.new_secret or not before.secret
        secret = new_secret() if made or before is None else before.secret
        stored = msgspec.structs.replace(stored, secret=secret)
        await self._stored.put(account, stored)
        shown_before = AccountWebhookShown(
            account=account, webhook=None if before is None else _view(before)
        )
        after = AccountWebhookShown(account=account, webhook=_view(stored))
        record(self._actor, "webhook.set", account, shown_before, after)
        return AccountWebhookShown(account=account, webhook=_view(stored, secret=made))

    async def delete(self, account: str) -> AccountWebhookShown:
        """Remove it; 404 ``webhook_not_found`` when it has none."""
        before = await self.show(account)
        if before.webhook is None or not await self._stored.delete(account):
            raise AccountError(
                404, "webhook_not_found", f"account {account!r} has no webhook of its own"
            )
        after = AccountWebhookShown(account=account, webhook=None)
        record(self._actor, "webhook.delete", account, before, after)
        return after

    @staticmethod
    def _checked(body: SetWebhookBody) -> AccountWebhook:
        try:
            check_webhook_url(body.url, "url")
            events = check_events(body.events, "events", account=True)
            check_thresholds(
                events,
                {
                    "balance_below_usd": body.balance_below_usd,
                    "key_expiring_within_s": body.key_expiring_within_s,
                },
                "$",
            )
            threshold = balance_threshold(body.balance_below_usd, "balance_below_usd")
        except ConfigError as exc:
            raise AccountError(400, "invalid_request", str(exc).removeprefix("$.")) from None
        within = body.key_expiring_within_s
        if within is not None and not 0 < within <= MAX_EXPIRING_WITHIN_S:
            raise AccountError(
                400,
                "invalid_request",
                f"key_expiring_within_s: must be above 0 and at most {MAX_EXPIRING_WITHIN_S}",
            )
        return AccountWebhook(
            url=body.url,
            events=tuple(e for e in EVENT_THRESHOLDS if e in events),
            balance_below_usd=None if threshold is None else format_usd(threshold),
            key_expiring_within_s=within,
        )


# --- admin API handlers (their routes: admin.ROUTES) -----------------------------------------


def _changes(request: web.Request, accounts: AccountStore) -> WebhookChanges:
    return WebhookChanges(accounts, admin_actor(request))


def _json(view: AccountWebhookShown) -> web.Response:
    return web.Response(body=msgspec.json.encode(view), content_type="application/json")


async def set_account_webhook(request: web.Request, accounts: AccountStore) -> web.Response:
    body = route_body(request, SetWebhookBody)
    return _json(await _changes(request, accounts).set(request.match_info["id"], body))


async def show_account_webhook(request: web.Request, accounts: AccountStore) -> web.Response:
    return _json(await _changes(request, accounts).show(request.match_info["id"]))


async def delete_account_webhook(request: web.Request, accounts: AccountStore) -> web.Response:
    return _json(await _changes(request, accounts).delete(request.match_info["id"]))
