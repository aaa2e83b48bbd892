"""The key-change feed: how every gateway learns, within a second, that a key's record changed.

A key's limits, expiry and revocation are read by admit.lua on every request; the rest of its
record (its models, name, and which secrets still open it) is what the key cache keeps
(auth.py). An update or a rotation writes the key's hash, then appends the key's id to one
stream; every gateway process reads the stream every :data:`POLL_S` and forgets those keys,
so its next request looks them up again. A process that finds the stream trimmed past where
it read (or gone) forgets everything: it cannot tell what it missed.
"""

from __future__ import annotations

from typing import Any

from .keyspace import KEY_CHANGES
from .storage import Storage

POLL_S = 0.25  # "within a second", with room for a busy event loop
# Entries kept (~60 bytes each): a process misses changes only if it cannot read for as
# long as this many changes take; then it forgets everything instead.
KEPT = 10_000
_BATCH = 1000
_START = "0-0"  # before any entry: the stream was empty


def published(key_id: str) -> tuple[Any, ...]:
    """The storage command that announces a change of ``key_id`` (after its hash is written)."""
    return ("XADD", KEY_CHANGES, "MAXLEN", "~", KEPT, "*", "key", key_id)


class Changes:
    """The ids of keys changed since the last read; ``complete`` is False when some may be
    missing (the stream was trimmed past the cursor, or wiped)."""

    __slots__ = ("complete", "key_ids")

    def __init__(self, key_ids: set[str], complete: bool) -> None:
        self.key_ids = key_ids
        self.complete = complete


class KeyChangeFeed:
    """One process's reading position in the stream."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._cursor: str | None = None  # not known yet: the first read only finds it

    async def read(self) -> Changes:
        """What changed since the last read. The first read finds where the stream ends and
        reports nothing as complete: whatever was cached before it may predate a change."""
        if self._cursor is None:
            newest = await self._storage.call("XREVRANGE", KEY_CHANGES, "+", "-", "COUNT", 1)
            self._cursor = newest[0][0] if newest else _START
            return Changes(set(), complete=False)
        key_ids: set[str] = set()
        complete = True
        while True:
            # From the cursor itself (inclusive): finding it proves nothing after it was trimmed.
            rows = await self._storage.call(
                "XRANGE", KEY_CHANGES, self._cursor, "+", "COUNT", _BATCH + 1
            )
            if self._cursor != _START:
                if rows and rows[0][0] == self._cursor:
                    rows = rows[1:]
                else:
                    complete = False  # trimmed past the cursor, or the stream is gone
                    if not rows:
                        self._cursor = _START
            for entry_id, fields in rows:  # redis-py gives an entry's fields as a dict
                key_ids.add(str(fields.get("key", "")))
                self._cursor = entry_id
            if len(rows) < _BATCH:
                return Changes(key_ids, complete)
