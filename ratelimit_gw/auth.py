"""Who is calling: a gateway key → its record, with a short local cache (§2).

The cache only saves the lookup of *which* key and account a secret belongs to. Whether the
key is revoked or expired is decided again by the admission script on every request, so a
revoked key stops working on the very next request on every instance, cache or not.
"""

from __future__ import annotations

import hashlib
import time

from .accounts import AccountStore, KeyRecord
from .errors import GatewayError

# Unknown secrets are cached briefly: long enough to absorb a flood of bad keys, short
# enough that a key created a moment ago works almost at once.
NEGATIVE_TTL_S = 1.0
MAX_ENTRIES = 100_000


class KeyCache:
    def __init__(self, accounts: AccountStore, ttl_s: float) -> None:
        self._accounts = accounts
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, KeyRecord | None]] = {}

    async def authenticate(self, secret: str | None) -> KeyRecord:
        if not secret:
            raise GatewayError(401, "missing_key", "No API key provided.")
        digest = hashlib.sha256(secret.encode()).hexdigest()
        now = time.monotonic()
        cached = self._entries.get(digest)
        if cached is not None and cached[0] > now:
            record = cached[1]
        else:
            record = await self._accounts.find_key(secret)
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            ttl = self._ttl_s if record is not None else min(self._ttl_s, NEGATIVE_TTL_S)
            self._entries[digest] = (now + ttl, record)
        if record is None:
            raise GatewayError(401, "invalid_key", "Invalid API key.")
        return record
