"""Disaster recovery from a lost Redis (docs/archive.md): account and key snapshots,
and `archive restore` rebuilding balances, spend, budgets, keys and top-up idempotency from
the archive into an empty Redis, on both backends and through the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.archive.archiver import Archiver
from ratelimit_gw.archive.database import ArchiveDatabase
from ratelimit_gw.archive.restore import RestoreRefused, restore
from ratelimit_gw.archive.snapshots import snapshot_all
from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.limits import Limits
from ratelimit_gw.money import parse_usd
from ratelimit_gw.settings import ArchiveSettings
from ratelimit_gw.storage import Storage
from ratelimit_gw.webhook_outbox import AccountWebhook, AccountWebhooks

from .cli_helpers import cli
from .conftest import Gateway, Upstream, start_gateway
from .http_helpers import auth, call

WEBHOOK_SECRET = "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LW9mLWJldGEtMDAwMDA="


async def chat(http: aiohttp.ClientSession, gw: Gateway, key: str) -> None:
    reply = await call(
        http,
        gw,
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        auth("openai", key),
    )
    assert reply.status == 200, reply.body


async def archive_everything(storage: Storage, url: str, pool: Any) -> None:
    database = ArchiveDatabase(url)
    try:
        archiver = Archiver(storage, database, ArchiveSettings(url=url))
        while not (await archiver.archive_once()).complete:
            pass
    finally:
        await database.close()
    await snapshot_all(storage, pool)


async def workload(
    storage: Storage, upstream: Upstream, http: aiohttp.ClientSession
) -> dict[str, str]:
    """Prepaid and postpaid accounts, top-ups, an adjustment, budgets, charges over HTTP, a
    rotated, a revoked and a deleted account's key; the secrets by name."""
    accounts = AccountStore(storage)
    await accounts.create_account("acme", balance_nano=parse_usd("10.00"), limits=Limits(rpm=600))
    await accounts.topup("acme", parse_usd("5.00"), "invoice-1")
    await accounts.adjust("acme", -parse_usd("1.25"), "goodwill reversed", "adj-1")
    await accounts.update_account(
        "acme", {"budget_usd": "100.00", "budget_period": "day", "timezone": "Europe/Paris"}
    )
    budgeted = await accounts.create_key("acme", name="budgeted", models=["gpt-4o*"])
    await accounts.update_key(budgeted.record.id, {"budget_usd": "50.00", "budget_period": "week"})
    rotated = await accounts.create_key("acme", name="rotated")
    revoked = await accounts.create_key("acme", name="revoked")
    await accounts.create_account("beta")  # postpaid
    await accounts.topup("beta", parse_usd("3.00"), "beta-credit")
    beta = await accounts.create_key("beta", limits=Limits(tpm=100_000))
    await AccountWebhooks(storage).put(
        "beta",
        AccountWebhook(
            url="https://hooks.example/beta", events=("budget.threshold",), secret=WEBHOOK_SECRET
        ),
    )
    await accounts.create_account("gone", balance_nano=parse_usd("2.00"))
    gone = await accounts.create_key("gone")
    runner, gw = await start_gateway(upstream, storage)
    try:
        for key in (budgeted.key, budgeted.key, rotated.key, beta.key, beta.key, gone.key):
            await chat(http, gw, key)
        new_secret = (await accounts.rotate_key(rotated.record.id, grace_s=3600)).key
        await chat(http, gw, new_secret)
        await gw.settled()
    finally:
        await runner.cleanup()
    await accounts.revoke_key(revoked.record.id)
    await accounts.delete_account("gone", force=True)
    return {
        "budgeted": budgeted.key,
        "rotated_old": rotated.key,
        "rotated_new": new_secret,
        "revoked": revoked.key,
        "beta": beta.key,
        "gone": gone.key,
    }


async def state(accounts: AccountStore) -> dict[str, Any]:
    """Every account (deleted ones too) and its keys, as the admin API shows them."""
    found = {}
    for account in ("acme", "beta", "gone"):
        found[account] = msgspec.to_builtins(
            (await accounts.get_account(account), await accounts.list_keys(account))
        )
    return found


