"""A ledger with one of every entry type, written the way the gateway writes it (the admission
and settlement scripts through Limiter, top-ups and deletes through AccountStore), and the
archiving of it: what the archive tests report on and page through."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.archive.archiver import Archiver, PassResult
from ratelimit_gw.archive.database import ArchiveDatabase
from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.limiter import AdmissionRequest, Limiter, Settlement
from ratelimit_gw.money import parse_usd
from ratelimit_gw.settings import ArchiveSettings
from ratelimit_gw.storage import Storage

MODELS = ("gpt-4o-mini", "claude-3-5-haiku")
ACCOUNTS = ("acme", "beta")


@dataclass
class Workload:
    keys: dict[str, list[str]] = field(default_factory=dict)  # account → its key ids
    # account → every ledger entry as Redis held it before archiving: (id, fields)
    ledgers: dict[str, list[tuple[str, dict[str, str]]]] = field(default_factory=dict)


async def redis_ms(storage: Storage) -> float:
    seconds, micros = await storage.call("TIME")
    return int(seconds) * 1000 + int(micros) / 1000


async def _admit(limiter: Limiter, account: str, key_id: str, ttl_ms: int) -> AdmissionRequest:
    request = AdmissionRequest(
        account_id=account,
        key_id=key_id,
        request_id=f"req-{uuid.uuid4().hex}",
        estimated_tokens=100,
        hold_nano=parse_usd("0.20"),
        ttl_ms=ttl_ms,
    )
    assert (await limiter.admit(request)).allowed
    return request


async def _settle(
    limiter: Limiter, request: AdmissionRequest, model: str, cost_usd: str, n: int
) -> None:
    await limiter.settle(
        Settlement(
            account_id=request.account_id,
            key_id=request.key_id,
            request_id=request.request_id,
            estimated_tokens=request.estimated_tokens,
            input_tokens=100 + n,
            output_tokens=20 + n,
            cost_nano=parse_usd(cost_usd),
            model=model,
            outcome="ok",
            cache_read_tokens=n % 3,
            cache_write_tokens=n % 2,
        )
    )


async def write_workload(storage: Storage, requests_per_key: int = 3) -> Workload:
    """Top-ups, an adjustment, charges with tokens on two models and three keys, releases,
    a hold that expired (then settled late: a charge), and a forced delete (a forfeit)."""
    accounts = AccountStore(storage)
    limiter = Limiter(storage)
    work = Workload()
    await accounts.create_account("acme", balance_nano=parse_usd("10.00"))
    await accounts.create_account("beta", balance_nano=parse_usd("5.00"))
    for account, count in (("acme", 2), ("beta", 1)):
        work.keys[account] = [(await accounts.create_key(account)).record.id for _ in range(count)]
    await accounts.topup("acme", parse_usd("2.50"), "invoice-1")
    await accounts.adjust("acme", parse_usd("-0.75", signed=True), "refund of ticket 1", "adjust-1")
    n = 0
    for account, key_ids in work.keys.items():
        for key_id in key_ids:
            for i in range(requests_per_key):
                n += 1
                request = await _admit(limiter, account, key_id, 60_000)
                # Every third request costs nothing: a release, not a charge.
                cost = "0" if i % 3 == 2 else f"0.{n:02d}0001"
                await _settle(limiter, request, MODELS[n % 2], cost, n)
    # A hold nobody settles in time: the next admission sweeps it (hold_expired); its gateway
    # comes back and settles late (a charge all the same).
    key_id = work.keys["acme"][0]
    abandoned = await _admit(limiter, "acme", key_id, 200)
    deadline = await redis_ms(storage) + 250
    while await redis_ms(storage) <= deadline:
        await asyncio.sleep(0.05)
    sweeper = await _admit(limiter, "acme", key_id, 60_000)
    await _settle(limiter, sweeper, MODELS[0], "0.000000007", 7)
    await _settle(limiter, abandoned, MODELS[1], "0.030000003", 8)
    await accounts.delete_account("beta", force=True)
    for account in ACCOUNTS:
        work.ledgers[account] = await ledger_fields(storage, account)
    types = {f["type"] for entries in work.ledgers.values() for _, f in entries}
    assert {"topup", "adjustment", "charge", "release", "hold_expired", "forfeit"} <= types
    return work


async def ledger_fields(storage: Storage, account: str) -> list[tuple[str, dict[str, str]]]:
    """The account's whole stream as Redis holds it, oldest first."""
    rows = await storage.call("XRANGE", AccountKeys(account).ledger, "-", "+")
    return [(entry_id, _pairs(fields)) for entry_id, fields in rows]


def _pairs(fields: Any) -> dict[str, str]:
    if isinstance(fields, dict):
        return dict(fields)
    return dict(zip(fields[::2], fields[1::2], strict=True))


async def balance_nano(storage: Storage, account: str) -> int:
    return int(await storage.call("HGET", AccountKeys(account).account, "balance_nano") or 0)


async def archive(storage: Storage, url: str, retention_s: float = 86400.0) -> PassResult:
    """Every pass it takes until the archive is complete (one, for these small ledgers)."""
    database = ArchiveDatabase(url)
    try:
        archiver = Archiver(storage, database, ArchiveSettings(url=url, retention_s=retention_s))
        while not (result := await archiver.archive_once()).complete:
            pass
        return result
    finally:
        await database.close()
