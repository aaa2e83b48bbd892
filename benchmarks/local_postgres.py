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
            f"no PostgreSQL server answers at {url} ({exc}): the archive needs one (`make "
            f"bench` and `make test` install Debian's postgresql; start it, or set "
            f"{ADMIN_URL_ENV})"
        ) from exc
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def migrate_database(url: str) -> None:
    """The archive's schema, every migration applied."""
    from ratelimit_gw.archive.database import migrate, open_pool

    pool = await open_pool(url)
    try:
        await migrate(pool)
    finally:
        await pool.close()


async def create_database(admin: str, prefix: str = "rlgw_bench") -> str:
    """A new empty database on the server of ``admin``, named uniquely: its URL."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await _execute(admin, f'CREATE DATABASE "{name}"')
    return with_database(admin, name)


async def drop_database(admin: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    await _execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def archive_database(admin: str | None = None, prefix: str = "rlgw_bench") -> Iterator[str]:
    """The URL of a new database holding the archive's schema; dropped on the way out.
    ``admin``: the server to make it on (default: :func:`admin_url`). The tests' databases
    come from here too (tests/postgres_process.py finds or starts their server)."""
    admin = admin or admin_url()
    url = asyncio.run(create_database(admin, prefix))
    try:
        asyncio.run(migrate_database(url))
        yield url
    finally:
        asyncio.run(drop_database(admin, url))
