"""A throwaway database on the machine's PostgreSQL, for the archive section.

The server is ``$RLGW_BENCH_POSTGRES_URL`` (default: the local one, user postgres, trust
auth, as on every development and CI machine here). The bench creates a uniquely named
database on it, migrates the archive's schema into it, and drops it at the end; it touches no
other. No server answering is an error that says so, never a skipped section.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

ADMIN_URL_ENV = "RLGW_BENCH_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    return os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL


def with_database(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


async def _execute(url: str, statement: str) -> None:
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"no PostgreSQL server answers at {url} ({exc}): the archive section needs one "
            f"(`make bench` installs Debian's postgresql; start it, or set {ADMIN_URL_ENV})"
        ) from exc
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _migrate(url: str) -> None:
    from ratelimit_gw.archive.database import migrate, open_pool

    pool = await open_pool(url)
    try:
        await migrate(pool)
    finally:
        await pool.close()


@contextmanager
def archive_database() -> Iterator[str]:
    """The URL of a new database holding the archive's schema; dropped on the way out."""
    admin = admin_url()
    name = f"rlgw_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_execute(admin, f'CREATE DATABASE "{name}"'))
    try:
        url = with_database(admin, name)
        asyncio.run(_migrate(url))
        yield url
    finally:
        asyncio.run(_execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
