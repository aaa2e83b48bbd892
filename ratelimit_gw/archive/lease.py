"""The archiver's lease (``lua/archive_lease.lua``): one instance archives at a time.

Each instance that may archive asks every ``lease_s / 3``; the holder's ask renews it. A
holder that stops asking (dead, partitioned) loses it ``lease_s`` after its last renewal and
another instance takes over. :attr:`Lease.held` is only trusted until the renewal's lease
would end, measured from before the renewal was sent.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

from ..keyspace import ARCHIVE_LEASE
from ..storage import Storage


def instance_token() -> str:
    """Who holds the lease, readable in logs: host, process, and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Lease:
    def __init__(self, storage: Storage, lease_s: float, token: str | None = None) -> None:
        self._storage = storage
        self._lease_ms = int(lease_s * 1000)
        self.token = token or instance_token()
        self.holder = ""  # the last holder seen ("" none)
        self._valid_until = 0.0  # monotonic

    @property
    def held(self) -> bool:
        return time.monotonic() < self._valid_until

    async def hold(self) -> bool:
        """Take the lease, or renew it if this instance holds it; whether it does now."""
        asked = time.monotonic()
        reply = await self._storage.run(
            "archive_lease", [ARCHIVE_LEASE], [self.token, self._lease_ms, "hold"]
        )
        held, holder = int(reply[0]), reply[1]
        self.holder = holder.decode() if isinstance(holder, bytes) else str(holder)
        # A margin for clock drift between this process and Redis.
        self._valid_until = asked + self._lease_ms / 1000 * 0.9 if held else 0.0
        return bool(held)

    async def release(self) -> None:
        """Give the lease up now (a clean stop), so another instance need not wait it out."""
        self._valid_until = 0.0
        await self._storage.run("archive_lease", [ARCHIVE_LEASE], [self.token, 0, "release"])
