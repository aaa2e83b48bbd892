"""`ratelimit-gw archive …` and `ratelimit-gw usage` (docs/archive.md), and the archive's
part of `accounts ledger`: wiring only.

Each reads ``[storage]`` and ``[archive]`` of the config (no provider secret needed);
``--url`` names another database for this one command.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from .. import text_output
from ..accounts import AccountStore
from ..metrics import StorageMetrics, create_metrics, exposition
from ..money import format_usd
from ..settings import (
    ArchiveSettings,
    ConfigError,
    StorageSettings,
    load_account_settings,
    load_archive_settings,
)
from ..settings.archive import shown_url
from ..storage import Storage, open_storage
from .archiver import Archiver, ArchiveRunner, list_earlier_deletions
from .database import ArchiveDatabase, ArchiveUnavailable, check_schema, migrate, open_pool
from .history import LedgerPage, ledger_page
from .lag import complete_until_ms, follow_lag
from .lease import Lease
from .reports import UsageError, UsageQuery, report_csv, usage_report
from .restore import RestoreRefused, RestoreResult, restore

COMMANDS = ("archive", "usage")
VERB_HELP = {
    "migrate": "create or update the archive's tables in PostgreSQL (safe to run again)",
    "run": "run the archiver here, instead of (or beside) `serve` (one holds the lease)",
    "status": "show how far the archive is and which instance archives",
    "restore": "rebuild balances, spend and keys into an empty Redis from the archive "
    "(docs/archive.md)",
}
GROUP_HELP = "the PostgreSQL ledger archive (docs/archive.md)"
USAGE_HELP = (
    "a usage report from the ledger archive: requests, tokens and USD per hour, day, model, "
    "key or account, with exact totals (docs/archive.md)"
)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("archive", help=GROUP_HELP, description=GROUP_HELP)
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, verb_help in VERB_HELP.items():
        p = verbs.add_parser(verb, help=verb_help, description=verb_help)
        p.add_argument(
            "--config", metavar="FILE", help="the config with [archive] (default: $RLGW_CONFIG)"
        )
        p.add_argument("--url", metavar="URL", help="this PostgreSQL database instead")
        if verb in ("status", "restore"):
            p.add_argument("--json", action="store_true", help="print JSON")
        if verb == "run":
            p.add_argument(
                "--metrics-port",
                type=int,
                metavar="PORT",
                help="serve /metrics (the rlgw_archive_* and storage metrics) on this port",
            )
            p.add_argument(
                "--metrics-host", default="127.0.0.1", help="its address (default 127.0.0.1)"
            )
    _add_usage_parser(sub)


def _add_usage_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("usage", help=USAGE_HELP, description=USAGE_HELP)
    p.add_argument(
        "--config", metavar="FILE", help="the config with [archive] (default: $RLGW_CONFIG)"
    )
    p.add_argument("--url", metavar="URL", help="this PostgreSQL database instead")
    p.add_argument("--account", metavar="ID", help="only this account's entries")
    p.add_argument("--key", metavar="KEY_ID", help="only this key's entries (key_…)")
    p.add_argument("--model", metavar="MODEL", help="only this model's entries")
    p.add_argument(
        "--from", dest="start", metavar="TIME", help="from this RFC 3339 time or date (included)"
    )
    p.add_argument("--to", dest="end", metavar="TIME", help="to this time or date (excluded)")
    p.add_argument(
        "--group-by",
        metavar="G,…",
        help="one row per group: a comma list of hour, day (UTC), model, key, account "
        "(default: one row, the total)",
    )
    output = p.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="print CSV (one row per group)")
    output.add_argument("--json", action="store_true", help="print JSON")


def _settings(args: argparse.Namespace) -> tuple[StorageSettings, ArchiveSettings]:
    storage, archive = load_archive_settings(args.config)
    if args.url:
        archive = (
            ArchiveSettings(url=args.url)
            if archive is None
            else msgspec.structs.replace(archive, url=args.url)
        )
    if archive is None:
        raise ConfigError("archive: the config has no [archive] section (and no --url given)")
    return storage, archive


def dispatch(args: argparse.Namespace) -> int:
    command = _usage if args.command == "usage" else VERBS[args.verb]
    try:
        return asyncio.run(command(args))
    except (ArchiveUnavailable, RestoreRefused) as exc:
        print(f"archive error: {exc}", file=sys.stderr)
        return 1


async def _migrate(args: argparse.Namespace) -> int:
    storage_settings, archive = _settings(args)
    pool = await open_pool(archive.url, max_size=1)
    try:
        applied = await migrate(pool)
    finally:
        await pool.close()
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")
    print(f"{shown_url(archive.url)}: schema up to date")
    if not storage_settings.url.startswith("memory://"):
        storage = open_storage(storage_settings)
        try:
            listed = await list_earlier_deletions(storage)
        finally:
            await storage.close()
        if listed:
            print(
                f"{listed} accounts deleted by an earlier version: their ledgers are archived too"
            )
    return 0


def _redis_storage(settings: StorageSettings) -> Storage:
    if settings.url.startswith("memory://"):
        raise ConfigError(
            "storage.url: memory:// lives inside one gateway process; the archive commands "
            "need the gateways' Redis"
        )
    return open_storage(settings)


async def _run(args: argparse.Namespace) -> int:
    storage_settings, archive = _settings(args)
    storage = _redis_storage(storage_settings)
    database = ArchiveDatabase(archive.url, max_size=2)
    registry = CollectorRegistry()
    metrics = create_metrics(registry)
    storage.observer = StorageMetrics(metrics)
    runner = ArchiveRunner(
        Archiver(storage, database, archive, metrics), Lease(storage, archive.lease_s), archive
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runner.stop)
    print(f"archiving to {shown_url(archive.url)} (lease {runner.lease.token})", file=sys.stderr)
    exporter = None
    if args.metrics_port is not None:
        exporter = await _serve_metrics(registry, args.metrics_host, args.metrics_port)
    lag = asyncio.create_task(follow_lag(storage, metrics, archive.interval_s))
    try:
        await runner.run()
    finally:
        lag.cancel()
        if exporter is not None:
            await exporter.cleanup()
        await database.close()
        await storage.close()
    return 0


async def _serve_metrics(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    """/metrics of a standalone archiver: what the gateways' Archive row and alerts read."""

    async def scrape(_: web.Request) -> web.Response:
        body, content_type = exposition(registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def _status(args: argparse.Namespace) -> int:
    storage_settings, archive = _settings(args)
    storage = _redis_storage(storage_settings)
    database = ArchiveDatabase(archive.url, max_size=1)
    try:
        status = await archive_status(storage, database)
    finally:
        await database.close()
        await storage.close()
    if args.json:
        sys.stdout.write(msgspec.json.encode(status).decode() + "\n")
    else:
        sys.stdout.write(text_output.render(status))
    return 0


async def archive_status(storage: Storage, database: ArchiveDatabase) -> dict[str, Any]:
    from ..keyspace import ARCHIVE_LEASE
    from ..management import iso

    holder = await storage.call("GET", ARCHIVE_LEASE)
    until_ms = await complete_until_ms(storage)
    pool = await database.pool()
    async with pool.acquire() as conn:
        entries = await conn.fetchval("SELECT count(*) FROM ledger_entries")
        streams = await conn.fetchval("SELECT count(*) FROM archive_cursors")
        complete = await conn.fetchval("SELECT complete_until FROM archive_progress")
    return {
        "archiver": None if holder is None else str(holder),
        "complete_until": None if complete is None else complete.isoformat(),
        "complete_until_in_storage": None if until_ms is None else iso(until_ms),
        "entries": entries,
        "streams": streams,
    }


async def _restore(args: argparse.Namespace) -> int:
    storage_settings, archive = _settings(args)
    zone = load_account_settings(args.config).default_timezone
    storage = _redis_storage(storage_settings)
    pool = await open_pool(archive.url, max_size=1)
    try:
        await check_schema(pool)
        result = await restore(storage, pool, default_timezone=zone)
    finally:
        await pool.close()
        await storage.close()
    shown = restore_report(result)
    if args.json:
        sys.stdout.write(msgspec.json.encode(shown).decode() + "\n")
    else:
        sys.stdout.write(text_output.render(shown))
        print(
            f"Lost: ledger entries after {result.complete_until or 'the start'} (not archived "
            f"yet) and account/key changes after {result.snapshot_at or 'the start'}; see "
            "docs/archive.md for what to do about each list above.",
            file=sys.stderr,
        )
    return 0


def restore_report(result: RestoreResult) -> dict[str, Any]:
    """What was restored, and what was not (each list: what an operator must see to)."""
    return {
        "accounts": result.accounts,
        "deleted_accounts": result.deleted_accounts,
        "keys": result.keys,
        "total_balance_usd": format_usd(result.balance_usd_nano),
        "topup_idempotency_keys": result.topup_keys,
        "budget_periods": result.budget_periods,
        # Ledger entries after this were not archived when Redis was lost: they are gone.
        "ledger_complete_until": result.complete_until,
        # Account and key changes after this (new keys, rotations, limits) are gone.
        "records_as_of": result.snapshot_at,
        "not_restored_accounts_without_snapshot": result.accounts_without_snapshot,
        "not_restored_keys_without_secret_hash": result.keys_without_secret_hash,
        "webhooks_needing_new_secret": result.webhooks_needing_secret,
        "prepaid_balance_differs_from_credits_less_charges": result.balance_differs_from_sum,
    }


async def _usage(args: argparse.Namespace) -> int:
    _, archive = _settings(args)
    try:
        query = UsageQuery.parse(
            account=args.account,
            key=args.key,
            model=args.model,
            start=args.start,
            end=args.end,
            group_by=args.group_by,
        )
    except UsageError as exc:
        print(f"error: --{exc.field.replace('_', '-')}: {exc.message}", file=sys.stderr)
        return 2
    database = ArchiveDatabase(archive.url, max_size=1)
    try:
        report = await usage_report(database, query)
    finally:
        await database.close()
    if args.csv:
        sys.stdout.write(report_csv(report))
    elif args.json:
        sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    else:
        sys.stdout.write(text_output.render(report))
    return 0


async def ledger_page_of(
    store: AccountStore, args: argparse.Namespace, archive: ArchiveSettings | None
) -> LedgerPage:
    """`accounts ledger`: a page of the account's ledger, on into the archive when the
    config has one (the cursor of the next page on stderr)."""
    database = None if archive is None else ArchiveDatabase(archive.url, max_size=1)
    try:
        page = await ledger_page(store, database, args.id, args.limit, args.before)
    finally:
        if database is not None:
            await database.close()
    if page.next_before is not None:
        print(f"next before: {page.next_before}", file=sys.stderr)
    return page


VERBS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "migrate": _migrate,
    "run": _run,
    "status": _status,
    "restore": _restore,
}
