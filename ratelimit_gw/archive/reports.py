"""Usage reports from the archive (SPEC §16, docs/archive.md): requests, tokens and money per
hour, day (UTC), model, key or account, filtered by account, key, model and a half-open time
range [from, to) on when Redis appended each entry.

The promise: money is summed as integers of nano-USD (a ``sum()`` of bigint is numeric in
PostgreSQL: exact) and shown as exact decimal strings, so a report's totals equal the archived
ledger to the nano-dollar, and its rows add up to its totals. ``net_usd`` is what the entries
did to a prepaid balance: credited (top-ups, adjustments, forfeits) minus charged. Each report
says up to when the archive is complete (``complete_until``): entries appended later may be
missing from it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

import msgspec

from ..management import iso
from ..money import format_usd
from .database import ArchiveDatabase
from .reading import archive_connection

# Each grouping → the column of a row that holds its value.
GROUP_COLUMNS = {
    "hour": "hour",
    "day": "day",
    "model": "model",
    "key": "key_id",
    "account": "account_id",
}
_GROUP_SQL = {
    "hour": "date_trunc('hour', at AT TIME ZONE 'UTC')",
    "day": "(at AT TIME ZONE 'UTC')::date",
    "model": "model",
    "key": "key_id",
    "account": "account_id",
}
FORMATS = ("json", "csv")
# What a request left in the ledger: a settlement that charged, or one that released its hold
# without a cost. Overruns and expired holds describe one of them (or nothing), not a request.
_REQUEST_TYPES = "('charge', 'release')"
_CREDIT_TYPES = "('topup', 'adjustment', 'forfeit')"
_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
_MAX_FILTER_CHARS = 200


class UsageError(ValueError):
    """A report asked for wrongly; ``field`` names the parameter at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class UsageQuery:
    account: str | None = None
    key: str | None = None
    model: str | None = None
    start: datetime | None = None  # inclusive
    end: datetime | None = None  # exclusive
    group_by: tuple[str, ...] = ()

    @classmethod
    def parse(
        cls,
        *,
        account: str | None = None,
        key: str | None = None,
        model: str | None = None,
        start: str | None = None,
        end: str | None = None,
        group_by: str | None = None,
    ) -> UsageQuery:
        """The query from its text parameters (query string, command line); UsageError names
        the first one that is wrong. ``start`` and ``end`` are the ``from`` and ``to``."""
        query = cls(
            account=_filter("account", account),
            key=_filter("key", key),
            model=_filter("model", model),
            start=_time("from", start),
            end=_time("to", end),
            group_by=_groups(group_by),
        )
        if query.start is not None and query.end is not None and query.start >= query.end:
            raise UsageError("to", "must be after from (the range is [from, to))")
        return query


class UsageTotals(msgspec.Struct, kw_only=True):
    requests: int  # charge and release entries: settled requests
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: str  # Σ charges
    credited_usd: str  # Σ top-ups, adjustments (signed) and forfeits (negative)
    net_usd: str  # credited − cost: what the entries did to a prepaid balance


class UsageRow(UsageTotals, kw_only=True):
    # The group's values, only those of the report's group_by (null: the entries have none,
    # e.g. a top-up's model). hour: its start, RFC 3339 UTC; day: YYYY-MM-DD, UTC.
    hour: str | msgspec.UnsetType | None = msgspec.UNSET
    day: str | msgspec.UnsetType | None = msgspec.UNSET
    model: str | msgspec.UnsetType | None = msgspec.UNSET
    key_id: str | msgspec.UnsetType | None = msgspec.UNSET
    account_id: str | msgspec.UnsetType | None = msgspec.UNSET


class UsageFilters(msgspec.Struct, kw_only=True):
    account: str | None
    key: str | None
    model: str | None
    from_: str | None = msgspec.field(name="from")
    to: str | None


class UsageReport(msgspec.Struct, kw_only=True):
    group_by: list[str]
    filters: UsageFilters
    # Every entry Redis appended before this time is in the archive (null: no archiver pass
    # has completed yet); later ones may not be.
    complete_until: str | None
    rows: list[UsageRow]  # one per group, ordered by the group's values; none: one, the total
    totals: UsageTotals  # the rows' sums, exactly


@dataclass
class _Sums:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_nano: int = 0
    credited_nano: int = 0

    def add(self, other: _Sums) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def totals(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            **{name: getattr(self, name) for name in _TOKENS},
            "cost_usd": format_usd(self.cost_nano),
            "credited_usd": format_usd(self.credited_nano),
            "net_usd": format_usd(self.credited_nano - self.cost_nano),
        }


