"""Delivering the webhook outbox (docs/webhooks.md), in every gateway process, off every
request's path.

What :class:`WebhookDelivery` promises:

- It claims due events (a lease in storage: no other instance posts them meanwhile; a
  crashed deliverer's lease lapses and another delivers) and POSTs each to its webhook's
  URL: the event's JSON, the same bytes and ``webhook-id`` on every attempt, signed as
  Standard Webhooks sign (:func:`signature`). At most ``concurrency`` POSTs at once per
  process, each ended within ``timeout_s``; redirects are not followed.
- A 2xx is delivered: the event leaves the outbox. Anything else is retried after
  ``first_retry_s``, then after as long as the event has waited so far (so the waits
  double), at most ``max_retry_s``; an event whose next attempt would fall past
  ``lifetime_s`` from its raising is dropped. So is, at the end of its lifetime, one whose
  webhook this instance does not know (removed, or not read here yet: it is retried, never
  dropped at once). Delivery is at least once: receivers dedupe by ``webhook-id``.
- It keeps the accounts' own webhooks current (read every :data:`ENDPOINTS_REFRESH_S`) and
  claims nothing before it has read them once; it runs the event scans
  (webhook_events.py) and keeps the outbox-depth gauge current.
- Storage failing or a receiver failing only delays it, logged at most once per
  :data:`FAILURE_LOG_INTERVAL_S`; an unexpected error is logged and never ends the loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import aiohttp

from .metrics import Metrics, labelled
from .money import parse_usd
from .settings import Provider, Settings, Webhook
from .settings.webhooks import secret_key
from .storage import StorageError
from .webhook_events import WebhookEvents
from .webhook_outbox import AccountWebhook, AccountWebhooks, Claimed

log = logging.getLogger("ratelimit_gw.webhooks")

UPSTREAM_SCAN_S = 5.0  # how soon an unhealthy upstream key's event is raised
ENDPOINTS_REFRESH_S = 5.0  # how soon an account's webhook set over the admin API is used
DEPTH_REFRESH_S = 5.0
LEASE_MARGIN_S = 5.0  # a lease outlasts the POST's timeout by this much
FAILURE_LOG_INTERVAL_S = 60.0


def signature(secret: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """``v1,`` and the base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` (Standard Webhooks)."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def account_webhook(account: str, stored: AccountWebhook) -> Webhook:
    return Webhook(
        name=f"account:{account}",
        url=stored.url,
        secret=secret_key(stored.secret),
        events=frozenset(stored.events),
        balance_below_nano=(
            None if stored.balance_below_usd is None else parse_usd(stored.balance_below_usd)
        ),
        key_expiring_within_s=stored.key_expiring_within_s,
        account=account,
    )


class WebhookDirectory:
    """Every webhook now: the config's (read at each call, so a reload applies) and the
    accounts' own (as last read from storage)."""

    def __init__(self, settings: Callable[[], Settings], stored: AccountWebhooks) -> None:
        self._settings = settings
        self._stored = stored
        self._by_account: dict[str, Webhook] = {}
        self.loaded = False  # the accounts' own read at least once

    def for_account(self, account: str | None) -> Sequence[Webhook]:
        own = None if account is None else self._by_account.get(account)
        webhooks = self._settings().webhooks
        return webhooks if own is None else (*webhooks, own)

    def any_wants(self, event_type: str) -> bool:
        return any(
            event_type in w.events for w in (*self._settings().webhooks, *self._by_account.values())
        )

    def named(self, name: str) -> Webhook | None:
        kind, _, account = name.partition(":")
        if kind == "account":
            return self._by_account.get(account)
        return next((w for w in self._settings().webhooks if w.name == name), None)

    async def refresh(self) -> None:
        found = {}
        for account, stored in (await self._stored.all()).items():
            try:
                found[account] = account_webhook(account, stored)
            except ValueError:  # not one the admin API wrote
                log.error("account %s has an unreadable webhook in storage: ignored", account)
        self._by_account = found
        self.loaded = True


class WebhookDelivery:
    """One process's delivery loop: :meth:`run` until :meth:`stop` (or cancelled)."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        directory: WebhookDirectory,
        events: WebhookEvents,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._directory = directory
        self._events = events
        self._outbox = events.outbox
        self._metrics = metrics
        self._running = True
        self._posting: set[asyncio.Task[None]] = set()
        self._due: dict[str, float] = {}  # periodic step → its next monotonic time
        self._quiet_until = 0.0

    def stop(self) -> None:
        self._running = False

    async def run(self) -> None:
        session = aiohttp.ClientSession(
            headers={"User-Agent": "ratelimit-gw-webhooks"}, auto_decompress=False
        )
        try:
            while self._running:
                await self._periodic()
                claimed = 0
                if self._directory.loaded:
                    claimed = await self._guarded("claiming webhook events", self._claim(session))
                if claimed == 0:
                    await asyncio.sleep(self._settings().webhook_delivery.poll_interval_s)
                else:
                    await asyncio.sleep(0)
        finally:
            posting = list(self._posting)
            for task in posting:
                task.cancel()  # their leases lapse: another turn (or instance) posts them
            if posting:
                await asyncio.wait(posting)
            await session.close()

    async def _periodic(self) -> None:
        delivery = self._settings().webhook_delivery
        providers: Iterable[Provider] = self._settings().providers.values()
        steps: tuple[tuple[str, float, Callable[[], Awaitable[object]]], ...] = (
            ("reading accounts' webhooks", ENDPOINTS_REFRESH_S, self._directory.refresh),
            (
                "scanning upstream keys",
                UPSTREAM_SCAN_S,
                lambda: self._events.scan_upstream(providers),
            ),
            ("scanning expiring keys", delivery.key_scan_interval_s, self._events.scan_keys),
            ("reading the outbox depth", DEPTH_REFRESH_S, self._read_depth),
        )
        for doing, every_s, step in steps:
            now = time.monotonic()
            if now >= self._due.get(doing, 0.0):
                self._due[doing] = now + every_s
                await self._guarded(doing, step())

    async def _read_depth(self) -> None:
        self._metrics.webhook_outbox_events.set(await self._outbox.depth())

    async def _guarded(self, doing: str, step: Awaitable[object]) -> int:
        try:
            result = await step
        except StorageError as exc:
            self._log_failure(logging.INFO, "%s failed (%s); trying again", doing, exc)
            return 0
        except Exception:  # never stop over a bug: events would wait for a restart
            self._log_failure(logging.ERROR, "%s failed", doing, exc_info=True)
            return 0
        return result if isinstance(result, int) else 0

    def _log_failure(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + FAILURE_LOG_INTERVAL_S
            log.log(level, message, *args, exc_info=exc_info)

    async def _claim(self, session: aiohttp.ClientSession) -> int:
        delivery = self._settings().webhook_delivery
        free = delivery.concurrency - len(self._posting)
        if free <= 0:
            return 0
        lease_ms = int((delivery.timeout_s + LEASE_MARGIN_S) * 1000)
        now_ms, claimed = await self._outbox.claim(free, lease_ms)
        for event in claimed:
            task = asyncio.create_task(self._deliver(session, event, now_ms))
            self._posting.add(task)
            task.add_done_callback(self._posting.discard)
        return len(claimed)

    async def _deliver(self, session: aiohttp.ClientSession, event: Claimed, now_ms: int) -> None:
        record = event.record
        delivery = self._settings().webhook_delivery
        lifetime_ms = delivery.lifetime_s * 1000
        try:
            if now_ms - record.created_ms > lifetime_ms:
                await self._drop(event, "its lifetime ended")
                return
            started = time.monotonic()
            webhook = self._directory.named(record.webhook)
            problem: str | None
            if webhook is None:
                # Not (yet) known here: another instance may have read a newer account
                # webhook or config. Kept until its lifetime ends, never posted blind.
                problem = "its webhook is not configured on this instance"
            else:
                problem = await self._post(session, webhook, record.event_id, record.body.encode())
                if problem is None:
                    await self._outbox.delivered(event.delivery_id)
                    labelled(self._metrics.webhook_deliveries, record.type, "delivered").inc()
                    return
                labelled(self._metrics.webhook_deliveries, record.type, "failed").inc()
            tried_ms = now_ms + int((time.monotonic() - started) * 1000)
            waited_s = (tried_ms - record.created_ms) / 1000
            wait_s = min(max(waited_s, delivery.first_retry_s), delivery.max_retry_s)
            due_ms = tried_ms + int(wait_s * random.uniform(0.9, 1.1) * 1000)
            if due_ms - record.created_ms > lifetime_ms:
                await self._drop(event, f"its lifetime ends before the next attempt ({problem})")
                return
            self._log_failure(
                logging.WARNING,
                "webhook event %s for %s: %s; retrying in %.3g s",
                record.event_id,
                record.webhook if webhook is None else webhook.url,
                problem,
                wait_s,
            )
            await self._outbox.retry_at(event.delivery_id, due_ms)
        except StorageError as exc:  # the lease lapses: it is posted again
            self._log_failure(logging.INFO, "settling webhook %s failed: %s", record.event_id, exc)

    async def _drop(self, event: Claimed, why: str) -> None:
        await self._outbox.drop(event.delivery_id)
        labelled(self._metrics.webhook_deliveries, event.record.type, "dropped").inc()
        log.warning(
            "webhook event %s for %s dropped: %s", event.record.event_id, event.record.webhook, why
        )

    async def _post(
        self, session: aiohttp.ClientSession, webhook: Webhook, event_id: str, body: bytes
    ) -> str | None:
        """None when the receiver took it (2xx), else what went wrong."""
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(webhook.secret, event_id, timestamp, body),
        }
        timeout = aiohttp.ClientTimeout(total=self._settings().webhook_delivery.timeout_s)
        try:
            async with session.post(
                webhook.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"answered {response.status}"
        except TimeoutError:
            return "timed out"
        except aiohttp.ClientError as exc:
            return f"failed ({type(exc).__name__}: {exc})"
