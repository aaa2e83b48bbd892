"""Who is calling: a gateway key → its record, with a short local cache (docs/admin.md).

The cache only saves the lookup of *which* key and account a secret belongs to, with the
key's models and name. Whether the key is revoked or expired, its limits, and whether its
account is disabled or deleted are decided again by the admission script on every request,
so those take effect on the very next request on every instance, cache or not. A change of
the rest (an update, a rotation) reaches every instance's cache within a second through the
key-change feed (key_changes.py); a retired secret's cache entry ends with its grace.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import math
import time
from datetime import datetime

from .accounts import AccountStore
from .errors import GatewayError
from .key_changes import POLL_S, KeyChangeFeed
from .keys import KeyRecord
from .storage import StorageError

log = logging.getLogger("ratelimit_gw.auth")

# Unknown secrets are cached briefly: long enough to absorb a flood of bad keys, short
# enough that a key created a moment ago works almost at once.
NEGATIVE_TTL_S = 1.0
# Each entry is a key's immutable facts (~0.5 KB): 250k keys ≈ 125 MB at most per process.
MAX_ENTRIES = 250_000
EVICT_BATCH = MAX_ENTRIES // 10


class KeyCache:
    """``stale_on_error`` (storage.on_error = "allow"): while storage fails, a key this
    process looked up before is still recognised from its expired entry (never past the
    key's expiry or a retired secret's grace); a key it never saw is not (the failure
    propagates: 503)."""

    def __init__(self, accounts: AccountStore, ttl_s: float, stale_on_error: bool = False) -> None:
        self._accounts = accounts
        self._ttl_s = ttl_s
        self._stale_on_error = stale_on_error
        # secret's digest → (fresh until, record, valid until), in time.monotonic() seconds
        self._entries: dict[str, tuple[float, KeyRecord | None, float]] = {}
        # One storage lookup per secret at a time: a burst on a cold cache waits for it.
        self._lookups: dict[str, asyncio.Task[KeyRecord | None]] = {}
        # Bumped whenever entries are forgotten: a lookup that ran across it keeps nothing.
        self._epoch = 0
        self._following = False

    async def authenticate(self, secret: str | None) -> KeyRecord:
        if not secret:
            raise GatewayError(401, "missing_key", "No API key provided.")
        if not secret.isascii():  # every key is ASCII; this may be raw bytes (not UTF-8)
            raise GatewayError(401, "invalid_key", "Invalid API key.")
        digest = hashlib.sha256(secret.encode()).hexdigest()
        cached = self._entries.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            record = cached[1]
        else:
            try:
                record = await self._lookup(digest, secret)
            except StorageError:
                if (
                    not self._stale_on_error
                    or cached is None
                    or cached[1] is None
                    or cached[2] <= time.monotonic()
                ):
                    raise
                record = cached[1]
        if record is None:
            raise GatewayError(401, "invalid_key", "Invalid API key.")
        return record

    async def follow_changes(self, feed: KeyChangeFeed) -> None:
        """Forget the keys the feed names, every :data:`POLL_S`, until :meth:`stop_following`.
        Storage failing only delays it: the changes wait in the feed."""
        self._following = True
        while self._following:
            try:
                changes = await feed.read()
            except StorageError:
                pass
            except Exception:  # never stop following over a bug: a stale cache would outlive it
                log.exception("reading the key-change feed failed")
            else:
                if not changes.complete:
                    self._forget(None)
                elif changes.key_ids:
                    self._forget(changes.key_ids)
            await asyncio.sleep(POLL_S)

    def stop_following(self) -> None:
        """End :meth:`follow_changes` at its next turn. Shutdown calls this before cancelling
        it: a storage client may swallow a cancellation (redis-py's sentinel client did, in a
        failover), and then only this flag ends the loop that shutdown waits for."""
        self._following = False

    def _forget(self, key_ids: set[str] | None) -> None:
        """Drop the entries of these keys (None: every entry)."""
        self._epoch += 1
        if key_ids is None:
            self._entries.clear()
            return
        stale = [
            digest
            for digest, (_, record, _) in self._entries.items()
            if record is not None and record.id in key_ids
        ]
        for digest in stale:
            del self._entries[digest]

    async def _lookup(self, digest: str, secret: str) -> KeyRecord | None:
        # The lookup is a task of its own and each waiter is shielded from it: a caller that
        # hangs up (its handler cancelled) neither cancels the lookup nor fails the others.
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = asyncio.get_running_loop().create_task(self._fetch(digest, secret))
            self._lookups[digest] = lookup
            lookup.add_done_callback(functools.partial(self._lookup_done, digest))
        return await asyncio.shield(lookup)

    def _lookup_done(self, digest: str, lookup: asyncio.Task[KeyRecord | None]) -> None:
        del self._lookups[digest]
        if not lookup.cancelled():
            lookup.exception()  # retrieved here, so one nobody waits for any more logs nothing

    async def _fetch(self, digest: str, secret: str) -> KeyRecord | None:
        epoch = self._epoch
        record = await self._accounts.find_key(secret)
        if epoch != self._epoch:
            return record  # a change arrived meanwhile: this answer may predate it
        if len(self._entries) >= MAX_ENTRIES:
            # Oldest first (dicts keep insertion order): the rest of the cache stays warm.
            for stale in list(itertools.islice(self._entries, EVICT_BATCH)):
                del self._entries[stale]
        now = time.monotonic()
        ttl = self._ttl_s if record is not None else min(self._ttl_s, NEGATIVE_TTL_S)
        valid_until = math.inf
        if record is not None and record.expires_at is not None:
            # A retired secret's grace ends here (find_key folds it into expires_at): its
            # entry must not outlive it. Past expiry, admission refuses the key anyway.
            expires_s = datetime.fromisoformat(record.expires_at).timestamp()
            valid_until = now + (expires_s - time.time())
            if valid_until > now:
                ttl = min(ttl, valid_until - now)
        self._entries[digest] = (now + ttl, record, valid_until)
        return record
