"""One connection of the archive for a read (reports, ledger pages), with every way the read
can fail because PostgreSQL is away or overwhelmed made one :class:`ArchiveUnavailable`
(a 503 to retry), and nothing else: a wrong statement stays the bug it is."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from ..settings.archive import shown_url
from .database import ArchiveDatabase, ArchiveUnavailable

if TYPE_CHECKING:
    import asyncpg


@asynccontextmanager
async def archive_connection(database: ArchiveDatabase) -> AsyncIterator[asyncpg.Connection]:
    pool = await database.pool()
    import asyncpg  # the pool exists: so does the driver

    try:
        async with pool.acquire() as conn:
            yield conn
    except (
        OSError,
        TimeoutError,
        asyncpg.InterfaceError,
        asyncpg.PostgresConnectionError,
        asyncpg.OperatorInterventionError,  # shut down, or a statement timed out
        asyncpg.InsufficientResourcesError,
    ) as exc:
        raise ArchiveUnavailable(f"reading {shown_url(database.url)} failed: {exc}") from None
