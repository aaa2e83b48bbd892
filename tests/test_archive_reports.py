"""Usage reports from the archive (SPEC §16): totals equal the ledger Redis held to the
nano-dollar and the balances' change, every grouping adds up to the same totals, filters
select what they name, CSV says what JSON says, each report says up to when it is complete;
from Python, over the admin API and from the CLI. Real PostgreSQL; memory:// and Redis."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from ratelimit_gw.archive.database import ArchiveDatabase
from ratelimit_gw.archive.ledger_rows import stream_position
from ratelimit_gw.archive.reports import (
    UsageError,
    UsageQuery,
    UsageReport,
    csv_columns,
    report_csv,
    usage_report,
)
from ratelimit_gw.management import iso
from ratelimit_gw.money import format_usd, parse_usd
from ratelimit_gw.storage import Storage

from .archive_workload import ACCOUNTS, MODELS, Workload, archive, balance_nano, write_workload
from .cli_helpers import cli
from .conftest import ADMIN_TOKEN, Upstream, start_gateway
from .postgres_process import create_database, drop_database

REQUEST_TYPES = ("charge", "release")
CREDIT_TYPES = ("topup", "adjustment", "forfeit")
TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


@pytest.fixture
async def archived(storage: Storage, archive_url: str) -> Workload:
    """The workload, written, read back from Redis, and archived."""
    work = await write_workload(storage)
    await archive(storage, archive_url)
    return work


def expected(
    work: Workload, *, account: str | None = None, select: Any = lambda f: True
) -> dict[str, Any]:
    """What a report's totals must be, summed from the entries Redis held (nano-USD ints)."""
    entries = [
        (entry_id, fields)
        for name, ledger in work.ledgers.items()
        if account in (None, name)
        for entry_id, fields in ledger
        if select(fields)
    ]
    requests = [f for _, f in entries if f["type"] in REQUEST_TYPES]
    cost = sum(int(f["cost_nano"]) for _, f in entries if f["type"] == "charge")
    credited = sum(int(f["amount_nano"]) for _, f in entries if f["type"] in CREDIT_TYPES)
    return {
        "requests": len(requests),
        **{t: sum(int(f.get(t) or 0) for f in requests) for t in TOKENS},
        "cost_usd": format_usd(cost),
        "credited_usd": format_usd(credited),
        "net_usd": format_usd(credited - cost),
    }


def totals(report: UsageReport) -> dict[str, Any]:
    return msgspec.structs.asdict(report.totals)


def summed_rows(report: UsageReport) -> dict[str, Any]:
    """The rows added up: they must give the totals exactly."""
    sums = dict.fromkeys(["requests", *TOKENS], 0)
    money = dict.fromkeys(["cost_usd", "credited_usd", "net_usd"], 0)
    for row in report.rows:
        for name in sums:
            sums[name] += getattr(row, name)
        for name in money:
            money[name] += parse_usd(getattr(row, name), signed=True)
    return {**sums, **{name: format_usd(nano) for name, nano in money.items()}}


async def test_totals_equal_the_ledger_and_the_balance_change_to_the_nano_dollar(
    archived: Workload, database: ArchiveDatabase, storage: Storage
) -> None:
    report = await usage_report(database, UsageQuery())
    assert totals(report) == expected(archived)
    assert len(report.rows) == 1 and report.group_by == []
    for account in ACCOUNTS:
        one = await usage_report(database, UsageQuery(account=account))
        assert totals(one) == expected(archived, account=account)
        # Every account was created with a zero balance: its net is its balance now.
        assert one.totals.net_usd == format_usd(await balance_nano(storage, account))
    assert report.complete_until is not None


@pytest.mark.parametrize(
    "group_by", ["day", "hour", "model", "key", "account", "day,model", "account,key,hour"]
)
async def test_every_grouping_adds_up_to_the_same_totals(
    archived: Workload, database: ArchiveDatabase, group_by: str
) -> None:
    report = await usage_report(database, UsageQuery.parse(group_by=group_by))
    assert totals(report) == expected(archived)
    assert summed_rows(report) == totals(report)
    groups = group_by.split(",")
    assert report.group_by == groups
    keys = [
        tuple(msgspec.structs.asdict(row)[c] for c in csv_columns(groups)[: len(groups)])
        for row in report.rows
    ]
    assert len(set(keys)) == len(keys), "one row per group"


