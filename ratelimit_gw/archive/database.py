"""The archive's PostgreSQL connection pool and its schema migrations.

Migrations are the numbered ``migrations/NNNN_name.sql`` files of this package, applied in
order, each in its own transaction, under an advisory lock (two `archive migrate` at once:
the second waits, then finds nothing to do). ``schema_migrations`` records which are applied.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..settings.archive import shown_url

if TYPE_CHECKING:
    import asyncpg

# Any constant: the key of the advisory lock migrations run under.
_MIGRATION_LOCK = 0x726C6777  # "rlgw"
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
CONNECT_TIMEOUT_S = 5.0
INSTALL_HINT = "the archive needs asyncpg: pip install 'ratelimit-gw[archive]'"


class ArchiveUnavailable(Exception):
    """The archive cannot be used: driver missing, database unreachable, schema not migrated."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration of the package, in order."""
    found = []
    for entry in resources.files("ratelimit_gw.archive.migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def _driver() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise ArchiveUnavailable(INSTALL_HINT) from None
    return asyncpg


async def open_pool(url: str, *, max_size: int = 4) -> asyncpg.Pool:
    """A small pool (the archiver holds one connection; reports and history borrow one)."""
    driver = _driver()
    try:
        pool: asyncpg.Pool = await driver.create_pool(
            # A black-holed host answers in seconds, not asyncpg's default minute.
            url,
            min_size=1,
            max_size=max_size,
            command_timeout=60,
            timeout=CONNECT_TIMEOUT_S,
        )
    except (OSError, driver.PostgresError) as exc:
        raise ArchiveUnavailable(f"cannot connect to {shown_url(url)}: {exc}") from None
    return pool


async def applied_versions(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}


async def migrate(pool: asyncpg.Pool) -> list[Migration]:
    """Apply every migration not applied yet; the ones applied now, in order."""
    applied_now = []
    async with pool.acquire() as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in migrations():
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                if migration.version in await applied_versions(conn):
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied_now.append(migration)
    return applied_now


async def check_schema(pool: asyncpg.Pool) -> None:
    """ArchiveUnavailable unless every migration is applied (the gateway never migrates on
    its own: an operator runs `ratelimit-gw archive migrate`)."""
    async with pool.acquire() as conn:
        missing = [m for m in migrations() if m.version not in await applied_versions(conn)]
    if missing:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
        raise ArchiveUnavailable(
            f"the archive's schema is missing migrations {names}: run `ratelimit-gw archive "
            "migrate --config FILE`"
        )


class ArchiveDatabase:
    """The archive's pool, opened on first use, and again on the next use after opening
    failed: a gateway starts and serves while PostgreSQL is down (only the archive waits)."""

    def __init__(self, url: str, *, max_size: int = 4) -> None:
        self.url = url
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        """The open pool; ArchiveUnavailable when it cannot be opened or the schema is behind."""
        async with self._opening:
            if self._pool is None:
                pool = await open_pool(self.url, max_size=self._max_size)
                try:
                    await check_schema(pool)
                except BaseException:
                    await pool.close()
                    raise
                self._pool = pool
            return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
