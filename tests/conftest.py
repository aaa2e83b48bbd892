"""Shared fixtures: a private redis-server per session, storage on every backend, a mock
upstream, and a gateway on a real loopback socket.

Behaviour tests take the ``storage`` fixture, which is parametrised over ``memory://`` and a
real Redis, so the same assertions run on both backends.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.app import create_app
from ratelimit_gw.limits import LIMIT_NAMES, Limits
from ratelimit_gw.live_config import ConfigFile
from ratelimit_gw.serve import make_runner
from ratelimit_gw.services import SERVICES
from ratelimit_gw.settings import Settings, StorageSettings, build_settings
from ratelimit_gw.storage import Storage, open_storage
from ratelimit_gw.testing.mock_upstream import (
    MOCK_STATE,
    MockSettings,
    MockState,
    start_mock_upstream,
)

from .postgres_process import archive_database as migrated_database
from .postgres_process import postgres_server
from .redis_process import RedisProcess, start_redis

BACKENDS = ["memory", "redis"]
UPSTREAM_KEY = "sk-upstream-secret-0123456789"

# name, protocol, input USD per Mtok, output USD per Mtok
MODELS = (
    ("gpt-4o-mini", "openai", "0.15", "0.60"),
    ("gpt-4o", "openai", "2.50", "10.00"),
    ("claude-sonnet-4-6", "anthropic", "3.00", "15.00"),
    ("gemini-2.5-flash", "gemini", "0.30", "2.50"),
)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection loaded, as `serve` does for the gateway. The test process
    imports every SDK, hypothesis and schemathesis: hundreds of thousands of long-lived
    objects that each full collection would walk again, in pauses of 0.3-1 s late in a run,
    long enough to break the timing bounds the failure tests assert (a request answered
    within 1 s of a 0.3 s upstream timeout)."""
    gc.collect()
    gc.freeze()


_last_frozen_module: list[str] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    """And again as each test file starts: what the files before it left alive (schemathesis'
    cases, SDK clients, caches) joins the frozen heap instead of growing every pause."""
    module = item.nodeid.split("::", 1)[0]
    if _last_frozen_module[-1:] != [module]:
        _last_frozen_module[:] = [module]
        gc.collect()
        gc.freeze()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A PostgreSQL server to make databases on (tests/postgres_process.py)."""
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def archive_database(postgres_admin_url: str) -> Iterator[str]:
    """This test run's own archive database, migrated; dropped at the end."""
    with migrated_database(postgres_admin_url, prefix="rlgw_test") as url:
        yield url


ARCHIVE_TABLES = (
    "ledger_entries",
    "orphan_settlements",
    "archive_cursors",
    "archive_progress",
    "account_snapshots",
    "key_snapshots",
)


@pytest.fixture
async def archive_url(archive_database: str) -> str:
    """The run's archive database, emptied for this test."""
    import asyncpg

    conn = await asyncpg.connect(archive_database)
    try:
        await conn.execute(f"TRUNCATE {', '.join(ARCHIVE_TABLES)}")
    finally:
        await conn.close()
    return archive_database


@pytest.fixture(name="database")
async def archive_database_handle(archive_url: str) -> AsyncIterator[Any]:
    """The archive as the gateway holds it (an ArchiveDatabase), closed after the test."""
    from ratelimit_gw.archive.database import ArchiveDatabase

    db = ArchiveDatabase(archive_url)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def archive_pool(archive_url: str) -> AsyncIterator[Any]:
    from ratelimit_gw.archive.database import open_pool

    pool = await open_pool(archive_url)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    server: RedisProcess = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def storage(storage_url: str) -> AsyncIterator[Storage]:
    store = open_storage(StorageSettings(url=storage_url))
    await store.call("FLUSHALL")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def accounts(storage: Storage) -> AccountStore:
    return AccountStore(storage)


@dataclass
class Upstream:
    url: str
    state: MockState


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    runner, url = await start_mock_upstream("127.0.0.1", 0, MockSettings())
    try:
        yield Upstream(url, runner.app[MOCK_STATE])
    finally:
        await runner.cleanup()


def gateway_config(upstream_url: str, storage_url: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"url": storage_url},
        "providers": [
            {
                "name": f"mock-{protocol}",
                "protocol": protocol,
                "base_url": upstream_url,
                "api_key_env": "RLGW_TEST_UPSTREAM_KEY",
                "timeout_s": 30,
            }
            for protocol in ("openai", "anthropic", "gemini")
        ],
        "models": [
            {
                "id": model,
                "provider": f"mock-{protocol}",
                "input_per_mtok": inp,
                "output_per_mtok": out,
                "default_max_output": 1000,
            }
            for model, protocol, inp, out in MODELS
        ],
    }
    config.update(overrides)
    return config