async def test_restore_brings_back_balances_spend_budgets_and_keys(
    storage: Storage,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    archive_url: str,
    archive_pool: Any,
) -> None:
    secrets = await workload(storage, upstream, http)
    await archive_everything(storage, archive_url, archive_pool)
    accounts = AccountStore(storage)
    before = await state(accounts)
    assert before["acme"][0]["budget"]["spent_usd"] != "0.00"  # the workload spent some

    await storage.call("FLUSHALL")
    result = await restore(storage, archive_pool)

    assert await state(accounts) == before
    assert (result.accounts, result.deleted_accounts, result.keys) == (2, 1, 5)
    assert result.webhooks_needing_secret == ["beta"]
    assert result.accounts_without_snapshot == []
    assert result.keys_without_secret_hash == []
    assert result.balance_differs_from_sum == []
    assert result.balance_usd_nano == sum(
        parse_usd(before[a][0]["balance_usd"]) for a in ("acme", "beta")
    )
    assert sorted(await accounts.list_accounts()) == ["acme", "beta"]
    # Every secret opens its key again; the rotated-out one while its grace lasts.
    for name in ("budgeted", "rotated_old", "rotated_new", "beta", "revoked", "gone"):
        found = await accounts.find_key(secrets[name])
        assert found is not None, name
    revoked = await accounts.find_key(secrets["revoked"])
    assert revoked is not None and revoked.revoked
    # A retried top-up credits nothing; a conflicting one is still refused.
    assert not await accounts.topup("acme", parse_usd("5.00"), "invoice-1")
    assert not await accounts.adjust("acme", -parse_usd("1.25"), "goodwill reversed", "adj-1")
    assert (await accounts.get_account("acme")).balance_usd == before["acme"][0]["balance_usd"]
    # The webhook is back, under a new secret nobody has.
    webhook = await AccountWebhooks(storage).get("beta")
    assert webhook is not None and webhook.url == "https://hooks.example/beta"
    assert webhook.secret.startswith("whsec_") and webhook.secret != WEBHOOK_SECRET

    # A request through a gateway authenticates with the old secret, and is charged.
    runner, gw = await start_gateway(upstream, storage)
    try:
        await chat(http, gw, secrets["budgeted"])
        await gw.settled()
    finally:
        await runner.cleanup()
    after = await accounts.get_account("acme")
    assert parse_usd(after.balance_usd) < parse_usd(before["acme"][0]["balance_usd"])
    assert parse_usd(after.spent_usd) > parse_usd(before["acme"][0]["spent_usd"])
    assert after.budget is not None
    assert parse_usd(after.budget.spent_usd) > parse_usd(before["acme"][0]["budget"]["spent_usd"])


