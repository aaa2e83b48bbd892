"""The archiver: copies every ledger stream to PostgreSQL, then trims what Postgres holds.

One pass: list the streams (every account's ledger, deleted accounts' too, and the orphan
settlements), read each from its archived position (kept in Postgres, with the epoch it was
read in), write the entries and the new positions in one transaction per chunk of streams,
and only then trim Redis below the committed positions, keeping ``retention_s`` of history.
A crash anywhere repeats at most the last chunk, and rows are keyed by what the entry is
(ledger_rows.py), so a repeat writes nothing twice and skips nothing.

Cost: a pass reads every stream once (one XRANGE each, pipelined 64 to a round trip), busy
or not. That is cheap up to some tens of thousands of accounts at the default 1 s interval;
docs/archive.md says what to do beyond.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..keyspace import (
    ACCOUNTS_SET,
    ARCHIVE_PROGRESS,
    DELETED_ACCOUNTS,
    ORPHAN_ARCHIVE_EPOCH,
    ORPHAN_SETTLEMENTS,
    AccountKeys,
)
from ..metrics import Metrics
from ..settings import ArchiveSettings
from ..storage import Storage, StorageError
from .database import ArchiveDatabase, ArchiveUnavailable
from .lease import Lease
from .ledger_rows import (
    INSERT_ENTRIES,
    INSERT_ORPHANS,
    batch_document,
    entry_item,
    next_stream_id,
    orphan_item,
    stream_position,
)
from .snapshots import snapshot_all

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("ratelimit_gw.archive")
ORPHANS = "*orphans"  # the orphan stream's name among the cursors (no account id has '*')
STREAMS_PER_ROUND_TRIP = 64
# How often every stream's epoch marker is read (otherwise only a stream with entries).
EPOCH_CHECK_S = 60.0
# How long a deleted account's ledger is still read: the settlements of requests in flight at
# its deletion land in it (within minutes: a hold's lifetime), then nothing more can.
DELETED_READ_S = 86400.0
# At most this often (and at least once a second) a stream is trimmed: retention moves on
# continuously, and one XTRIM per stream per pass would be most of a pass's work.
MAX_TRIM_STEP_S = 60.0
# Entries per INSERT: the gateway's event loop encodes each statement's document at once, so
# a long batch is cut into pieces it can interleave with requests.
ENTRIES_PER_STATEMENT = 250
_SAVE_CURSORS = (
    "INSERT INTO archive_cursors (stream, epoch, last_id) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) "
    "ON CONFLICT (stream) DO UPDATE SET epoch = excluded.epoch, last_id = excluded.last_id, "
    "updated_at = now()"
)
_SAVE_PROGRESS = (
    "INSERT INTO archive_progress (singleton, complete_until) "
    "VALUES (true, to_timestamp($1 / 1000.0)) ON CONFLICT (singleton) DO UPDATE SET "
    "complete_until = GREATEST(archive_progress.complete_until, excluded.complete_until), "
    "updated_at = now()"
)


@dataclass(frozen=True)
class Stream:
    name: str  # the account id, or ORPHANS
    key: str  # the Redis stream
    epoch_key: str
    deleted: bool = False  # a deleted account's (listed in DELETED_ACCOUNTS only)


@dataclass
class PassResult:
    read: int = 0  # entries read from Redis
    written: int = 0  # rows new to Postgres (a re-read entry is not)
    trimmed: int = 0  # entries trimmed from Redis
    complete: bool = True  # every stream was read to its end
    started_ms: int = 0
    # Deleted accounts whose ledger had nothing left to archive, their epoch checked.
    deleted_and_done: list[str] = field(default_factory=list)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(fields: Any) -> dict[str, str]:
    """An entry's fields as a dict of text (storage decodes replies; RESP2 lists pair up)."""
    if isinstance(fields, dict):
        return fields
    return {_text(k): _text(v) for k, v in zip(fields[::2], fields[1::2], strict=True)}