async def test_grouping_by_model_and_key_puts_each_entry_in_its_own_row(
    archived: Workload, database: ArchiveDatabase
) -> None:
    by_model = await usage_report(database, UsageQuery.parse(group_by="model"))
    rows = {row.model: msgspec.structs.asdict(row) for row in by_model.rows}
    for model in MODELS:
        want = expected(archived, select=lambda f, m=model: f.get("model") == m)
        got = {name: rows[model][name] for name in want}
        assert got == want
    # Top-ups, adjustments and forfeits name no model: their own row, model null.
    assert rows[None]["requests"] == 0 and rows[None]["credited_usd"] != "0.00"

    by_key = await usage_report(database, UsageQuery.parse(group_by="account,key"))
    keyed = {(row.account_id, row.key_id): row for row in by_key.rows}
    for account, key_ids in archived.keys.items():
        for key_id in key_ids:
            want = expected(
                archived, account=account, select=lambda f, k=key_id: f.get("key_id") == k
            )
            assert keyed[(account, key_id)].cost_usd == want["cost_usd"]


async def test_filters_select_what_they_name(archived: Workload, database: ArchiveDatabase) -> None:
    model = MODELS[1]
    report = await usage_report(database, UsageQuery(model=model))
    assert totals(report) == expected(archived, select=lambda f: f.get("model") == model)
    key_id = archived.keys["acme"][1]
    report = await usage_report(database, UsageQuery(account="acme", key=key_id))
    assert totals(report) == expected(archived, select=lambda f: f.get("key_id") == key_id)
    nobody = await usage_report(database, UsageQuery(account="nobody"))
    assert nobody.totals.requests == 0 and nobody.totals.net_usd == "0.00"


async def test_a_time_range_is_half_open_and_two_halves_make_the_whole(
    archived: Workload, database: ArchiveDatabase
) -> None:
    entries = sorted(
        (entry_id for ledger in archived.ledgers.values() for entry_id, _ in ledger),
        key=stream_position,
    )
    split_ms = int(entries[len(entries) // 2].split("-")[0])
    split = iso(split_ms)
    start, end = iso(int(entries[0].split("-")[0])), iso(int(entries[-1].split("-")[0]) + 1)
    before = await usage_report(database, UsageQuery.parse(start=start, end=split))
    after = await usage_report(database, UsageQuery.parse(start=split, end=end))
    whole = expected(archived)
    assert before.totals.requests + after.totals.requests == whole["requests"]
    cost = parse_usd(before.totals.cost_usd) + parse_usd(after.totals.cost_usd)
    assert format_usd(cost) == whole["cost_usd"]
    # [split, …) holds the entry at split_ms; [… , split) does not.
    at_split = [
        f
        for ledger in archived.ledgers.values()
        for i, f in ledger
        if int(i.split("-")[0]) >= split_ms
    ]
    assert after.totals.requests == sum(f["type"] in REQUEST_TYPES for f in at_split)
    assert (before.filters.from_, before.filters.to) == (start, split)
    # The last entry's own millisecond is outside [start, its ms): to is exclusive.
    last_ms = int(entries[-1].split("-")[0])
    without_last = await usage_report(database, UsageQuery.parse(end=iso(last_ms)))
    with_last = await usage_report(database, UsageQuery.parse(end=iso(last_ms + 1)))
    assert without_last.totals != with_last.totals
    assert totals(with_last) == whole
    future = datetime.now(UTC) + timedelta(days=1)
    empty = await usage_report(database, UsageQuery(start=future))
    assert empty.totals.requests == 0 and empty.totals.cost_usd == "0.00"


async def test_csv_has_a_header_and_the_json_rows(
    archived: Workload, database: ArchiveDatabase
) -> None:
    report = await usage_report(database, UsageQuery.parse(group_by="day,model"))
    parsed = list(csv.DictReader(io.StringIO(report_csv(report))))
    assert len(parsed) == len(report.rows)
    for line, row in zip(parsed, report.rows, strict=True):
        fields = msgspec.structs.asdict(row)
        for column, value in line.items():
            if column == "complete_until":
                assert value == report.complete_until
            else:
                assert value == ("" if fields[column] is None else str(fields[column]))
    assert list(parsed[0]) == csv_columns(["day", "model"])


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"group_by": "week"}, "group_by"),
        ({"group_by": "day,day"}, "group_by"),
        ({"start": "yesterday"}, "from"),
        ({"start": "2026-12-01T00:00:00"}, "from"),  # no offset: whose midnight?
        ({"end": "2026-13-01"}, "to"),
        ({"start": "2026-12-02", "end": "2026-12-01"}, "to"),
        ({"account": ""}, "account"),
    ],
)
def test_a_wrong_parameter_is_refused_naming_it(params: dict[str, str], field: str) -> None:
    with pytest.raises(UsageError) as refused:
        UsageQuery.parse(**params)
    assert refused.value.field == field