def _statement(query: UsageQuery) -> tuple[str, list[object]]:
    conditions: list[str] = []
    values: list[object] = []
    for column, value in (
        ("account_id", query.account),
        ("key_id", query.key),
        ("model", query.model),
    ):
        if value is not None:
            values.append(value)
            conditions.append(f"{column} = ${len(values)}")
    if query.start is not None:
        values.append(query.start)
        conditions.append(f"at >= ${len(values)}")
    if query.end is not None:
        values.append(query.end)
        conditions.append(f"at < ${len(values)}")
    groups = [f"{_GROUP_SQL[g]} AS g_{g}" for g in query.group_by]
    sums = [
        f"count(*) FILTER (WHERE entry_type IN {_REQUEST_TYPES}) AS requests",
        *(
            f"coalesce(sum({t}) FILTER (WHERE entry_type IN {_REQUEST_TYPES}), 0) AS {t}"
            for t in _TOKENS
        ),
        "coalesce(sum(cost_nano), 0) AS cost_nano",
        f"coalesce(sum(amount_nano) FILTER (WHERE entry_type IN {_CREDIT_TYPES}), 0) "
        "AS credited_nano",
    ]
    sql = f"SELECT {', '.join([*groups, *sums])} FROM ledger_entries"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    if groups:
        positions = ", ".join(str(i) for i in range(1, len(groups) + 1))
        sql += f" GROUP BY {positions} ORDER BY {positions}"
    return sql, values


async def usage_report(database: ArchiveDatabase, query: UsageQuery) -> UsageReport:
    """The report; ArchiveUnavailable when PostgreSQL cannot answer."""
    sql, values = _statement(query)
    # One snapshot: the rows and complete_until agree with each other.
    async with (
        archive_connection(database) as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        records = await conn.fetch(sql, *values)
        complete = await conn.fetchval("SELECT complete_until FROM archive_progress")
    total = _Sums()
    rows = []
    for record in records:
        # numeric sums arrive as Decimal: integral, so int() is exact.
        sums = _Sums(*(int(record[name]) for name in _Sums.__dataclass_fields__))
        total.add(sums)
        groups = {GROUP_COLUMNS[g]: _group_value(g, record[f"g_{g}"]) for g in query.group_by}
        rows.append(UsageRow(**sums.totals(), **groups))  # type: ignore[arg-type]
    return UsageReport(
        group_by=list(query.group_by),
        filters=UsageFilters(
            account=query.account,
            key=query.key,
            model=query.model,
            from_=None if query.start is None else _rfc3339(query.start),
            to=None if query.end is None else _rfc3339(query.end),
        ),
        complete_until=None if complete is None else _rfc3339(complete),
        rows=rows,
        totals=UsageTotals(**total.totals()),  # type: ignore[arg-type]
    )


def csv_columns(group_by: Sequence[str]) -> list[str]:
    return [
        *(GROUP_COLUMNS[g] for g in group_by),
        *UsageTotals.__struct_fields__,
        "complete_until",
    ]


def report_csv(report: UsageReport) -> str:
    """A header row, then one row per group (no totals row: the rows add up to the totals
    exactly). Every row repeats the report's ``complete_until``, so a saved file still says
    up to when it is complete."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    columns = csv_columns(report.group_by)
    writer.writerow(columns)
    for row in report.rows:
        fields = msgspec.structs.asdict(row)
        fields["complete_until"] = report.complete_until
        writer.writerow(["" if fields[c] is None else fields[c] for c in columns])
    return out.getvalue()


def _group_value(group: str, value: object) -> str | None:
    if value is None:
        return None
    if group == "hour" and isinstance(value, datetime):
        return _rfc3339(value.replace(tzinfo=UTC))
    if group == "day" and isinstance(value, date):
        return value.isoformat()
    return str(value)


def _rfc3339(moment: datetime) -> str:
    return iso(round(moment.timestamp() * 1000))


def _filter(field: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not value or len(value) > _MAX_FILTER_CHARS:
        raise UsageError(field, f"must be 1 to {_MAX_FILTER_CHARS} characters")
    return value


def _time(field: str, value: str | None) -> datetime | None:
    """RFC 3339 with an offset (``2026-12-01T00:00:00Z``), or a date (its midnight, UTC)."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            parsed = datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        else:
            parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError("no offset")
        parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise UsageError(
            field, f"{value!r} is not an RFC 3339 time with an offset, e.g. 2026-12-01T00:00:00Z"
        ) from None
    if not 1970 <= parsed.year <= 9999:
        raise UsageError(field, f"{value!r} is not between 1970 and 9999")
    return parsed


def _groups(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    groups = tuple(part.strip() for part in value.split(","))
    for group in groups:
        if group not in GROUP_COLUMNS:
            raise UsageError(
                "group_by", f"{group!r} is not one of {', '.join(GROUP_COLUMNS)} (comma list)"
            )
    if len(set(groups)) != len(groups):
        raise UsageError("group_by", "names a grouping twice")
    return groups
