"""A Redis ledger entry as its archive row: what identifies it, and its columns.

A row's identity is the entry itself, never its stream id (unique only within one account's
stream, and rewound after a Redis wipe): the account, a reference, and the entry type. The
reference is the gateway's settlement id for what a request wrote (``charge`` and ``release``
carry it as ``settlement_id``; ``overrun`` and ``hold_expired`` as ``request_id``), the
idempotency key for ``topup`` and ``adjustment``, and the deletion's time for ``forfeit``
(an id is deleted once). An entry of a type this build does not know falls back to its
stream id, so it is still archived.
"""

from __future__ import annotations

import json
from typing import Any

# Columns of ledger_entries that the archiver writes, in order (archived_at is the default).
COLUMNS = (
    "account_id",
    "entry_type",
    "ref",
    "stream_id",
    "stream_ms",
    "stream_seq",
    "at",
    "key_id",
    "model",
    "request_id",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_nano",
    "amount_nano",
    "hold_nano",
    "balance_nano",
    "outcome",
    "idempotency_key",
    "reason",
    "fields",
)
# Postgres types of COLUMNS, for the unnest() of one batch.
COLUMN_TYPES = (
    "text",
    "text",
    "text",
    "text",
    "bigint",
    "bigint",
    "bigint",  # at: epoch ms, made a timestamp by the statement
    "text",
    "text",
    "text",
    "bigint",
    "bigint",
    "bigint",
    "bigint",
    "bigint",
    "bigint",
    "bigint",
    "bigint",
    "text",
    "text",
    "text",
    "jsonb",
)
_INTEGERS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
)
_NANOS = ("amount_nano", "hold_nano", "balance_nano")


def stream_position(stream_id: str) -> tuple[int, int]:
    """``"1712345678901-3"`` → (1712345678901, 3): the order of ids in one stream."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def next_stream_id(stream_id: str) -> str:
    """The smallest id after ``stream_id`` (XTRIM MINID keeps it and everything newer)."""
    ms, seq = stream_position(stream_id)
    return f"{ms}-{seq + 1}"


def reference(entry_type: str, fields: dict[str, str], stream_id: str) -> str:
    if entry_type in ("topup", "adjustment") and fields.get("idempotency_key"):
        return fields["idempotency_key"]
    if fields.get("settlement_id"):
        return fields["settlement_id"]
    if entry_type in ("overrun", "hold_expired") and fields.get("request_id"):
        return fields["request_id"]
    if entry_type == "forfeit" and fields.get("deleted_ms"):
        return "deleted:" + fields["deleted_ms"]
    return "stream:" + stream_id


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def ledger_row(account_id: str, stream_id: str, fields: dict[str, str]) -> tuple[Any, ...]:
    """The row of one entry, in :data:`COLUMNS` order (``at`` as epoch ms: the statement turns
    it into a timestamp)."""
    entry_type = fields.get("type", "")
    ms, seq = stream_position(stream_id)
    # A balance entry's cost_nano is 0 by definition; only a charge moves spend.
    cost = int(fields.get("cost_nano") or 0) if entry_type == "charge" else 0
    return (
        account_id,
        entry_type,
        reference(entry_type, fields, stream_id),
        stream_id,
        ms,
        seq,
        ms,
        fields.get("key_id"),
        fields.get("model"),
        fields.get("request_id"),
        *(_int(fields.get(name)) for name in _INTEGERS),
        cost,
        *(_int(fields.get(name)) for name in _NANOS),
        fields.get("outcome"),
        fields.get("idempotency_key"),
        fields.get("reason"),
        json.dumps(fields, separators=(",", ":"), sort_keys=True),
    )


def orphan_row(stream_id: str, fields: dict[str, str]) -> tuple[Any, ...]:
    """(account_id, settlement_id, stream_id, at ms, fields) of an orphan settlement."""
    return (
        fields.get("account_id", ""),
        fields.get("request_id") or "stream:" + stream_id,
        stream_id,
        stream_position(stream_id)[0],
        json.dumps(fields, separators=(",", ":"), sort_keys=True),
    )