# --- the admin API ----------------------------------------------------------------------------


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any, aiohttp.ClientResponse]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.get(url, headers=headers) as response:
        body = await response.text()
        if response.content_type == "application/json":
            return response.status, msgspec.json.decode(body), response
        return response.status, body, response


async def test_the_admin_api_serves_the_report_as_json_and_csv(
    archived: Workload,
    database: ArchiveDatabase,
    upstream: Upstream,
    storage: Storage,
    archive_url: str,
    http: aiohttp.ClientSession,
) -> None:
    runner, gw = await start_gateway(
        upstream,
        storage,
        {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN},
        archive={"url": archive_url, "in_serve": False},
    )
    try:
        status, body, _ = await get(http, f"{gw.url}/admin/usage?group_by=model&account=acme")
        assert status == 200
        direct = await usage_report(database, UsageQuery.parse(group_by="model", account="acme"))
        assert body == msgspec.to_builtins(direct)
        assert body["totals"] == expected(archived, account="acme")

        status, text, response = await get(http, f"{gw.url}/admin/usage?group_by=day&format=csv")
        assert status == 200 and response.content_type == "text/csv"
        day = await usage_report(database, UsageQuery.parse(group_by="day"))
        assert text == report_csv(day)

        for query, field in (
            ("group_by=week", "group_by"),
            ("from=noon", "from"),
            ("format=xml", "format"),
        ):
            status, body, _ = await get(http, f"{gw.url}/admin/usage?{query}")
            assert status == 400, body
            assert body["error"]["param"] == field
            assert body["error"]["reason"] == "invalid_request"
    finally:
        await runner.cleanup()


async def test_without_an_archive_the_report_is_404_and_with_postgres_down_503(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    runner, gw = await start_gateway(upstream, storage, {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        status, body, _ = await get(http, f"{gw.url}/admin/usage")
        assert (status, body["error"]["reason"]) == (404, "archive_not_configured")
    finally:
        await runner.cleanup()
    down = "postgresql://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1
    runner, gw = await start_gateway(
        upstream,
        storage,
        {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN},
        archive={"url": down, "in_serve": False},
    )
    try:
        status, body, response = await get(http, f"{gw.url}/admin/usage?group_by=day")
        assert (status, body["error"]["reason"]) == (503, "archive_unavailable")
        assert int(response.headers["retry-after"]) >= 1
    finally:
        await runner.cleanup()


async def test_a_schema_not_migrated_is_503(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession, postgres_admin_url: str
) -> None:
    blank = await create_database(postgres_admin_url, "rlgw_test")
    try:
        runner, gw = await start_gateway(
            upstream,
            storage,
            {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN},
            archive={"url": blank, "in_serve": False},
        )
        try:
            status, body, _ = await get(http, f"{gw.url}/admin/usage")
            assert (status, body["error"]["reason"]) == (503, "archive_unavailable")
            assert "archive migrate" in body["error"]["message"]
        finally:
            await runner.cleanup()
    finally:
        await drop_database(postgres_admin_url, blank)


# --- the CLI ----------------------------------------------------------------------------------


def config_file(tmp_path: Path, storage_url: str, archive_url: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[storage]\nurl = "{storage_url}"\n\n[archive]\nurl = "{archive_url}"\n')
    return str(path)


async def test_the_cli_prints_the_report_as_json_csv_and_text(
    archived: Workload, database: ArchiveDatabase, archive_url: str, tmp_path: Path
) -> None:
    config = config_file(tmp_path, "memory://", archive_url)
    done = cli("usage", "--config", config, "--group-by", "key", "--account", "acme", "--json")
    assert done.returncode == 0, done.stderr
    direct = await usage_report(database, UsageQuery.parse(group_by="key", account="acme"))
    assert msgspec.json.decode(done.stdout) == msgspec.to_builtins(direct)

    model = MODELS[0]
    done = cli("usage", "--config", config, "--model", model, "--group-by", "hour", "--csv")
    assert done.returncode == 0, done.stderr
    by_hour = await usage_report(database, UsageQuery.parse(group_by="hour", model=model))
    assert done.stdout == report_csv(by_hour).replace("\r\n", "\n")  # text mode: CRLF reads as LF

    done = cli("usage", "--config", config)
    assert done.returncode == 0, done.stderr
    assert f"cost_usd            {expected(archived)['cost_usd']}" in done.stdout
    assert "complete_until" in done.stdout

    done = cli("usage", "--config", config, "--group-by", "week")
    assert done.returncode == 2 and "--group-by" in done.stderr