def custom_endpoint(base_url: str, name: str = "llm", **extra: Any) -> dict[str, Any]:
    """A ``[[custom_endpoints]]`` entry ``acme-ai/<name>`` whose upstream credential is the
    ``ENDPOINT_KEY`` variable the test passes to :func:`start_gateway`."""
    return {
        "provider_account": "acme-ai",
        "name": name,
        "base_url": base_url,
        "headers": {"Authorization": "Bearer ${ENDPOINT_KEY}"},
        **extra,
    }


@dataclass
class Gateway:
    url: str
    settings: Settings
    storage: Storage
    accounts: AccountStore
    upstream: Upstream
    app: web.Application

    async def settled(self, within_s: float = 10) -> None:
        """Wait until every background settlement (and a key's tpm correction) is done."""
        settler = self.app[SERVICES].settler
        deadline = time.monotonic() + within_s
        while settler.pending:
            assert time.monotonic() < deadline, "settlements did not finish"
            await asyncio.sleep(0.005)

    async def new_key(
        self,
        account: str = "acme",
        *,
        create_account: bool = True,
        balance_usd: str | None = None,
        **limits: Any,
    ) -> str:
        """Create (if asked) an account and a key on it: key limits and options by name
        (``rpm=5``, ``models=[…]``), account limits and options prefixed (``account_rpm=5``)."""
        from ratelimit_gw.money import parse_usd

        if create_account:
            account_options = {
                k[len("account_") :]: v for k, v in limits.items() if k.startswith("account_")
            }
            await self.accounts.create_account(
                account,
                balance_nano=None if balance_usd is None else parse_usd(balance_usd),
                **with_limits(account_options),
            )
        key_options = {k: v for k, v in limits.items() if not k.startswith("account_")}
        created = await self.accounts.create_key(account, **with_limits(key_options))
        return created.key


def with_limits(options: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of AccountStore's create_account/create_key from flat ones: the
    limits among them (``rpm=5``) gathered into one ``limits=Limits(…)``."""

    limits = {name: options.pop(name) for name in LIMIT_NAMES if name in options}
    return {**options, "limits": Limits(**limits)}


def toml_document(config: dict[str, Any]) -> str:
    """``config`` as a TOML file: its tables as sections, lists of tables as [[arrays]]."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(map(value, v)) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)  # strings, integers and floats read the same in TOML

    def is_tables(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def table(header: str, name: str, fields: dict[str, Any]) -> list[str]:
        lines = [header] + [f"{k} = {value(v)}" for k, v in fields.items() if not is_tables(v)]
        for k, v in fields.items():
            if is_tables(v):
                lines += [line for item in v for line in table(f"[[{name}.{k}]]", "", item)]
        return lines

    lines: list[str] = []
    for name, section in config.items():
        if isinstance(section, dict):
            lines += table(f"[{name}]", name, section)
        else:
            lines += [line for item in section for line in table(f"[[{name}]]", name, item)]
    return "\n".join(lines) + "\n"


async def start_gateway(
    upstream: Upstream,
    storage: Storage,
    environ: dict[str, str] | None = None,
    *,
    config_file: Path | None = None,
    **overrides: Any,
) -> tuple[web.AppRunner, Gateway]:
    """A gateway on a loopback port. ``config_file``: where its config is written first and
    read from, so the gateway can reload it; ``overrides``: sections of the config."""
    env = {"RLGW_TEST_UPSTREAM_KEY": UPSTREAM_KEY, **(environ or {})}
    config = gateway_config(upstream.url, storage.url, **overrides)
    loaded = None
    if config_file is None:
        settings = build_settings(config, env)
    else:
        config_file.write_text(toml_document(config))
        loaded = ConfigFile.load(config_file, env)
        settings = loaded.started
    app = create_app(settings, storage, config_file=loaded)
    runner = make_runner(app, settings.server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, Gateway(
        f"http://127.0.0.1:{port}", settings, storage, AccountStore(storage), upstream, app
    )


@asynccontextmanager
async def another_client(storage: Storage) -> AsyncIterator[Storage]:
    """What another gateway instance would use: a second client of ``storage``'s Redis
    (memory:// lives in one process, so there it is the same storage)."""
    if storage.url.startswith("memory://"):
        yield storage
        return
    other = open_storage(StorageSettings(url=storage.url))
    try:
        yield other
    finally:
        await other.close()


@pytest.fixture
async def redis_client(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the session's redis-server (flushed), beside whatever the test's
    gateway uses: for pausing it, reading its keys or wiping it."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_storage(redis_server: RedisProcess) -> AsyncIterator[Storage]:
    """Storage on the session's redis-server (flushed), whatever the test's backends."""
    storage = open_storage(StorageSettings(url=redis_server.url))
    await storage.call("FLUSHALL")
    try:
        yield storage
    finally:
        await storage.close()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The session's Redis, flushed (for what works on storage directly, like the CLI)."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def gateway(upstream: Upstream, storage: Storage) -> AsyncIterator[Gateway]:
    runner, gw = await start_gateway(upstream, storage, {"RLGW_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        yield gw
    finally:
        await runner.cleanup()


ADMIN_TOKEN = "admin-token-for-tests"
os.environ.pop("RLGW_CONFIG", None)
