"""An account's ledger a page at a time, newest first, across the Redis/PostgreSQL boundary.

Redis keeps the recent entries (the archiver trims what is older than its retention and
archived); the archive keeps them all. A page is read from Redis first, then, when Redis has
no more, continued from the archive with the entries older than the last one shown, skipping
any Redis already showed (the same entry may be in both: archived, not yet trimmed, or
restored into Redis). So paging with ``next_before`` walks the whole history with no
duplicate and no gap, and an account Redis no longer knows (a wipe) still pages from the
archive.

Without an archive a page is what Redis holds. With one that cannot be read, a page Redis
filled at least partly is answered with ``next_before`` set (there may be more), and a page
only the archive could fill raises ArchiveUnavailable.
"""

from __future__ import annotations

import json
import logging
import re

import msgspec

from ..accounts import AccountStore, LedgerEntry, ledger_entry
from ..management import AccountError
from .database import ArchiveDatabase, ArchiveUnavailable
from .ledger_rows import reference, stream_position
from .reading import archive_connection

log = logging.getLogger("ratelimit_gw.archive")
STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
_MAX_BIGINT = 2**63 - 1  # the archive's stream_ms and stream_seq columns
_OLDER_ROWS = (
    "SELECT stream_id, fields FROM ledger_entries WHERE account_id = $1 "
    "AND (stream_ms, stream_seq) < ($2, $3) "
    "ORDER BY stream_ms DESC, stream_seq DESC LIMIT $4"
)
_NEWEST_ROWS = (
    "SELECT stream_id, fields FROM ledger_entries WHERE account_id = $1 "
    "ORDER BY stream_ms DESC, stream_seq DESC LIMIT $2"
)


class LedgerPage(msgspec.Struct, kw_only=True):
    data: list[LedgerEntry]  # newest first
    next_before: str | None  # pass as ``before`` for the next page; null: the oldest shown


def _check_before(before: str | None) -> None:
    if before is None:
        return
    if not STREAM_ID.match(before) or max(stream_position(before)) > _MAX_BIGINT:
        raise AccountError(
            400,
            "invalid_request",
            f"before must be a ledger entry id like 1712345678901-0 (got {before!r})",
        )


async def ledger_page(
    accounts: AccountStore,
    archive: ArchiveDatabase | None,
    account_id: str,
    limit: int,
    before: str | None = None,
) -> LedgerPage:
    """Up to ``limit`` entries older than the entry id ``before`` (the newest without it).
    404 ``account_not_found`` only when neither Redis nor the archive knows the account."""
    _check_before(before)
    known = await accounts.account_exists(account_id)
    if before is not None and stream_position(before) == (0, 0):
        return LedgerPage(data=[], next_before=None)  # no id is older (Redis refuses "(0-0")
    recent = await accounts.ledger_fields(account_id, limit, before)
    if archive is None and not known:
        raise _not_found(account_id)
    page = [(entry_id, fields) for entry_id, fields in recent]
    if archive is not None and len(page) < limit:
        oldest = page[-1][0] if page else before
        try:
            older = await _archived(archive, account_id, oldest, limit - len(page), page)
        except ArchiveUnavailable as exc:
            if not page:
                raise
            log.warning("ledger of %s: the archive is unavailable (%s)", account_id, exc)
            return _answer(page, more=True)
        if not page and not older and not known and before is None:
            raise _not_found(account_id)
        page += older
    return _answer(page, more=len(page) >= limit)


async def _archived(
    archive: ArchiveDatabase,
    account_id: str,
    older_than: str | None,
    wanted: int,
    shown: list[tuple[str, dict[str, str]]],
) -> list[tuple[str, dict[str, str]]]:
    """Up to ``wanted`` archived entries older than ``older_than``, newest first, none of
    them one of ``shown``."""
    seen = {_identity(entry_id, fields) for entry_id, fields in shown}
    # Each shown entry matches one row at most (rows are keyed by identity): ask for as many
    # more, and the page fills whatever is skipped.
    count = wanted + len(seen)
    async with archive_connection(archive) as conn:
        if older_than is None:
            rows = await conn.fetch(_NEWEST_ROWS, account_id, count)
        else:
            rows = await conn.fetch(_OLDER_ROWS, account_id, *stream_position(older_than), count)
    found = []
    for row in rows:
        fields = json.loads(row["fields"]) if isinstance(row["fields"], str) else row["fields"]
        if _identity(row["stream_id"], fields) not in seen:
            found.append((str(row["stream_id"]), {str(k): str(v) for k, v in fields.items()}))
    return found[:wanted]


def _identity(entry_id: str, fields: dict[str, str]) -> tuple[str, str]:
    """What an entry is (ledger_rows.py): its reference and type, within one account."""
    entry_type = fields.get("type", "")
    return reference(entry_type, fields, entry_id), entry_type


def _answer(page: list[tuple[str, dict[str, str]]], *, more: bool) -> LedgerPage:
    return LedgerPage(
        data=[ledger_entry(entry_id, fields) for entry_id, fields in page],
        next_before=page[-1][0] if more and page else None,
    )


def _not_found(account_id: str) -> AccountError:
    return AccountError(404, "account_not_found", f"account {account_id!r} not found")
