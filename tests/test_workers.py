"""`serve --workers N`: several processes share one port, and /metrics of any of them
reports the whole pool's counts."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from benchmarks.local_redis import free_port, wait_for_port
from benchmarks.processes import gateway_workers, rss_mib
from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.cli import build_parser
from ratelimit_gw.limits import Limits
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import open_storage

from .conftest import Upstream
from .processes import (
    mock_gateway_toml,
    run_serve,
    serve_env,
    start_serve,
    stop,
    until_each_worker_answers,
    wait_ready,
)
from .redis_process import RedisProcess

pytestmark = pytest.mark.slow  # runs `serve --workers` as subprocesses

REQUESTS = 60


def _sum(exposition: str, name: str, labels: str = "") -> float:
    pattern = re.compile(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", re.M)
    return sum(float(v) for lbl, v in pattern.findall(exposition) if labels in lbl)


async def test_workers_share_the_port_and_report_pooled_metrics(
    upstream: Upstream, redis_server: RedisProcess, tmp_path: Path
) -> None:
    storage = open_storage(StorageSettings(url=redis_server.url))
    await storage.call("FLUSHALL")
    accounts = AccountStore(storage)
    await accounts.create_account("acme", balance_nano=10**12, limits=Limits(rpm=REQUESTS))
    key = (await accounts.create_key("acme")).key

    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(mock_gateway_toml(upstream.url, redis_server.url, server=f"port = {port}"))
    log = tmp_path / "workers.log"
    with log.open("wb") as out:
        pool = start_serve(
            config, "--workers", "2", env=serve_env(pool=True), stdout=out, stderr=out
        )
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready([base], 30, log=log)
        # A new connection per request lets the kernel spread them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            # Both workers listening, so the requests below are spread over the two.
            await until_each_worker_answers(http, base, pool.pid)

            body = {
                "model": "gpt-4o-mini",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            }
            statuses = []
            for _ in range(REQUESTS + 5):
                async with http.post(
                    f"{base}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    statuses.append(response.status)
            # Exact limits across processes: one shared bucket of 60.
            assert statuses.count(200) == REQUESTS
            assert statuses.count(429) == 5

            pids = set()
            for _ in range(20):
                async with http.get(f"{base}/metrics") as response:
                    text = await response.text()
                assert _sum(text, "rlgw_requests_total", 'status="200"') == REQUESTS
                assert _sum(text, "rlgw_requests_total", 'status="429"') == 5
                assert _sum(text, "rlgw_rejections_total", 'reason="rpm_exceeded"') == 5
                pids.add(response.headers.get("x-rlgw-worker"))
    finally:
        stop(pool, 20)
        await storage.close()
    assert pool.returncode == 0
    assert len(pids - {None}) == 2, f"expected both workers to answer, saw {pids}"


async def test_bench_measures_each_worker_of_a_passthrough_pool(
    upstream: Upstream, tmp_path: Path
) -> None:
    # The benchmark's `--workers N` runs its pass-through (storage disabled, memory:// in its
    # config) as a pool too, and reads each worker's RSS: the pids it finds are the ones answering.
    port = free_port()
    config = tmp_path / "passthrough.toml"
    config.write_text(mock_gateway_toml(upstream.url, "memory://", server=f"port = {port}"))
    args = ("--workers", "2", "--passthrough-for-benchmark")
    with (tmp_path / "workers.log").open("wb") as log:
        pool = start_serve(config, *args, env=serve_env(pool=True), stdout=log, stderr=log)
    try:
        assert wait_for_port(port, 30), (tmp_path / "workers.log").read_text()
        workers = gateway_workers(pool.pid, 2)
        assert len(workers) == 2 and pool.pid not in workers
        assert all(rss_mib(pid) > 10 for pid in workers)
        base = f"http://127.0.0.1:{port}"
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            answered = await until_each_worker_answers(http, base, pool.pid)
            for _ in range(10):
                async with http.post(f"{base}/v1/chat/completions", json=body) as response:
                    assert response.status == 200, await response.text()
    finally:
        stop(pool, 20)
    assert pool.returncode == 0
    assert answered == set(workers)


def test_a_pool_refuses_per_process_storage(tmp_path: Path) -> None:
    # memory:// lives inside one process: N workers would each enforce their own limits.
    config = tmp_path / "gateway.toml"
    server = f"port = {free_port()}"
    config.write_text(mock_gateway_toml("http://127.0.0.1:9", "memory://", server=server))
    refused = run_serve(config, "--workers", "2", timeout_s=60)
    assert refused.returncode != 0
    assert "--workers needs shared storage" in refused.stderr


def test_workers_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--workers", "0"])
    assert "argument --workers: must be at least 1" in capsys.readouterr().err
