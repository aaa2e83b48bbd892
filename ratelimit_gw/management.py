"""What every management operation (accounts.py, keys.py) shares: its typed error, and the
checks and formats of ids, limits and times."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from . import keyspace
from .limits import MAX_LIMIT, Limits


class AccountError(Exception):
    """A management operation cannot be done; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


# The last instant a datetime can show (9999-12-31T23:59:59.999Z): a later time could be
# stored but never printed back.
_MAX_TIME_MS = 253_402_300_799_999


def parse_time_ms(value: str) -> int:
    """RFC 3339 time or unix seconds → unix ms, from 1970 to the end of year 9999."""
    if not isinstance(value, str):
        raise AccountError(400, "invalid_request", f"{value!r} is not an RFC 3339 time")
    try:
        if value.replace(".", "", 1).isdigit():
            time_ms = float(value) * 1000  # inf for absurdly many digits
        else:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            time_ms = parsed.timestamp() * 1000
    except ValueError:
        raise AccountError(400, "invalid_request", f"{value!r} is not an RFC 3339 time") from None
    if not 0 <= time_ms <= _MAX_TIME_MS:
        raise AccountError(
            400, "invalid_request", f"{value!r} is out of range (1970 to the end of 9999)"
        )
    return int(time_ms)


def check_id(value: str, what: str) -> None:
    if not keyspace.ID_PATTERN.match(value):
        raise AccountError(
            400, "invalid_request", f"{what} must be 1-64 of A-Z a-z 0-9 _ . - (got {value!r})"
        )


def check_limit(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise AccountError(400, "invalid_request", f"{name} must be a positive integer or null")
    if value is not None and value > MAX_LIMIT:
        raise AccountError(400, "invalid_request", f"{name} must be at most {MAX_LIMIT}")


def check_limits(limits: Limits) -> None:
    for name, value in limits.items():
        check_limit(name, value)


class FieldChanges:
    """The field writes of one storage hash an update makes: fields set, fields cleared."""

    def __init__(self) -> None:
        self._set: list[Any] = []
        self._cleared: list[str] = []

    def set(self, name: str, value: Any) -> None:
        self._set += [name, value]

    def clear(self, name: str) -> None:
        self._cleared.append(name)

    def limit(self, name: str, value: Any) -> None:
        """A limit: a positive integer is set, None clears it (no such limit)."""
        check_limit(name, value)
        if value is None:
            self.clear(name)
        else:
            self.set(name, value)

    def commands(self, hash_key: str) -> list[tuple[Any, ...]]:
        """The HSET and HDEL that make them (none for no change), to run as one step."""
        commands: list[tuple[Any, ...]] = []
        if self._set:
            commands.append(("HSET", hash_key, *self._set))
        if self._cleared:
            commands.append(("HDEL", hash_key, *self._cleared))
        return commands


def opt_int(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)


def unknown_fields(changes: dict[str, Any], allowed: set[str]) -> None:
    """Refuse a change naming a field it may not set."""
    unknown = sorted(set(changes) - allowed)
    if unknown:
        raise AccountError(400, "invalid_request", f"unknown field(s): {', '.join(unknown)}")
