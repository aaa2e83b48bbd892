"""Who is calling: a gateway key → its record, with a short local cache (docs/admin.md).

The cache only saves the lookup of *which* key and account a secret belongs to. Whether the
key is revoked or expired is decided again by the admission script on every request, so a
revoked key stops working on the very next request on every instance, cache or not.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import time

from .accounts import AccountStore, KeyRecord
from .errors import GatewayError
from .storage import StorageError

# Unknown secrets are cached briefly: long enough to absorb a flood of bad keys, short
# enough that a key created a moment ago works almost at once.
NEGATIVE_TTL_S = 1.0
# Each entry is a key's immutable facts (~0.5 KB): 250k keys ≈ 125 MB at most per process.
MAX_ENTRIES = 250_000
EVICT_BATCH = MAX_ENTRIES // 10


class KeyCache:
    """``stale_on_error`` (storage.on_error = "allow"): while storage fails, a key this
    process looked up before is still recognised from its expired entry; a key it never saw
    is not (the failure propagates: 503)."""

    def __init__(self, accounts: AccountStore, ttl_s: float, stale_on_error: bool = False) -> None:
        self._accounts = accounts
        self._ttl_s = ttl_s
        self._stale_on_error = stale_on_error
        self._entries: dict[str, tuple[float, KeyRecord | None]] = {}
        # One storage lookup per secret at a time: a burst on a cold cache waits for it.
        self._lookups: dict[str, asyncio.Task[KeyRecord | None]] = {}

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
                if not self._stale_on_error or cached is None or cached[1] is None:
                    raise
                record = cached[1]
        if record is None:
            raise GatewayError(401, "invalid_key", "Invalid API key.")
        return record

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
        record = await self._accounts.find_key(secret)
        if len(self._entries) >= MAX_ENTRIES:
            # Oldest first (dicts keep insertion order): the rest of the cache stays warm.
            for stale in list(itertools.islice(self._entries, EVICT_BATCH)):
                del self._entries[stale]
        ttl = self._ttl_s if record is not None else min(self._ttl_s, NEGATIVE_TTL_S)
        self._entries[digest] = (time.monotonic() + ttl, record)
        return record
