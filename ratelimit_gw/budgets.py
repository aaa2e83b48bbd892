"""Budgets per period (SPEC §15, docs/limits-and-balance.md): what a budget is, the bounds of
its current period, and the checks of a change to one.

A budget is a USD cap on what a key or an account may spend per period: ``day``, ``week``
(ISO, from Monday) or ``month``, each from midnight in the account's time zone, or
``custom``: rolling windows of ``period_s`` seconds anchored at the Unix epoch (short test
and demo windows, and operators who want fixed N-second windows).

Time stays the store's: the gateway computes a period's bounds here, and admit.lua checks its
own ``TIME`` against them, refusing a stale period (the gateway then recomputes them for the
time the script saw). Storage keeps, per budget, its cap and period in the scope's hash
(``budget_nano``, ``budget_period``; the account's ``timezone``), and per period one hash of
``spent_nano`` and ``held_nano`` (keyspace.py) that expires after the period ends.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from .management import AccountError, FieldChanges, iso
from .money import MoneyError, format_usd, parse_usd

PERIODS = ("day", "week", "month", "custom")
MAX_CUSTOM_PERIOD_S = 366 * 86_400
# A period's spend hash outlives the period by this much more than the longest hold's TTL,
# so a hold placed just before the end still finds it when it settles.
SPEND_MARGIN_MS = 3_600_000
# The fields of a budget in its scope's hash (the account's or the key's).
BUDGET_FIELDS = ("budget_nano", "budget_period")


class Budget(msgspec.Struct, kw_only=True):
    """A budget as the admin API and the CLI show it: its cap, and the current period."""

    usd: str  # the cap per period
    period: str  # day, week, month, or custom
    period_s: int | None  # the length of a custom period
    timezone: str  # the account's: where the calendar periods begin
    period_start: str  # RFC 3339, UTC
    resets_at: str  # the end of the current period (RFC 3339, UTC)
    spent_usd: str  # settled in this period
    held_usd: str  # held by requests in flight that were admitted in this period
    remaining_usd: str  # the cap less both ("0.00" at or over it)


class BudgetUse(msgspec.Struct, frozen=True):
    """One budget's current period as a settlement left it (budget_watch.py)."""

    account: str
    scope: str  # "account" or "key"
    key_id: str | None  # the key's, for a key's budget
    spec: str  # its period (``day``, ``custom:60``, ...)
    start_ms: int
    end_ms: int
    cap_nano: int
    spent_nano: int
    held_nano: int

    @property
    def ratio(self) -> float:
        return (self.spent_nano + self.held_nano) / self.cap_nano


def check_timezone(name: Any) -> str:
    """An IANA time zone name zoneinfo knows (``Europe/Paris``), or 400."""
    if not isinstance(name, str) or not name or len(name) > 64:
        raise AccountError(400, "invalid_request", "timezone must be an IANA time zone name")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise AccountError(
            400,
            "invalid_request",
            f"timezone {name!r} is not a known IANA time zone name (like 'Europe/Paris')",
        ) from None
    return name


def period_spec(period: Any, period_s: Any) -> str:
    """The stored form of a period: ``day``, ``week``, ``month`` or ``custom:<seconds>``."""
    if period not in PERIODS:
        raise AccountError(
            400, "invalid_request", "budget_period must be day, week, month or custom"
        )
    if period != "custom":
        if period_s is not None:
            raise AccountError(
                400, "invalid_request", "budget_period_s is only for budget_period custom"
            )
        return str(period)
    if (
        isinstance(period_s, bool)
        or not isinstance(period_s, int)
        or not 1 <= period_s <= MAX_CUSTOM_PERIOD_S
    ):
        raise AccountError(
            400,
            "invalid_request",
            f"budget_period custom needs budget_period_s, 1 to {MAX_CUSTOM_PERIOD_S} seconds",
        )
    return f"custom:{period_s}"