async def list_earlier_deletions(storage: Storage) -> int:
    """Put accounts deleted before DELETED_ACCOUNTS existed on it, so their ledgers are
    archived (and trimmed) too: one SCAN of the account hashes, run by `archive migrate`.
    How many were listed now."""
    found: list[str] = []
    async for key in storage.client.scan_iter(match="rlgw:{a:*}:account", count=1000):
        found.append(_text(key))
    listed = 0
    for start in range(0, len(found), 500):
        names = found[start : start + 500]
        statuses = await storage.call_many([("HGET", name, "status") for name in names])
        deleted = [
            name.split("{a:", 1)[1].rsplit("}:account", 1)[0]
            for name, status in zip(names, statuses, strict=True)
            if status == "deleted"
        ]
        if deleted:
            listed += int(await storage.call("SADD", DELETED_ACCOUNTS, *deleted))
    return listed


class Archiver:
    def __init__(
        self,
        storage: Storage,
        database: ArchiveDatabase,
        settings: ArchiveSettings,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.database = database
        self._settings = settings
        self.metrics = metrics
        self._clock = clock
        self._trimmed_below: dict[str, tuple[int, int]] = {}
        self._cursors: dict[str, tuple[str, str]] | None = None  # as committed; None: re-read
        self._epochs: dict[str, str] = {}  # each stream's epoch marker, as last read
        self._epochs_checked = -EPOCH_CHECK_S  # monotonic time of the last full check
        # Called after each chunk's commit, before its trim (tests stop the archiver there).
        self.after_commit: Callable[[], Awaitable[None]] | None = None

    async def streams(self) -> list[Stream]:
        live, deleted = await self.storage.call_many(
            [("SMEMBERS", ACCOUNTS_SET), ("SMEMBERS", DELETED_ACCOUNTS)]
        )
        alive = {_text(a) for a in live}
        accounts = sorted(alive | {_text(a) for a in deleted})
        found = [
            Stream(a, AccountKeys(a).ledger, AccountKeys(a).archive_epoch, a not in alive)
            for a in accounts
        ]
        return [*found, Stream(ORPHANS, ORPHAN_SETTLEMENTS, ORPHAN_ARCHIVE_EPOCH)]

    def forget_positions(self) -> None:
        """Read positions and epochs again from Postgres and Redis on the next pass (another
        archiver may have moved them while this one did not hold the lease)."""
        self._cursors = None
        self._epochs.clear()
        self._epochs_checked = -EPOCH_CHECK_S

    async def archive_once(self) -> PassResult:
        """One pass over every stream (at most ``batch_size`` entries of each)."""
        result = PassResult(started_ms=int(self._clock() * 1000))
        streams = await self.streams()
        check_all = time.monotonic() - self._epochs_checked >= EPOCH_CHECK_S
        if check_all:
            self._epochs_checked = time.monotonic()
        pool = await self.database.pool()
        async with pool.acquire() as conn:
            cursors = self._cursors
            if cursors is None:
                rows = await conn.fetch("SELECT stream, epoch, last_id FROM archive_cursors")
                cursors = {row["stream"]: (row["epoch"], row["last_id"]) for row in rows}
                self._cursors = cursors
            for start in range(0, len(streams), STREAMS_PER_ROUND_TRIP):
                chunk = streams[start : start + STREAMS_PER_ROUND_TRIP]
                await self._archive_chunk(conn, chunk, cursors, result, check_all)
            if result.complete:
                await conn.execute(_SAVE_PROGRESS, result.started_ms)
        if result.complete:
            await self.storage.call(
                "HSET", ARCHIVE_PROGRESS, "complete_until_ms", result.started_ms
            )
        if result.deleted_and_done:
            await self._forget_deleted(result.deleted_and_done)
        if self.metrics is not None:
            self.metrics.archive_entries.inc(result.written)
            self.metrics.archive_trimmed.inc(result.trimmed)
        return result

    async def _forget_deleted(self, accounts: Sequence[str]) -> None:
        """Stop reading the ledgers of accounts deleted over DELETED_READ_S ago with nothing
        left to archive: no request admitted before a deletion settles that late."""
        deleted_ms = await self.storage.call_many(
            [("HGET", AccountKeys(a).account, "deleted_ms") for a in accounts]
        )
        cutoff_ms = (self._clock() - DELETED_READ_S) * 1000
        done = [a for a, ms in zip(accounts, deleted_ms, strict=True) if ms and int(ms) < cutoff_ms]
        if done:
            await self.storage.call("SREM", DELETED_ACCOUNTS, *done)

    async def _check_epochs(self, streams: Sequence[Stream]) -> None:
        """Each stream's epoch marker as Redis holds it now, set where it is missing (a new
        or wiped stream)."""
        commands: list[tuple[Any, ...]] = []
        for stream in streams:
            commands += [
                ("SET", stream.epoch_key, secrets.token_hex(8), "NX"),
                ("GET", stream.epoch_key),
            ]
        replies = await self.storage.call_many(commands)
        for stream, reply in zip(streams, replies[1::2], strict=True):
            epoch = _text(reply)
            if self._epochs.get(stream.name, epoch) != epoch:
                # A new stream under the old name: its ids may sort below the old trim mark.
                self._trimmed_below.pop(stream.name, None)
            self._epochs[stream.name] = epoch

    async def _read(
        self, streams: Sequence[Stream], cursors: dict[str, tuple[str, str]]
    ) -> list[Any]:
        """Each stream's entries after its archived position, if that position belongs to the
        stream's epoch (as last seen), else from its start."""
        reads = []
        for stream in streams:
            cursor = cursors.get(stream.name)
            same_epoch = cursor is not None and cursor[0] == self._epochs.get(stream.name)
            first = next_stream_id(cursor[1]) if cursor is not None and same_epoch else "-"
            reads.append(("XRANGE", stream.key, first, "+", "COUNT", self._settings.batch_size))
        return await self.storage.call_many(reads)

    async def _archive_chunk(
        self,
        conn: asyncpg.Connection,
        chunk: Sequence[Stream],
        cursors: dict[str, tuple[str, str]],
        result: PassResult,
        check_all: bool,
    ) -> None:
        # A stream's epoch is checked when it is first seen, every EPOCH_CHECK_S, and whenever
        # it has entries to archive or trim: an idle stream costs one XRANGE a pass. A wiped
        # Redis whose new entries all sort before the old position is noticed at the next
        # full check, or at its first entry after that position (read from the start then):
        # late, never lost, since nothing is trimmed in an epoch not checked in this pass.
        checked = [s for s in chunk if check_all or s.name not in self._epochs]
        if checked:
            await self._check_epochs(checked)
        replies = await self._read(chunk, cursors)
        seen = {s.name for s in checked}
        suspects = [i for i, (s, r) in enumerate(zip(chunk, replies, strict=True)) if r]
        suspects = [i for i in suspects if chunk[i].name not in seen]
        if suspects:
            assumed = {chunk[i].name: self._epochs[chunk[i].name] for i in suspects}
            await self._check_epochs([chunk[i] for i in suspects])
            seen.update(assumed)
            changed = [i for i in suspects if self._epochs[chunk[i].name] != assumed[chunk[i].name]]
            if changed:
                again = await self._read([chunk[i] for i in changed], cursors)
                for i, entries in zip(changed, again, strict=True):
                    replies[i] = entries
        batch = self._settings.batch_size
        rows: list[list[Any]] = []
        orphans: list[list[Any]] = []
        moved: list[tuple[str, str, str]] = []
        for stream, entries in zip(chunk, replies, strict=True):
            if not entries:
                continue
            if len(entries) >= batch:
                result.complete = False  # more to read: the next pass follows at once
            result.read += len(entries)
            for entry_id, fields in entries:
                if stream.name == ORPHANS:
                    orphans.append(orphan_item(_text(entry_id), _pairs(fields)))
                else:
                    rows.append(entry_item(stream.name, _text(entry_id), _pairs(fields)))
            moved.append((stream.name, self._epochs[stream.name], _text(entries[-1][0])))
        if moved:
            async with conn.transaction():
                for statement, items in ((INSERT_ENTRIES, rows), (INSERT_ORPHANS, orphans)):
                    for offset in range(0, len(items), ENTRIES_PER_STATEMENT):
                        piece = items[offset : offset + ENTRIES_PER_STATEMENT]
                        status = await conn.execute(statement, batch_document(piece))
                        result.written += int(status.rsplit(" ", 1)[1])
                await conn.execute(_SAVE_CURSORS, *zip(*moved, strict=True))
            for name, epoch, last_id in moved:
                cursors[name] = (epoch, last_id)
            if self.after_commit is not None:
                await self.after_commit()
        await self._trim([s for s in chunk if s.name in seen], cursors, result)
        result.deleted_and_done += [
            s.name
            for s, entries in zip(chunk, replies, strict=True)
            if s.deleted and not entries and s.name in seen
        ]

    def _trim_floor(self) -> tuple[int, int]:
        """The oldest id retention keeps, moved in steps (MAX_TRIM_STEP_S at most)."""
        retention_ms = int(self._settings.retention_s * 1000)
        floor_ms = int(self._clock() * 1000) - retention_ms
        step_ms = int(min(MAX_TRIM_STEP_S, max(1.0, self._settings.retention_s / 10)) * 1000)
        if retention_ms:
            floor_ms -= floor_ms % step_ms
        return floor_ms, 0

    async def _trim(
        self,
        streams: Sequence[Stream],
        cursors: dict[str, tuple[str, str]],
        result: PassResult,
    ) -> None:
        """XTRIM each stream (its epoch checked in this pass) below both its committed
        position and the retention."""
        floor = self._trim_floor()
        trims: list[tuple[Stream, tuple[int, int]]] = []
        for stream in streams:
            cursor = cursors.get(stream.name)
            if cursor is None or cursor[0] != self._epochs.get(stream.name):
                continue  # nothing of this epoch is committed: keep everything
            below = min(stream_position(next_stream_id(cursor[1])), floor)
            if below > self._trimmed_below.get(stream.name, (0, 0)):
                trims.append((stream, below))
        if not trims:
            return
        replies = await self.storage.call_many(
            [("XTRIM", s.key, "MINID", f"{ms}-{seq}") for s, (ms, seq) in trims]
        )
        for (stream, below), trimmed in zip(trims, replies, strict=True):
            self._trimmed_below[stream.name] = below
            result.trimmed += int(trimmed)


class ArchiveRunner:
    """Archives while holding the lease, from `serve` or `ratelimit-gw archive run`."""

    def __init__(self, archiver: Archiver, lease: Lease, settings: ArchiveSettings) -> None:
        self.archiver = archiver
        self.lease = lease
        self._settings = settings
        self._metrics = archiver.metrics
        self._stopping = asyncio.Event()
        self._next_snapshot = 0.0  # monotonic: the first pass as leader takes one

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        renewal = asyncio.create_task(self._keep_lease())
        try:
            while not self._stopping.is_set():
                wait_s = self._settings.interval_s
                if self.lease.held:
                    wait_s = await self._one_pass(wait_s)
                await self._sleep(wait_s)
        finally:
            renewal.cancel()
            with contextlib.suppress(StorageError):  # else it expires on its own
                await self.lease.release()
            self._set_leader(False)

    async def _one_pass(self, wait_s: float) -> float:
        try:
            result = await self.archiver.archive_once()
            await self._snapshot_if_due()
        except StorageError as exc:
            self._failed("redis", exc)
            return wait_s
        except ArchiveUnavailable as exc:
            self._failed("postgres", exc)
            return wait_s
        except Exception as exc:
            if not _is_database_error(exc):
                raise
            self._failed("postgres", exc)
            return wait_s
        return 0.0 if not result.complete else wait_s

    async def _snapshot_if_due(self) -> None:
        """Account and key records for `archive restore`, every snapshot_interval_s."""
        now = time.monotonic()
        if now < self._next_snapshot:
            return
        self._next_snapshot = now + self._settings.snapshot_interval_s
        await snapshot_all(self.archiver.storage, await self.archiver.database.pool())

    def _failed(self, stage: str, exc: BaseException) -> None:
        log.warning("archive pass failed (%s): %s", stage, exc)
        if self._metrics is not None:
            self._metrics.archive_errors.labels(stage).inc()

    async def _keep_lease(self) -> None:
        while not self._stopping.is_set():
            was_held = self.lease.held
            try:
                held = await self.lease.hold()
            except StorageError as exc:
                self._failed("redis", exc)
                held = False
            if held and not was_held:
                self.archiver.forget_positions()  # another archiver may have moved them
            self._set_leader(held)
            await self._sleep(self._settings.lease_s / 3)

    def _set_leader(self, held: bool) -> None:
        if self._metrics is not None:
            self._metrics.archive_leader.set(1 if held else 0)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


def _is_database_error(exc: BaseException) -> bool:
    """A Postgres or connection failure: logged and retried next pass, never fatal."""
    if isinstance(exc, OSError | asyncio.TimeoutError):
        return True
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - the archiver never runs without it
        return False
    return isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError)
