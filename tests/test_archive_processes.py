"""`ratelimit-gw archive run` as real processes, killed with SIGKILL (SPEC §16): killed at any
moment, between a Postgres commit and the Redis trim included, a restarted archiver leaves
no duplicate and no gap; of two, one archives at a time and the other takes over when the
holder dies."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.keyspace import ARCHIVE_LEASE, AccountKeys
from ratelimit_gw.money import parse_usd
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import Storage, open_storage

from .cli_helpers import cli
from .conftest import Upstream
from .processes import gateway_processes, mock_gateway_toml, wait_ready
from .redis_process import free_port

pytestmark = pytest.mark.slow

ACCOUNTS = ("acme", "globex", "initech")


def archive_config(tmp_path: Path, redis_url: str, archive_url: str) -> Path:
    config = tmp_path / "archive.toml"
    config.write_text(
        f'[storage]\nurl = "{redis_url}"\n\n'
        f'[archive]\nurl = "{archive_url}"\n'
        # Small batches and no retention: many commits and trims to be killed between.
        "batch_size = 7\nretention_s = 0\ninterval_s = 0.02\nlease_s = 2\n"
    )
    return config


def start_archiver(
    config: Path, log: Path, metrics_port: int | None = None
) -> subprocess.Popen[Any]:
    command = [sys.executable, "-m", "ratelimit_gw", "archive", "run", "--config", str(config)]
    if metrics_port is not None:
        command += ["--metrics-port", str(metrics_port)]
    with log.open("ab") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink)


async def scrape(port: int, name: str) -> float:
    """One sample of an archiver's /metrics (unlabelled)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def kill(process: subprocess.Popen[Any]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


async def topups(storage: Storage, count: int, tag: str) -> int:
    """``count`` top-ups spread over the accounts; how many ledger entries that made."""
    accounts = AccountStore(storage)
    for i in range(count):
        await accounts.topup(ACCOUNTS[i % len(ACCOUNTS)], 1 + i, f"{tag}-{i}")
        await asyncio.sleep(0.002)
    return count


async def wait_archived(archive_url: str, expected: int, timeout_s: float = 30) -> list[Any]:
    conn = await asyncpg.connect(archive_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = await conn.fetch("SELECT account_id, ref, entry_type FROM ledger_entries")
            if len(rows) >= expected or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def left_in_redis(storage: Storage) -> int:
    return sum([await storage.call("XLEN", AccountKeys(a).ledger) for a in ACCOUNTS])


async def test_an_archiver_killed_at_random_moments_leaves_no_duplicate_and_no_gap(
    tmp_path: Path, redis_url: str, archive_url: str
) -> None:
    storage = open_storage(StorageSettings(url=redis_url))
    try:
        accounts = AccountStore(storage)
        for account in ACCOUNTS:
            await accounts.create_account(account, balance_nano=10**9)
        config = archive_config(tmp_path, redis_url, archive_url)
        log = tmp_path / "archiver.log"
        writing = asyncio.create_task(topups(storage, 1500, "load"))
        rng = random.Random(23)
        kills = 0
        while not writing.done():
            archiver = start_archiver(config, log)
            await asyncio.sleep(rng.uniform(0.5, 1.0))  # start-up is ~0.3 s: mid-pass kills
            kill(archiver)
            kills += 1
        written = await writing
        assert kills >= 3, "the workload ended before the archiver was killed a few times"
        before_the_last_start = len(await wait_archived(archive_url, 0, timeout_s=0))
        assert before_the_last_start > 0, "the killed archivers never archived anything"

        final = start_archiver(config, log)
        try:
            rows = await wait_archived(archive_url, len(ACCOUNTS) + written)
        finally:
            final.send_signal(signal.SIGTERM)
            assert final.wait(timeout=20) == 0, log.read_text()[-2000:]
        identities = [tuple(row) for row in rows]
        assert len(identities) == len(set(identities)), "an entry was archived twice"
        expected = {(a, f"rlgw:initial-balance:{a}", "topup") for a in ACCOUNTS} | {
            (ACCOUNTS[i % len(ACCOUNTS)], f"load-{i}", "topup") for i in range(written)
        }
        assert set(identities) == expected, "an entry is missing (a gap) or unexpected"
        assert await left_in_redis(storage) == 0  # everything archived was trimmed
    finally:
        await storage.close()


async def test_one_of_two_archivers_archives_and_the_other_takes_over_when_it_is_killed(
    tmp_path: Path, redis_url: str, archive_url: str
) -> None:
    storage = open_storage(StorageSettings(url=redis_url))
    config = archive_config(tmp_path, redis_url, archive_url)
    log = tmp_path / "archivers.log"
    ports = [free_port(), free_port()]
    processes = [start_archiver(config, log, port) for port in ports]
    try:
        accounts = AccountStore(storage)
        for account in ACCOUNTS:
            await accounts.create_account(account, balance_nano=10**9)
        await wait_archived(archive_url, len(ACCOUNTS))
        # Each exports its metrics: one leader between them, and it counted the entries.
        leaders = [await scrape(port, "rlgw_archive_leader") for port in ports]
        assert sorted(leaders) == [0.0, 1.0]
        leader_port = ports[leaders.index(1.0)]
        for _ in range(100):  # counted as its pass ends, a moment after the commit
            if await scrape(leader_port, "rlgw_archive_entries_total") == 3:
                break
            await asyncio.sleep(0.05)
        assert await scrape(leader_port, "rlgw_archive_entries_total") == 3
        holder = str(await storage.call("GET", ARCHIVE_LEASE))
        by_pid = {p.pid: p for p in processes}
        leader = by_pid[int(holder.split(":")[1])]
        other = next(p for p in processes if p is not leader)

        kill(leader)  # no clean stop: the lease runs out on its own (lease_s = 2)
        killed_at = time.monotonic()
        written = await topups(storage, 30, "after-the-kill")
        rows = await wait_archived(archive_url, len(ACCOUNTS) + written, timeout_s=20)
        took_over_s = time.monotonic() - killed_at

        assert len(rows) == len(ACCOUNTS) + written
        assert len({tuple(r) for r in rows}) == len(rows)
        new_holder = str(await storage.call("GET", ARCHIVE_LEASE))
        assert int(new_holder.split(":")[1]) == other.pid
        assert took_over_s < 15, f"took {took_over_s:.1f}s to take over a 2 s lease"
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=20)
        await storage.close()
    assert os.path.exists(log)


