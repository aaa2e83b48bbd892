"""PostgreSQL for the archive tests: the machine's server if one answers, else a private one.

Tests never touch another database: each test run creates its own uniquely named database
(and drops it at the end), and tests that need a blank schema make one more of their own.
Where no server answers at ``RLGW_TEST_POSTGRES_URL`` (default: the local server, user
postgres, trust auth), the binaries `make test` installs start a private server (``initdb``
in a temporary directory, on a free loopback port), as the Redis tests start redis-server.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

# Making, migrating and dropping a database is the benchmark's own (shared, not copied).
from benchmarks.local_postgres import archive_database, create_database, drop_database
from benchmarks.local_redis import free_port

__all__ = ["archive_database", "create_database", "drop_database", "postgres_server"]

ADMIN_URL = os.environ.get(
    "RLGW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


async def _answers(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError(
            f"no PostgreSQL server answers at {ADMIN_URL} and no {name} to start one: run "
            "`make test` (it installs Debian's postgresql package) or set RLGW_TEST_POSTGRES_URL"
        )
    return found


@dataclass
class PrivatePostgres:
    directory: Path
    url: str
    as_user: list[str]

    def stop(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                _binary("pg_ctl"),
                "-D",
                str(self.directory / "data"),
                "-m",
                "fast",
                "stop",
            ],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.directory, ignore_errors=True)


def start_private_postgres() -> PrivatePostgres:
    """initdb in a temporary directory and a server on a free port (as user postgres when
    run as root: PostgreSQL refuses to run as root)."""
    directory = Path(tempfile.mkdtemp(prefix="rlgw-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(directory, "postgres")
    port = free_port()
    data = directory / "data"
    subprocess.run(
        [
            *as_user,
            _binary("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *as_user,
            _binary("pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(directory / "log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return PrivatePostgres(directory, f"postgresql://postgres@127.0.0.1:{port}/postgres", as_user)


@contextmanager
def postgres_server() -> Iterator[str]:
    """The admin URL of a server to create test databases on."""
    if asyncio.run(_answers(ADMIN_URL)):
        yield ADMIN_URL
        return
    private = start_private_postgres()
    try:
        yield private.url
    finally:
        private.stop()