async def test_restore_refuses_a_redis_that_holds_accounts(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts = AccountStore(storage)
    await accounts.create_account("acme", balance_nano=parse_usd("1.00"))
    await archive_everything(storage, archive_url, archive_pool)
    with pytest.raises(RestoreRefused, match="already holds accounts"):
        await restore(storage, archive_pool)
    # Nothing was written: the account's balance is as it was.
    assert (await accounts.get_account("acme")).balance_usd == "1.00"


async def test_snapshots_keep_no_live_state_and_no_secret(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts = AccountStore(storage)
    await accounts.create_account("acme", balance_nano=parse_usd("1.00"), limits=Limits(rpm=5))
    created = await accounts.create_key("acme", name="one")
    await AccountWebhooks(storage).put(
        "acme", AccountWebhook(url="https://hooks.example/a", events=(), secret=WEBHOOK_SECRET)
    )
    await storage.call("HSET", AccountKeys("acme").account, "rpm_level", "3.5", "rpm_ts", "1")

    first = await snapshot_all(storage, archive_pool)

    assert (first.accounts, first.keys) == (1, 1)
    async with archive_pool.acquire() as conn:
        account = msgspec.json.decode(
            await conn.fetchval("SELECT record::text FROM account_snapshots")
        )
        key = await conn.fetchval("SELECT record::text FROM key_snapshots")
    assert account["hash"]["rpm"] == "5" and account["hash"]["prepaid"] == "1"
    for live in ("balance_nano", "held_nano", "spent_nano", "topped_up_nano", "rpm_level"):
        assert live not in account["hash"]
    assert account["webhook"] == {
        "url": "https://hooks.example/a",
        "events": [],
        "balance_below_usd": None,
        "key_expiring_within_s": None,
    }
    assert created.key not in key and "whsec_" not in str(account)


async def test_a_snapshot_writes_only_what_changed(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts = AccountStore(storage)
    for account in ("a1", "a2"):
        await accounts.create_account(account, balance_nano=parse_usd("1.00"))
        await accounts.create_key(account)
    first = await snapshot_all(storage, archive_pool)
    assert (first.accounts, first.keys) == (2, 2)
    again = await snapshot_all(storage, archive_pool)
    assert (again.accounts, again.keys, again.accounts_seen, again.keys_seen) == (0, 0, 2, 2)
    # Live state moves on: still nothing to write.
    await accounts.topup("a1", parse_usd("2.00"), "t1")
    assert (await snapshot_all(storage, archive_pool)).accounts == 0
    # A change to the record is written, once.
    await accounts.update_account("a2", {"rpm": 7})
    changed = await snapshot_all(storage, archive_pool)
    assert (changed.accounts, changed.keys) == (1, 0)


async def test_the_restore_command_rebuilds_an_empty_redis_and_refuses_a_second_time(
    redis_storage: Storage, archive_url: str, archive_pool: Any, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[storage]\nurl = "{redis_storage.url}"\n[archive]\nurl = "{archive_url}"\n')
    accounts = AccountStore(redis_storage)
    await accounts.create_account("acme", balance_nano=parse_usd("4.50"))
    secret = (await accounts.create_key("acme")).key
    await archive_everything(redis_storage, archive_url, archive_pool)
    await redis_storage.call("FLUSHALL")

    done = cli("archive", "restore", "--config", str(config), "--json")

    assert done.returncode == 0, done.stderr
    report = msgspec.json.decode(done.stdout)
    assert (report["accounts"], report["keys"], report["total_balance_usd"]) == (1, 1, "4.50")
    assert report["ledger_complete_until"] is not None
    assert report["webhooks_needing_new_secret"] == []
    assert await accounts.find_key(secret) is not None
    again = cli("archive", "restore", "--config", str(config))
    assert again.returncode == 1
    assert "already holds accounts" in again.stderr and not again.stdout


async def test_restore_takes_the_ledgers_balance_and_names_what_it_could_not_restore(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts = AccountStore(storage)
    await accounts.create_account("switched", balance_nano=parse_usd("2.00"))
    await accounts.update_account("switched", {"prepaid": False})
    names = AccountKeys("switched")
    # What settle.lua writes for a postpaid account's charge: the balance stays, and the
    # ledger's running balance says so.
    charge = ["type", "charge", "settlement_id", "s1", "cost_nano", "500000000"]
    await storage.call("XADD", names.ledger, "*", *charge, "balance_nano", "2000000000")
    await storage.call("HINCRBY", names.account, "spent_nano", 500_000_000)
    await accounts.update_account("switched", {"prepaid": True})
    await archive_everything(storage, archive_url, archive_pool)
    await accounts.create_account("late", balance_nano=parse_usd("1.00"))  # never snapshotted
    database = ArchiveDatabase(archive_url)
    try:
        await Archiver(storage, database, ArchiveSettings(url=archive_url)).archive_once()
    finally:
        await database.close()
    before = msgspec.to_builtins(await accounts.get_account("switched"))

    await storage.call("FLUSHALL")
    result = await restore(storage, archive_pool)

    assert msgspec.to_builtins(await accounts.get_account("switched")) == before
    assert before["balance_usd"] == "2.00" and before["spent_usd"] == "0.50"
    assert result.balance_differs_from_sum == ["switched"]
    assert result.accounts_without_snapshot == ["late"]
    assert await accounts.list_accounts() == ["switched"]