async def test_a_lost_redis_comes_back_from_what_serve_archived(
    upstream: Upstream, redis_url: str, archive_url: str, tmp_path: Path
) -> None:
    """Two `serve` gateways archive in the background (one holds the lease); Redis is wiped;
    `archive restore` brings back balances, spend and keys, and the caller's own key works
    again through the same gateways (official SDK)."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        mock_gateway_toml(upstream.url, redis_url)
        + f'\n[archive]\nurl = "{archive_url}"\ninterval_s = 0.1\nsnapshot_interval_s = 0.2\n'
    )
    storage = open_storage(StorageSettings(url=redis_url))
    log = tmp_path / "serve.log"
    try:
        accounts = AccountStore(storage)
        await accounts.create_account("acme", balance_nano=parse_usd("5.00"))
        await accounts.topup("acme", parse_usd("1.25"), "invoice-7")
        key = (await accounts.create_key("acme", name="ci")).key
        with gateway_processes(config, 2, log) as urls:
            await wait_ready(urls, log=log)
            clients = [
                openai.AsyncOpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0) for url in urls
            ]
            try:
                for i in range(10):
                    await ask(clients[i % 2])
                # Charges settle just after each answer; then the archive holds all 12.
                rows = await wait_archived(archive_url, 12)
                assert len(rows) == 12
                before = await accounts.get_account("acme")
                assert before.spent_usd != "0.00"
                await wait_snapshotted(archive_url)
                await asyncio.sleep(0.3)  # a snapshot taken after the last charge too

                await storage.call("FLUSHALL")  # Redis is lost
                with pytest.raises(openai.AuthenticationError):
                    await ask(clients[0])
                restored = cli("archive", "restore", "--config", str(config), "--json")
                assert restored.returncode == 0, restored.stderr
                report = json.loads(restored.stdout)
                assert (report["accounts"], report["keys"]) == (1, 1)

                after = await accounts.get_account("acme")
                assert (after.balance_usd, after.spent_usd, after.topped_up_usd) == (
                    before.balance_usd,
                    before.spent_usd,
                    before.topped_up_usd,
                )
                # The same key, through both gateways (their key cache forgets a refusal).
                for client in clients:
                    await eventually_answered(client)
                retried = await accounts.topup("acme", parse_usd("1.25"), "invoice-7")
                assert retried is False  # the idempotency key came back: nothing credited
            finally:
                for client in clients:
                    await client.close()
    finally:
        await storage.close()


async def ask(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=20,
    )


async def eventually_answered(client: openai.AsyncOpenAI, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await ask(client)
            return
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "the restored key never opened the gateway"
            await asyncio.sleep(0.2)


async def wait_snapshotted(archive_url: str, timeout_s: float = 20) -> None:
    conn = await asyncpg.connect(archive_url)
    try:
        deadline = time.monotonic() + timeout_s
        while not await conn.fetchval("SELECT count(*) FROM key_snapshots"):
            assert time.monotonic() < deadline, "no key was snapshotted"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
