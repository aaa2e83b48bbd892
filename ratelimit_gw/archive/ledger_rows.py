"""A Redis ledger entry as its archive row: what identifies it, and how its columns are made.

A row's identity is the entry itself, never its stream id (unique only within one account's
stream, and rewound after a Redis wipe): the account, a reference, and the entry type. The
reference is the gateway's settlement id for what a request wrote (``charge`` and ``release``
carry it as ``settlement_id``; ``overrun`` and ``hold_expired`` as ``request_id``), the
idempotency key for ``topup`` and ``adjustment``, and the deletion's time for ``forfeit``
(an id is deleted once). An entry of a type this build does not know falls back to its
stream id, so it is still archived.

The archiver sends a batch as one JSON document of ``[account, stream id, reference,
fields]`` and Postgres makes the columns (:data:`INSERT_ENTRIES`): encoding one string is
cheap for the gateway's event loop, where per-column arrays cost ~30 µs an entry.
"""

from __future__ import annotations

import json
from typing import Any


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


def entry_item(account_id: str, stream_id: str, fields: dict[str, str]) -> list[Any]:
    """One element of the batch document :data:`INSERT_ENTRIES` reads."""
    return [account_id, stream_id, reference(fields.get("type", ""), fields, stream_id), fields]


def orphan_item(stream_id: str, fields: dict[str, str]) -> list[Any]:
    """One element of the batch document :data:`INSERT_ORPHANS` reads: the account the
    settlement was for, and the gateway's settlement id (its identity)."""
    settlement_id = fields.get("request_id") or "stream:" + stream_id
    return [fields.get("account_id", ""), stream_id, settlement_id, fields]


def batch_document(items: list[list[Any]]) -> str:
    return json.dumps(items, separators=(",", ":"))


def _number(name: str) -> str:
    # Redis holds integers as text; an empty field is no value.
    return f"nullif(f->>'{name}', '')::bigint"


# $1: a JSON array of entry_item()s. A batch's repeats (an entry read again after a crash)
# are skipped by the primary key; the row count in the status is the entries new to Postgres.
INSERT_ENTRIES = f"""
INSERT INTO ledger_entries (
    account_id, stream_id, ref, entry_type, stream_ms, stream_seq, at, key_id, model,
    request_id, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
    cost_nano, amount_nano, hold_nano, balance_nano, outcome, idempotency_key, reason, fields)
SELECT
    e->>0, e->>1, e->>2, coalesce(f->>'type', ''),
    split_part(e->>1, '-', 1)::bigint, coalesce(nullif(split_part(e->>1, '-', 2), ''), '0')::bigint,
    to_timestamp(split_part(e->>1, '-', 1)::bigint / 1000.0),
    f->>'key_id', f->>'model', f->>'request_id',
    {_number("input_tokens")}, {_number("output_tokens")},
    {_number("cache_read_tokens")}, {_number("cache_write_tokens")},
    -- A balance entry's cost_nano is 0 by definition; only a charge moves spend.
    CASE WHEN f->>'type' = 'charge' THEN coalesce({_number("cost_nano")}, 0) ELSE 0 END,
    {_number("amount_nano")}, {_number("hold_nano")}, {_number("balance_nano")},
    f->>'outcome', f->>'idempotency_key', f->>'reason', f
FROM jsonb_array_elements($1::jsonb) AS e, LATERAL (SELECT e->3 AS f) AS fields
ON CONFLICT DO NOTHING
"""

INSERT_ORPHANS = """
INSERT INTO orphan_settlements (account_id, stream_id, settlement_id, at, fields)
SELECT e->>0, e->>1, e->>2, to_timestamp(split_part(e->>1, '-', 1)::bigint / 1000.0), e->3
FROM jsonb_array_elements($1::jsonb) AS e
ON CONFLICT DO NOTHING
"""
