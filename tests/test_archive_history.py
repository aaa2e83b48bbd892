"""`accounts ledger` across the Redis/PostgreSQL boundary (SPEC §16): once the archiver has
trimmed Redis (``retention_s=0``), paging with ``before`` still walks the whole history
newest first, with no duplicate and no gap, over the admin API and from the CLI; an account
Redis no longer knows pages from the archive. Real PostgreSQL; memory:// and Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from ratelimit_gw.accounts import AccountStore, LedgerEntry, ledger_entry
from ratelimit_gw.archive.database import ArchiveDatabase, ArchiveUnavailable
from ratelimit_gw.archive.history import ledger_page
from ratelimit_gw.archive.ledger_rows import stream_position
from ratelimit_gw.management import AccountError
from ratelimit_gw.money import parse_usd
from ratelimit_gw.storage import Storage

from .archive_workload import archive, ledger_fields, write_workload
from .cli_helpers import cli
from .conftest import ADMIN_TOKEN, Upstream, start_gateway

DOWN = "postgresql://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1


async def split_history(storage: Storage, archive_url: str) -> list[LedgerEntry]:
    """acme's history in three parts: archived and trimmed from Redis; archived and still in
    Redis; only in Redis. Every entry as Redis showed it, newest first."""
    await write_workload(storage)
    written = await ledger_fields(storage, "acme")
    await archive(storage, archive_url, retention_s=0)
    left = await ledger_fields(storage, "acme")
    assert len(left) < len(written) // 2, "the archiver trimmed what it archived"
    accounts = AccountStore(storage)
    for n in range(3):
        await accounts.topup("acme", parse_usd("1.00"), f"later-{n}")
    await archive(storage, archive_url)  # archived, kept in Redis (a day's retention)
    for n in range(2):
        await accounts.topup("acme", parse_usd("1.00"), f"latest-{n}")
    everything = {entry_id: fields for entry_id, fields in written}
    everything.update(await ledger_fields(storage, "acme"))
    return [
        ledger_entry(i, everything[i])
        for i in sorted(everything, key=stream_position, reverse=True)
    ]


async def test_paging_walks_the_whole_history_across_the_boundary(
    storage: Storage, archive_url: str, database: ArchiveDatabase
) -> None:
    history = await split_history(storage, archive_url)
    accounts = AccountStore(storage)
    for limit in (1, 4, 7, len(history), 10_000):
        shown: list[LedgerEntry] = []
        before = None
        while True:
            page = await ledger_page(accounts, database, "acme", limit, before)
            assert len(page.data) <= limit
            shown += page.data
            if page.next_before is None:
                break
            assert page.next_before == page.data[-1].id
            before = page.next_before
        assert shown == history, f"limit {limit}"


async def test_without_an_archive_a_page_is_what_redis_holds(
    storage: Storage, archive_url: str
) -> None:
    history = await split_history(storage, archive_url)
    page = await ledger_page(AccountStore(storage), None, "acme", 10_000)
    assert page.next_before is None
    assert page.data == history[: len(page.data)] and len(page.data) < len(history)


async def test_an_account_redis_lost_still_pages_from_the_archive(
    storage: Storage, archive_url: str, database: ArchiveDatabase
) -> None:
    await write_workload(storage)
    history = [ledger_entry(i, f) for i, f in reversed(await ledger_fields(storage, "acme"))]
    await archive(storage, archive_url)
    await storage.call("FLUSHALL")  # a wipe: the account is gone from Redis
    accounts = AccountStore(storage)
    first = await ledger_page(accounts, database, "acme", 5)
    rest = await ledger_page(accounts, database, "acme", 10_000, first.next_before)
    assert first.data + rest.data == history
    with pytest.raises(AccountError) as unknown:
        await ledger_page(accounts, database, "ghost", 5)
    assert unknown.value.status == 404
    with pytest.raises(AccountError):
        await ledger_page(accounts, None, "acme", 5)


async def test_with_postgres_down_redis_entries_are_shown_and_the_rest_is_unavailable(
    storage: Storage,
) -> None:
    await write_workload(storage)
    accounts = AccountStore(storage)
    down = ArchiveDatabase(DOWN)
    page = await ledger_page(accounts, down, "acme", 10_000)
    oldest = page.data[-1].id
    assert page.next_before == oldest  # there may be more: the archive could not say
    with pytest.raises(ArchiveUnavailable):
        await ledger_page(accounts, down, "acme", 10, oldest)


async def test_a_wrong_before_is_400(storage: Storage, database: ArchiveDatabase) -> None:
    await AccountStore(storage).create_account("acme")
    for before in ("yesterday", "1-2-3", "99999999999999999999-0"):
        with pytest.raises(AccountError) as refused:
            await ledger_page(AccountStore(storage), database, "acme", 5, before)
        assert refused.value.status == 400
    page = await ledger_page(AccountStore(storage), database, "acme", 5, "0-0")
    assert page.data == [] and page.next_before is None


async def test_the_admin_api_pages_across_the_boundary(
    storage: Storage,
    archive_url: str,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    history = await split_history(storage, archive_url)
    runner, gw = await start_gateway(
        upstream,
        storage,
        {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN},
        archive={"url": archive_url, "in_serve": False},
    )
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        shown: list[Any] = []
        query = "limit=4"
        while True:
            url = f"{gw.url}/admin/accounts/acme/ledger?{query}"
            async with http.get(url, headers=headers) as response:
                assert response.status == 200
                body = await response.json()
            shown += body["data"]
            if body["next_before"] is None:
                break
            query = f"limit=4&before={body['next_before']}"
        assert shown == msgspec.to_builtins(history)
        async with http.get(
            f"{gw.url}/admin/accounts/acme/ledger?before=soon", headers=headers
        ) as response:
            assert response.status == 400
    finally:
        await runner.cleanup()


async def test_the_cli_pages_across_the_boundary(
    redis_storage: Storage, archive_url: str, tmp_path: Path
) -> None:
    history = await split_history(redis_storage, archive_url)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[storage]\nurl = "{redis_storage.url}"\n\n[archive]\nurl = "{archive_url}"\n'
    )
    shown: list[Any] = []
    paging: list[str] = []
    while True:
        done = cli(
            "accounts", "ledger", "acme", "--config", str(config), "--limit", "5", *paging, "--json"
        )
        assert done.returncode == 0, done.stderr
        shown += msgspec.json.decode(done.stdout)
        if not done.stderr:
            break
        assert done.stderr.startswith("next before: ")
        paging = ["--before", done.stderr.split(": ", 1)[1].strip()]
    assert shown == msgspec.to_builtins(history)
    # Only --storage: no config, no archive; Redis's entries alone.
    done = cli(
        "accounts", "ledger", "acme", "--storage", redis_storage.url, "--limit", "10000", "--json"
    )
    assert done.returncode == 0, done.stderr
    assert len(msgspec.json.decode(done.stdout)) < len(history)