def budget_changes(changes: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """The hash fields to set and to clear for the budget fields of a PATCH
    (``budget_usd``, ``budget_period``, ``budget_period_s``): a cap sets its period with it;
    ``budget_usd: null`` clears the budget."""
    sent = {
        n: changes[n] for n in ("budget_usd", "budget_period", "budget_period_s") if n in changes
    }
    if not sent:
        return [], []
    if "budget_usd" not in sent:
        raise AccountError(
            400, "invalid_request", "budget_period needs budget_usd (null clears the budget)"
        )
    usd = sent["budget_usd"]
    if usd is None:
        if len(sent) > 1:
            raise AccountError(
                400, "invalid_request", "budget_usd null clears the budget: send no period"
            )
        return [], list(BUDGET_FIELDS)
    try:
        nano = parse_usd(usd) if isinstance(usd, str) else -1
    except MoneyError:
        nano = -1
    if nano <= 0:
        raise AccountError(
            400, "invalid_request", "budget_usd must be a positive decimal string like '25.00'"
        )
    if "budget_period" not in sent:
        raise AccountError(
            400, "invalid_request", "budget_usd needs budget_period (day, week, month, custom)"
        )
    spec = period_spec(sent["budget_period"], sent.get("budget_period_s"))
    return ["budget_nano", nano, "budget_period", spec], []


def apply_budget_changes(fields: FieldChanges, changes: dict[str, Any]) -> None:
    """Add a PATCH's budget fields to ``fields`` (an account's or a key's hash changes)."""
    budget_set, budget_cleared = budget_changes(changes)
    for field_name, field_value in zip(budget_set[::2], budget_set[1::2], strict=True):
        fields.set(field_name, field_value)
    for field_name in budget_cleared:
        fields.clear(field_name)


def bounds(spec: str, timezone: str, now_ms: int) -> tuple[int, int]:
    """The current period of ``spec`` at ``now_ms``: [start_ms, end_ms)."""
    if spec.startswith("custom:"):
        length = int(spec[7:]) * 1000
        start = now_ms // length * length
        return start, start + length
    zone = ZoneInfo(timezone)
    local = datetime.fromtimestamp(now_ms / 1000, zone)
    if spec == "day":
        first = local.date()
        after = first + timedelta(days=1)
    elif spec == "week":
        first = local.date() - timedelta(days=local.weekday())
        after = first + timedelta(days=7)
    elif spec == "month":
        first = local.date().replace(day=1)
        after = (first + timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {spec!r}")
    # Midnight built afresh in the zone for each bound: a DST change shortens or lengthens
    # the period, never shifts its start.
    begins = datetime(first.year, first.month, first.day, tzinfo=zone)
    ends = datetime(after.year, after.month, after.day, tzinfo=zone)
    return int(begins.timestamp() * 1000), int(ends.timestamp() * 1000)


def spend_name(spec: str, start_ms: int) -> str:
    """The part of a spend hash's name that tells its period: ``day:<start ms>``."""
    return f"{spec}:{start_ms}"


def shown(
    raw: dict[str, str], timezone: str, spend: dict[str, str] | None, now_ms: int | None = None
) -> Budget | None:
    """The budget a scope's hash ``raw`` carries, with the current period's ``spend``."""
    nano, spec = raw.get("budget_nano"), raw.get("budget_period")
    if not nano or not spec:
        return None
    start, end = bounds(spec, timezone, now_ms if now_ms is not None else int(time.time() * 1000))
    spend = spend or {}
    spent, held = int(spend.get("spent_nano", 0)), int(spend.get("held_nano", 0))
    cap = int(nano)
    period, _, seconds = spec.partition(":")
    return Budget(
        usd=format_usd(cap),
        period=period,
        period_s=int(seconds) if seconds else None,
        timezone=timezone,
        period_start=iso(start),
        resets_at=iso(end),
        spent_usd=format_usd(spent),
        held_usd=format_usd(held),
        remaining_usd=format_usd(max(cap - spent - held, 0)),
    )


def current_spec(raw: dict[str, str], timezone: str, now_ms: int) -> tuple[str, int] | None:
    """(period spec, start ms) of the budget ``raw`` carries now, or None."""
    spec = raw.get("budget_period")
    if not raw.get("budget_nano") or not spec:
        return None
    return spec, bounds(spec, timezone, now_ms)[0]
