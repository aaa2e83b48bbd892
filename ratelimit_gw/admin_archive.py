"""The admin routes that read the ledger archive (docs/admin.md, docs/archive.md): the usage
report, and the account ledger's pages beyond what Redis still holds.

No ``[archive]``: the usage report is 404 ``archive_not_configured`` (the ledger is Redis's
alone). PostgreSQL unreachable or its schema behind: 503 ``archive_unavailable`` with a
retry-after, as storage's own outage is answered.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from aiohttp import web

from .accounts import AccountStore
from .admin_routes import AccountId, KeyId, QueryParam
from .archive.database import ArchiveDatabase, ArchiveUnavailable
from .archive.history import ledger_page
from .archive.reports import FORMATS, UsageError, UsageQuery, report_csv, usage_report
from .errors import GatewayError
from .services import SERVICES

RETRY_AFTER_MS = 5000
MAX_LEDGER_PAGE = 10_000
GroupBy = Annotated[
    str,
    msgspec.Meta(
        description="a comma list of hour, day (UTC), model, key, account",
        extra_json_schema={"examples": ["day,model"]},
    ),
]
Rfc3339 = Annotated[
    str,
    msgspec.Meta(
        description="an RFC 3339 time with an offset, or a date (its midnight UTC)",
        extra_json_schema={"examples": ["2026-12-01T00:00:00Z"]},
    ),
]
USAGE_QUERY = (
    QueryParam("account", AccountId, "only this account's entries"),
    QueryParam("key", KeyId, "only this key's entries (by id)"),
    QueryParam("model", str, "only this model's entries"),
    QueryParam("from", Rfc3339, "entries appended at or after this time"),
    QueryParam("to", Rfc3339, "entries appended before this time"),
    QueryParam("group_by", GroupBy, "one row per group (default: one row, the total)"),
    QueryParam("format", Literal["json", "csv"], "json (default) or csv"),
)
LEDGER_QUERY = (
    QueryParam("limit", int, f"entries to show, 1 to {MAX_LEDGER_PAGE} (default 100)"),
    QueryParam("before", str, "the next_before of the page before: entries older than it"),
)


def unavailable(exc: ArchiveUnavailable) -> GatewayError:
    return GatewayError(
        503,
        "archive_unavailable",
        f"The ledger archive is unavailable: {exc}",
        retry_after_ms=RETRY_AFTER_MS,
    )


def _archive(request: web.Request) -> ArchiveDatabase:
    archive = request.app[SERVICES].archive
    if archive is None:
        raise GatewayError(
            404,
            "archive_not_configured",
            "This gateway has no [archive]: usage reports read the PostgreSQL ledger archive "
            "(docs/archive.md).",
        )
    return archive


async def usage(request: web.Request, accounts: AccountStore) -> web.Response:
    archive = _archive(request)
    params = request.query
    answer_format = params.get("format", "json")
    if answer_format not in FORMATS:
        raise GatewayError(400, "invalid_request", "format must be json or csv", param="format")
    try:
        query = UsageQuery.parse(
            account=params.get("account"),
            key=params.get("key"),
            model=params.get("model"),
            start=params.get("from"),
            end=params.get("to"),
            group_by=params.get("group_by"),
        )
    except UsageError as exc:
        raise GatewayError(400, "invalid_request", str(exc), param=exc.field) from None
    try:
        report = await usage_report(archive, query)
    except ArchiveUnavailable as exc:
        raise unavailable(exc) from None
    if answer_format == "csv":
        return web.Response(text=report_csv(report), content_type="text/csv")
    return web.Response(body=msgspec.json.encode(report), content_type="application/json")


async def ledger(request: web.Request, accounts: AccountStore) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise GatewayError(400, "invalid_request", "limit must be an integer") from None
    limit = max(1, min(limit, MAX_LEDGER_PAGE))
    svc = request.app[SERVICES]
    try:
        page = await ledger_page(
            accounts, svc.archive, request.match_info["id"], limit, request.query.get("before")
        )
    except ArchiveUnavailable as exc:
        raise unavailable(exc) from None
    return web.Response(body=msgspec.json.encode(page), content_type="application/json")
