"""The webhook outbox in storage (docs/webhooks.md): events raised once, claimed, settled.

What it promises, on every instance alike (the state is in storage, never in a process):

- :meth:`Outbox.raise_event` writes an event for one webhook in one atomic step
  (``lua/webhook_raise.lua``) and only the first time its delivery id is raised: the id is
  deterministic (the event's type, account and threshold or period, and what crossed it),
  so several instances seeing the same crossing raise one event. Once it returns, the
  event survives any gateway crash.
- :meth:`Outbox.claim` hands due events to one deliverer under a lease
  (``lua/webhook_claim.lua``): no other instance takes them until the lease lapses, which
  it does by itself if that deliverer dies.
- :meth:`Outbox.delivered` and :meth:`Outbox.drop` remove an event; :meth:`Outbox.retry_at`
  sets its next attempt, unless it is gone already (another deliverer finished it).

Knows no HTTP: webhook_delivery.py posts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from .keyspace import (
    WEBHOOK_ENDPOINTS,
    WEBHOOK_OUTBOX,
    WEBHOOK_RECORDS,
    webhook_seen,
)
from .storage import Storage

# A raised event's id is remembered this long past the lifetime of its delivery, so a scan
# raising it again (key.expiring, upstream_key.unhealthy) stays a no-op.
DEDUPE_MARGIN_S = 31 * 86400


class Payload(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON body every receiver gets (the same bytes on every attempt)."""

    id: str
    type: str
    created_at: str  # RFC 3339, UTC
    account: str | None
    data: dict[str, object]


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """What the outbox keeps of one delivery: to whom, what, since when."""

    webhook: str  # Webhook.name: "global:<i>" or "account:<id>"
    event_id: str
    type: str
    body: str  # the payload's JSON, sent as is
    created_ms: int


@dataclass(frozen=True, slots=True)
class Claimed:
    delivery_id: str
    record: Record


_record_decoder = msgspec.json.Decoder(Record)


def delivery_id(webhook: str, event_id: str) -> str:
    return f"{webhook}/{event_id}"


def now_iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class Outbox:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def raise_event(
        self,
        webhook: str,
        event_id: str,
        event_type: str,
        account: str | None,
        data: Mapping[str, object],
        lifetime_s: float,
    ) -> bool:
        """Put the event in the outbox for ``webhook``; False when it was raised before."""
        created_ms = int(time.time() * 1000)
        payload = Payload(
            id=event_id,
            type=event_type,
            created_at=now_iso(created_ms),
            account=account,
            data=dict(data),
        )
        record = Record(
            webhook=webhook,
            event_id=event_id,
            type=event_type,
            body=msgspec.json.encode(payload).decode(),
            created_ms=created_ms,
        )
        ident = delivery_id(webhook, event_id)
        marker_ms = int((lifetime_s + DEDUPE_MARGIN_S) * 1000)
        added = await self._storage.run(
            "webhook_raise",
            [webhook_seen(ident), WEBHOOK_OUTBOX, WEBHOOK_RECORDS],
            [ident, msgspec.json.encode(record).decode(), marker_ms],
        )
        return int(added) == 1

    async def claim(self, limit: int, lease_ms: int) -> tuple[int, list[Claimed]]:
        """Up to ``limit`` due events, leased for ``lease_ms``; and storage's time now (ms)."""
        reply = await self._storage.run(
            "webhook_claim", [WEBHOOK_OUTBOX, WEBHOOK_RECORDS], [limit, lease_ms]
        )
        now_ms = int(reply[0])
        claimed = []
        for i in range(1, len(reply), 2):
            try:
                record = _record_decoder.decode(reply[i + 1])
            except msgspec.DecodeError:
                await self.drop(str(reply[i]))  # not ours to read: never retried forever
                continue
            claimed.append(Claimed(str(reply[i]), record))
        return now_ms, claimed

    async def delivered(self, ident: str) -> None:
        await self.drop(ident)

    async def drop(self, ident: str) -> None:
        await self._storage.call_many(
            [("ZREM", WEBHOOK_OUTBOX, ident), ("HDEL", WEBHOOK_RECORDS, ident)], atomic=True
        )

    async def retry_at(self, ident: str, due_ms: int) -> None:
        await self._storage.call("ZADD", WEBHOOK_OUTBOX, "XX", due_ms, ident)

    async def depth(self) -> int:
        return int(await self._storage.call("ZCARD", WEBHOOK_OUTBOX))


class AccountWebhook(msgspec.Struct, frozen=True, kw_only=True):
    """An account's own webhook as stored (and shown, without ``secret``)."""

    url: str
    events: tuple[str, ...]
    balance_below_usd: str | None = None
    key_expiring_within_s: float | None = None
    secret: str = ""  # whsec_<base64>, made by the gateway


class AccountWebhooks:
    """Accounts' own webhooks (docs/webhooks.md), one per account, in one hash."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def all(self) -> dict[str, AccountWebhook]:
        raw = await self._storage.call("HGETALL", WEBHOOK_ENDPOINTS)
        found = {}
        for account, text in raw.items():
            try:
                found[str(account)] = msgspec.json.decode(text, type=AccountWebhook)
            except msgspec.DecodeError:
                continue  # not one we wrote: ignored, never a crash of every deliverer
        return found

    async def get(self, account: str) -> AccountWebhook | None:
        text = await self._storage.call("HGET", WEBHOOK_ENDPOINTS, account)
        return None if text is None else msgspec.json.decode(text, type=AccountWebhook)

    async def put(self, account: str, webhook: AccountWebhook) -> None:
        await self._storage.call(
            "HSET", WEBHOOK_ENDPOINTS, account, msgspec.json.encode(webhook).decode()
        )

    async def delete(self, account: str) -> bool:
        return bool(await self._storage.call("HDEL", WEBHOOK_ENDPOINTS, account))
