"""The archiver (SPEC §16, docs/archive.md) against a real PostgreSQL and both storages:
every entry once, by what it is; a crash between the Postgres commit and the Redis trim
duplicates nothing and skips nothing; Redis trimmed only below what Postgres committed and
after the retention; a wiped Redis read anew; deleted accounts and orphans archived too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.archive.archiver import (
    DELETED_READ_S,
    ORPHANS,
    Archiver,
    ArchiveRunner,
    list_earlier_deletions,
)
from ratelimit_gw.archive.database import ArchiveDatabase, ArchiveUnavailable
from ratelimit_gw.archive.lease import Lease
from ratelimit_gw.archive.ledger_rows import stream_position
from ratelimit_gw.keyspace import (
    ARCHIVE_LEASE,
    DELETED_ACCOUNTS,
    ORPHAN_SETTLEMENTS,
    AccountKeys,
)
from ratelimit_gw.metrics import create_metrics
from ratelimit_gw.services import SERVICES
from ratelimit_gw.settings import ArchiveSettings, StorageSettings
from ratelimit_gw.storage import Storage, open_storage

from .cli_helpers import cli
from .conftest import Gateway, Upstream, another_client, start_gateway
from .postgres_process import create_database, drop_database

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


class Clock:
    """Time as the archiver sees it (retention), moved by the test."""

    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


_open: list[ArchiveDatabase] = []


@pytest.fixture(autouse=True)
async def close_databases() -> AsyncIterator[None]:
    """Every archiver's pool, closed when its test ends (a crashed archiver's too)."""
    yield
    while _open:
        await _open.pop().close()


def archiver(storage: Storage, url: str, *, clock: Clock | None = None, **options: Any) -> Archiver:
    settings = ArchiveSettings(url=url, **{"retention_s": 0.0, **options})
    database = ArchiveDatabase(url)
    _open.append(database)
    if clock is None:
        return Archiver(storage, database, settings)
    return Archiver(storage, database, settings, clock=clock)


async def ledger(storage: Storage, account: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (entry_id, fields)
        for entry_id, fields in await storage.call("XRANGE", AccountKeys(account).ledger, "-", "+")
    ]


async def archived(pool: Any, account: str | None = None) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT account_id, entry_type, ref, stream_id, cost_nano, amount_nano, fields "
        "FROM ledger_entries WHERE $1::text IS NULL OR account_id = $1 "
        "ORDER BY account_id, stream_ms, stream_seq",
        account,
    )
    return [{**dict(row), "fields": json.loads(row["fields"])} for row in rows]


async def some_money(accounts: AccountStore, account: str = "acme", topups: int = 3) -> None:
    await accounts.create_account(account, balance_nano=5_000_000_000)
    for i in range(topups):
        await accounts.topup(account, 1_000_000_000 + i, f"{account}-inv-{i}")
    await accounts.adjust(account, -250_000_000, "refund of a bad answer", f"{account}-adj-1")


async def acme_archived(storage: Storage, url: str) -> tuple[AccountStore, Archiver]:
    """acme with a little money, archived (kept in Redis for an hour): its archiver too."""
    accounts = AccountStore(storage)
    await some_money(accounts, topups=1)
    a = archiver(storage, url, retention_s=3600)
    await a.archive_once()
    return accounts, a


async def test_every_entry_is_archived_once_with_its_fields_and_identity(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts = AccountStore(storage)
    await some_money(accounts)
    in_redis = await ledger(storage, "acme")
    a = archiver(storage, archive_url, retention_s=3600)

    first = await a.archive_once()
    again = await a.archive_once()

    rows = await archived(archive_pool)
    assert [(r["stream_id"], r["fields"]) for r in rows] == in_redis
    assert [(r["entry_type"], r["ref"]) for r in rows] == [
        ("topup", "rlgw:initial-balance:acme"),
        ("topup", "acme-inv-0"),
        ("topup", "acme-inv-1"),
        ("topup", "acme-inv-2"),
        ("adjustment", "acme-adj-1"),
    ]
    assert sum(r["amount_nano"] for r in rows) == 5_000_000_000 + 3_000_000_003 - 250_000_000
    assert (first.read, first.written, first.complete) == (5, 5, True)
    assert (again.read, again.written) == (0, 0)  # read from the archived position on
    # Retention keeps them in Redis (an hour here).
    assert await ledger(storage, "acme") == in_redis


async def test_charges_releases_and_orphans_from_real_requests_are_archived(
    upstream: Upstream, storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    runner, gw = await start_gateway(upstream, storage)
    try:
        key = await gw.new_key("acme", balance_usd="5.00")
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(
                    gw.url + "/v1/chat/completions", json=CHAT, headers=headers
                ) as r:
                    assert r.status == 200
            failing = {**headers, "x-mock-error": "400"}
            async with http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=failing) as r:
                assert r.status == 400
        await gw.settled()
        # A settlement for an account storage no longer has: kept as an orphan.
        orphan = {"account_id": "gone", "request_id": "req_orphan1", "cost_nano": "42"}
        await storage.call("XADD", ORPHAN_SETTLEMENTS, "*", *sum(orphan.items(), ()))
        spent = int(await storage.call("HGET", AccountKeys("acme").account, "spent_nano"))

        result = await archiver(storage, archive_url).archive_once()
    finally:
        await runner.cleanup()

    rows = await archived(archive_pool, "acme")
    charges = [r for r in rows if r["entry_type"] == "charge"]
    releases = [r for r in rows if r["entry_type"] == "release"]
    assert len(charges) == 3 and len(releases) == 1
    assert sum(r["cost_nano"] for r in rows) == spent > 0
    assert {r["ref"] for r in charges + releases} == {
        r["fields"]["settlement_id"] for r in charges + releases
    }
    orphans = await archive_pool.fetch("SELECT account_id, settlement_id FROM orphan_settlements")
    assert [tuple(o) for o in orphans] == [("gone", "req_orphan1")]
    assert result.written == len(rows) + 1


async def test_a_crash_between_the_commit_and_the_trim_duplicates_nothing_and_skips_nothing(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts = AccountStore(storage)
    for name in ("acme", "globex", "initech"):
        await some_money(accounts, name, topups=4)
    crashing = archiver(storage, archive_url, batch_size=2)

    async def crash() -> None:
        raise SystemExit("killed after the Postgres commit, before the Redis trim")

    crashing.after_commit = crash
    with pytest.raises(SystemExit):
        await crashing.archive_once()
    committed = await archived(archive_pool)
    assert len(committed) == 6  # one chunk: two entries of each stream, committed
    assert len(await ledger(storage, "acme")) == 6  # nothing trimmed: the crash came first

    # More entries arrive while the archiver is down.
    await accounts.topup("acme", 7, "acme-late")
    restarted = archiver(storage, archive_url, batch_size=2)
    passes = 0
    while not (await restarted.archive_once()).complete:
        passes += 1
        assert passes < 10

    rows = await archived(archive_pool)
    identities = [(r["account_id"], r["ref"], r["entry_type"]) for r in rows]
    assert len(identities) == len(set(identities)) == 3 * 6 + 1
    assert {r["ref"] for r in rows if r["account_id"] == "acme"} >= {"acme-late", "acme-inv-3"}
    # retention 0: everything archived is gone from Redis, nothing else.
    for name in ("acme", "globex", "initech"):
        assert await ledger(storage, name) == []


async def test_redis_is_trimmed_only_below_what_postgres_committed_and_after_the_retention(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts = AccountStore(storage)
    await some_money(accounts, topups=5)  # 7 entries
    clock = Clock()
    a = archiver(storage, archive_url, clock=clock, retention_s=600, batch_size=4)

    await a.archive_once()  # four entries archived, all younger than the retention
    assert len(await ledger(storage, "acme")) == 7

    clock.now += 3600  # every entry is past the retention now
    result = await a.archive_once()  # reads the other three, then trims
    assert result.trimmed == 7 and await ledger(storage, "acme") == []

    await accounts.topup("acme", 1, "acme-new")
    clock.now += 3600
    a2 = archiver(storage, archive_url, clock=clock, retention_s=600, batch_size=4)
    # Stop after the read, before anything is committed: Postgres has not got the new entry.
    original = ArchiveDatabase.pool

    async def postgres_down(self: ArchiveDatabase) -> Any:
        raise ArchiveUnavailable("postgres is down")

    ArchiveDatabase.pool = postgres_down  # type: ignore[method-assign]
    try:
        with pytest.raises(ArchiveUnavailable):
            await a2.archive_once()
    finally:
        ArchiveDatabase.pool = original  # type: ignore[method-assign]
    assert [f["idempotency_key"] for _, f in await ledger(storage, "acme")] == ["acme-new"]

    # Trimming below the committed id, and no further: an entry appended after the read stays.
    moved = 0

    async def append_after_commit() -> None:
        nonlocal moved
        moved += 1
        await accounts.topup("acme", 2, "acme-after-the-read")

    a2.after_commit = append_after_commit
    await a2.archive_once()
    assert moved == 1
    left = await ledger(storage, "acme")
    assert [f["idempotency_key"] for _, f in left] == ["acme-after-the-read"]
    committed = await archived(archive_pool, "acme")
    last_archived = stream_position(committed[-1]["stream_id"])
    assert all(stream_position(entry_id) > last_archived for entry_id, _ in left)


async def test_a_wiped_redis_is_read_anew_and_a_new_entry_at_a_reused_stream_id_is_kept(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    await acme_archived(storage, archive_url)
    old = await ledger(storage, "acme")

    await storage.call("FLUSHALL")  # Redis lost; the same stream ids come back with new entries
    for (entry_id, fields), n in zip(old, range(len(old)), strict=True):
        fresh = {**fields, "idempotency_key": f"after-the-wipe-{n}", "amount_nano": "1"}
        await storage.call("XADD", AccountKeys("acme").ledger, entry_id, *sum(fresh.items(), ()))
    await storage.call("SADD", "rlgw:accounts", "acme")
    # A new archiver, as after a restart: the cursor in Postgres is ahead of every new id.
    await archiver(storage, archive_url, retention_s=3600).archive_once()

    rows = await archived(archive_pool, "acme")
    assert len(rows) == 2 * len(old)
    refs = {r["ref"] for r in rows}
    assert {f"after-the-wipe-{n}" for n in range(len(old))} <= refs
    by_id: dict[str, int] = {}
    for r in rows:
        by_id[r["stream_id"]] = by_id.get(r["stream_id"], 0) + 1
    assert set(by_id.values()) == {2}  # each stream id now names two different entries


async def test_deleted_accounts_keep_being_archived(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts, a = await acme_archived(storage, archive_url)
    await accounts.delete_account("acme", force=True)
    assert "acme" not in await accounts.list_accounts()

    await a.archive_once()

    rows = await archived(archive_pool, "acme")
    forfeit = [r for r in rows if r["entry_type"] == "forfeit"]
    assert len(forfeit) == 1
    assert forfeit[0]["ref"].startswith("deleted:")
    assert sum(r["amount_nano"] for r in rows) == 0  # everything credited was forfeited
    assert await storage.call("SISMEMBER", DELETED_ACCOUNTS, "acme")  # still read

    # A day on, with nothing left to archive, its ledger is no longer read at every pass.
    clock = Clock()
    clock.now += DELETED_READ_S + 60
    await archiver(storage, archive_url, clock=clock, retention_s=3600).archive_once()
    assert not await storage.call("SISMEMBER", DELETED_ACCOUNTS, "acme")
    assert len(await archived(archive_pool, "acme")) == len(rows)


async def test_one_archiver_holds_the_lease_and_another_takes_over_when_it_stops(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts = AccountStore(storage)
    await some_money(accounts, topups=1)
    settings = ArchiveSettings(url=archive_url, interval_s=0.05, lease_s=1.0, retention_s=3600)
    async with another_client(storage) as other:
        runners = []
        for store in (storage, other):
            metrics = create_metrics(None)
            runner = ArchiveRunner(
                Archiver(store, ArchiveDatabase(archive_url), settings, metrics),
                Lease(store, settings.lease_s),
                settings,
            )
            runners.append((runner, metrics, asyncio.create_task(runner.run())))
        try:
            await wait_for(lambda: len(archived_rows) == 3, archive_pool)
            leaders = [r for r, m, _ in runners if m.archive_leader._value.get() == 1]
            assert len(leaders) == 1
            first = leaders[0]
            second = next(r for r, _, _ in runners if r is not first)
            assert await storage.call("GET", ARCHIVE_LEASE) == first.lease.token

            # The leader dies without a word: its lease runs out and the other takes over.
            task = next(t for r, _, t in runners if r is first)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await storage.call("SET", ARCHIVE_LEASE, first.lease.token, "PX", 1000)
            await accounts.topup("acme", 5, "while-the-leader-is-dead")
            await wait_for(lambda: len(archived_rows) == 4, archive_pool, timeout_s=10)
            assert await storage.call("GET", ARCHIVE_LEASE) == second.lease.token
        finally:
            for runner, _, _ in runners:
                runner.stop()
            await asyncio.wait_for(
                asyncio.gather(*(t for _, _, t in runners), return_exceptions=True), 10
            )
            for runner, _, _ in runners:
                await runner.archiver.database.close()
    identities = [(r["ref"], r["entry_type"]) for r in await archived(archive_pool)]
    assert len(identities) == len(set(identities)) == 4


archived_rows: list[Any] = []


async def wait_for(check: Any, pool: Any, timeout_s: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        archived_rows[:] = await pool.fetch("SELECT ref FROM ledger_entries")
        if check():
            return
        assert loop.time() < deadline, f"not archived in {timeout_s}s: {len(archived_rows)} rows"
        await asyncio.sleep(0.05)


async def test_a_gateway_with_an_archive_archives_in_the_background_and_reports_its_lag(
    upstream: Upstream, storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    archive = {"url": archive_url, "interval_s": 0.1, "retention_s": 0}
    runner, gw = await start_gateway(upstream, storage, archive=archive)
    try:
        await one_charged_request(gw)
        await gw.settled()
        await wait_for(lambda: len(archived_rows) == 2, archive_pool)  # the top-up, the charge
        await wait_trimmed(gw)
        registry = gw.app[SERVICES].registry
        assert registry.get_sample_value("rlgw_archive_leader") == 1
        for _ in range(100):  # counted as the pass ends, a moment after its commit and trim
            if registry.get_sample_value("rlgw_archive_entries_total") == 2:
                break
            await asyncio.sleep(0.05)
        assert registry.get_sample_value("rlgw_archive_entries_total") == 2
        lag = registry.get_sample_value("rlgw_archive_lag_seconds")
        assert lag is not None and 0 <= lag < 5
    finally:
        await runner.cleanup()
    # A clean stop gives the lease up at once.
    assert await storage.call("GET", ARCHIVE_LEASE) is None


async def one_charged_request(gw: Gateway) -> None:
    """A prepaid account, acme, with one answered request on it."""
    key = await gw.new_key("acme", balance_usd="5.00")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gw.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        assert r.status == 200


async def wait_trimmed(gw: Gateway) -> None:
    for _ in range(200):
        if not await ledger(gw.storage, "acme"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the archived entries were never trimmed from Redis")


async def test_a_gateway_serves_while_postgres_is_unreachable_and_counts_the_failures(
    upstream: Upstream, storage: Storage
) -> None:
    archive = {"url": "postgresql://nobody@127.0.0.1:1/none", "interval_s": 0.05}
    runner, gw = await start_gateway(upstream, storage, archive=archive)
    try:
        await one_charged_request(gw)
        registry = gw.app[SERVICES].registry
        for _ in range(200):
            if registry.get_sample_value("rlgw_archive_errors_total", {"stage": "postgres"}):
                break
            await asyncio.sleep(0.05)
        assert registry.get_sample_value("rlgw_archive_errors_total", {"stage": "postgres"})
    finally:
        await runner.cleanup()
    assert len(await ledger(storage, "acme")) == 2  # nothing archived, nothing trimmed


def test_the_orphan_stream_has_a_name_no_account_can_have() -> None:
    from ratelimit_gw.keyspace import ID_PATTERN

    assert not ID_PATTERN.match(ORPHANS)


async def test_the_runner_snapshots_accounts_and_keys_for_restore_while_it_archives(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts = AccountStore(storage)
    await some_money(accounts, topups=1)
    created = await accounts.create_key("acme", name="ci")
    settings = ArchiveSettings(url=archive_url, interval_s=0.05, snapshot_interval_s=3600)
    runner = ArchiveRunner(
        archiver(storage, archive_url), Lease(storage, settings.lease_s), settings
    )
    task = asyncio.create_task(runner.run())
    try:
        for _ in range(200):
            snapshots = await archive_pool.fetch("SELECT key_id FROM key_snapshots")
            if snapshots:
                break
            await asyncio.sleep(0.05)
    finally:
        runner.stop()
        await asyncio.wait_for(task, 10)
    assert [row["key_id"] for row in snapshots] == [created.record.id]
    account = await archive_pool.fetchval("SELECT record FROM account_snapshots")
    assert "balance_nano" not in json.loads(account)["hash"]  # live state: from the ledger


async def test_a_running_archiver_notices_a_wiped_redis_at_the_first_new_entry_or_check(
    storage: Storage, archive_url: str, archive_pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, a = await acme_archived(storage, archive_url)
    old = await ledger(storage, "acme")
    last_ms = stream_position(old[-1][0])[0]

    await storage.call("FLUSHALL")
    # Redis came back with a clock behind: its first entry sorts before the archived position.
    behind = {"type": "topup", "idempotency_key": "behind", "amount_nano": "1", "cost_nano": "0"}
    await storage.call(
        "XADD", AccountKeys("acme").ledger, f"{last_ms - 5}-0", *sum(behind.items(), ())
    )
    await storage.call("SADD", "rlgw:accounts", "acme")
    idle = await a.archive_once()  # an idle stream is one XRANGE: nothing after the position
    assert idle.read == 0

    # Its next entry sorts after the position: the epoch is checked, the stream read anew.
    after = {**behind, "idempotency_key": "after"}
    await storage.call(
        "XADD", AccountKeys("acme").ledger, f"{last_ms + 5}-0", *sum(after.items(), ())
    )
    caught_up = await a.archive_once()
    assert caught_up.read == 2
    refs = {r["ref"] for r in await archived(archive_pool, "acme")}
    assert {"behind", "after"} <= refs

    # And an idle wiped stream is found by the periodic check of every epoch.
    await storage.call("FLUSHALL")
    await storage.call("XADD", AccountKeys("acme").ledger, "1-1", *sum(behind.items(), ()))
    await storage.call("SADD", "rlgw:accounts", "acme")
    monkeypatch.setattr("ratelimit_gw.archive.archiver.EPOCH_CHECK_S", 0.0)
    checked = await a.archive_once()
    assert checked.read == 1 and checked.written == 0  # "behind" again: already archived


async def test_accounts_deleted_before_the_archive_existed_are_listed_by_migrate(
    storage: Storage, archive_url: str, archive_pool: Any
) -> None:
    accounts = AccountStore(storage)
    await some_money(accounts, topups=1)
    await accounts.create_account("globex")
    await accounts.delete_account("acme", force=True)
    # An earlier version deleted it: it never reached the list of deleted accounts.
    await storage.call("SREM", DELETED_ACCOUNTS, "acme")

    assert await list_earlier_deletions(storage) == 1
    assert await list_earlier_deletions(storage) == 0  # a second run finds nothing new
    await archiver(storage, archive_url).archive_once()
    assert len(await archived(archive_pool, "acme")) == 4  # its ledger, the forfeit included


async def test_a_stream_that_came_back_lower_after_a_wipe_is_trimmed_again(
    storage: Storage, archive_url: str, archive_pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = AccountStore(storage)
    await some_money(accounts, topups=1)
    a = archiver(storage, archive_url)  # no retention: trimmed as soon as archived
    await a.archive_once()
    assert await ledger(storage, "acme") == []

    await storage.call("FLUSHALL")
    stream = AccountKeys("acme").ledger
    for n, entry_id in enumerate(("5-0", "6-0")):  # far below the trimmed-up-to mark
        entry = {"type": "topup", "idempotency_key": f"low-{n}", "amount_nano": "1"}
        await storage.call("XADD", stream, entry_id, *sum(entry.items(), ()))
    await storage.call("SADD", "rlgw:accounts", "acme")
    monkeypatch.setattr("ratelimit_gw.archive.archiver.EPOCH_CHECK_S", 0.0)  # check every one
    result = await a.archive_once()
    assert (result.written, result.trimmed) == (2, 2)
    assert await ledger(storage, "acme") == []


async def test_migrate_then_status_from_the_command_line(
    postgres_admin_url: str, redis_url: str, tmp_path: Path
) -> None:
    blank = await create_database(postgres_admin_url, "rlgw_test")
    try:
        config = tmp_path / "gateway.toml"
        config.write_text(f'[storage]\nurl = "{redis_url}"\n\n[archive]\nurl = "{blank}"\n')
        first = cli("archive", "migrate", "--config", str(config))
        again = cli("archive", "migrate", "--config", str(config))
        assert first.returncode == again.returncode == 0, first.stderr + again.stderr
        assert "applied 0001_ledger_archive" in first.stdout
        assert "applied" not in again.stdout and "schema up to date" in again.stdout
        assert "postgres@" in first.stdout and blank.rsplit("/", 1)[1] in first.stdout

        storage = open_storage(StorageSettings(url=redis_url))
        try:
            await some_money(AccountStore(storage), topups=1)
            database = ArchiveDatabase(blank)
            try:
                settings = ArchiveSettings(url=blank)
                await Archiver(storage, database, settings).archive_once()
            finally:
                await database.close()
        finally:
            await storage.close()
        shown = cli("archive", "status", "--config", str(config), "--json")
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert (status["entries"], status["streams"]) == (3, 1)  # acme's three entries
        assert status["complete_until"] is not None and status["archiver"] is None
    finally:
        await drop_database(postgres_admin_url, blank)


def test_an_archive_command_without_an_archive_says_so(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[storage]\nurl = "redis://127.0.0.1:1/0"\n')
    answer = cli("archive", "status", "--config", str(config))
    assert answer.returncode == 2
    assert "no [archive] section" in answer.stderr
