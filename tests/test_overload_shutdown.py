"""Overload and shutdown: the per-process in-flight ceiling (529 ``overloaded_error``) and
the graceful drain on SIGTERM.

Overload runs in-process on memory:// and a real Redis. Shutdown runs the real CLI
(``python -m ratelimit_gw serve``) as a subprocess on a private Redis, against the mock
upstream in this process, and sends it SIGTERM while a stream is in flight: the listener
closes at once (new connections are refused), the stream runs on until it ends or until
``server.shutdown_timeout_s`` cuts it, and either way it is settled before the process exits.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.limits import Limits
from ratelimit_gw.money import parse_usd
from ratelimit_gw.protocols import estimate_input_tokens
from ratelimit_gw.services import SERVICES
from ratelimit_gw.storage import Storage

from .conftest import Gateway, Upstream, custom_endpoint, start_gateway
from .processes import mock_gateway_toml, start_serve, stop, wait_ready
from .redis_process import RedisProcess, free_port

pytestmark = pytest.mark.slow  # runs gateway subprocesses and signals them

PROMPT = "Tell me about the gateway, please"  # 33 chars -> 9 input tokens at the mock
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
CHAT_STREAM = {**CHAT, "stream": True}
CONTENTS = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
MESSAGES = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": PROMPT}],
}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


# --- overload: server.max_inflight ---------------------------------------------------------


@pytest.fixture
async def small_gateway(upstream: Upstream, storage: Storage) -> AsyncIterator[Gateway]:
    """A gateway that serves at most two requests at once, with one custom endpoint."""
    runner, gw = await start_gateway(
        upstream,
        storage,
        {"ENDPOINT_KEY": "endpoint-secret-1"},
        server={"host": "127.0.0.1", "port": 0, "max_inflight": 2},
        custom_endpoints=[custom_endpoint(upstream.url)],
    )
    try:
        yield gw
    finally:
        await runner.cleanup()


async def wait_inflight(gw: Gateway, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(gw.app[SERVICES].inflight) != count:
        assert time.monotonic() < deadline, f"in flight: {len(gw.app[SERVICES].inflight)}"
        await asyncio.sleep(0.01)


OVERLOADED = "The gateway is serving too many requests at once; retry shortly."


async def test_requests_beyond_max_inflight_get_529_overloaded_in_each_protocol(
    small_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    gw = small_gateway
    key = await gw.new_key(balance_usd="1.00", rpm=3)
    bearer = {"Authorization": f"Bearer {key}"}
    slow = {**bearer, "x-mock-latency-ms": "1500"}

    async def post(path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any, Any]:
        async with http.post(gw.url + path, json=body, headers=headers) as response:
            return response.status, response.headers, await response.json(content_type=None)

    busy = [asyncio.create_task(post("/v1/chat/completions", CHAT, slow)) for _ in range(2)]
    await wait_inflight(gw, 2)

    status, headers, body = await post("/v1/chat/completions", CHAT, bearer)
    assert status == 529
    assert body == {
        "error": {
            "type": "overloaded_error",
            "code": "529",
            "reason": "overloaded",
            "message": OVERLOADED,
            "param": None,
        }
    }
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("1", "1000")
    assert headers["x-request-id"].startswith("req_")

    anthropic = {"x-api-key": key, "anthropic-version": "2023-06-01", "x-request-id": "ovl-1"}
    status, headers, body = await post("/v1/messages", MESSAGES, anthropic)
    assert status == 529
    assert body == {
        "type": "error",
        "error": {
            "type": "overloaded_error",
            "code": "529",
            "reason": "overloaded",
            "message": OVERLOADED,
        },
        "request_id": "ovl-1",
    }
    assert headers["request-id"] == "ovl-1"

    gemini = {"x-goog-api-key": key}
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    status, headers, body = await post(path, CONTENTS, gemini)
    assert status == 529
    assert body["error"]["code"] == 529
    assert body["error"]["status"] == "UNAVAILABLE"
    assert (body["error"]["type"], body["error"]["reason"]) == ("overloaded_error", "overloaded")
    assert headers["retry-after"] == "1"

    status, _, body = await post("/proxy-api/acme-ai/llm/v1/chat/completions", CHAT, bearer)
    assert (status, body["error"]["reason"]) == (529, "overloaded")

    # Probes and scrapes are never refused, and the refusals are counted.
    for probe in ("/healthz", "/readyz", "/metrics"):
        async with http.get(gw.url + probe) as response:
            assert response.status == 200, probe
            if probe == "/metrics":
                text = await response.text()
    assert 'rlgw_rejections_total{reason="overloaded"} 4.0' in text
    assert 'status="529"' in text

    # The four refused requests consumed nothing: the two busy ones left one of three.
    assert [s for s, _, _ in await asyncio.gather(*busy)] == [200, 200]
    await wait_inflight(gw, 0)
    status, headers, _ = await post("/v1/chat/completions", CHAT, bearer)
    assert status == 200
    assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_a_client_that_hangs_up_gives_its_inflight_slot_back(
    small_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    gw = small_gateway
    key = await gw.new_key()
    headers = {"Authorization": f"Bearer {key}", "x-mock-chunk-delay-ms": "500"}
    for _ in range(3):  # more hang-ups than slots: a leaked slot would show as a 529
        response = await http.post(
            gw.url + "/v1/chat/completions", json=CHAT_STREAM, headers=headers
        )
        assert response.status == 200
        await response.content.readuntil(b"tok4")
        response.close()
        await wait_inflight(gw, 0)
    async with http.post(
        gw.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        assert response.status == 200


def test_max_inflight_and_shutdown_timeout_are_validated() -> None:
    from ratelimit_gw.settings import ConfigError, build_settings

    assert build_settings({}).server.max_inflight == 1024
    assert build_settings({}).server.shutdown_timeout_s == 30.0
    with pytest.raises(ConfigError, match=r"^server.max_inflight: Expected `int` >= 1"):
        build_settings({"server": {"max_inflight": 0}})
    with pytest.raises(ConfigError, match=r"^server.shutdown_timeout_s: Expected `float` >= 0"):
        build_settings({"server": {"shutdown_timeout_s": -1}})


# --- graceful shutdown on SIGTERM ----------------------------------------------------------


class ServeProcess:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve(
    tmp_path: Path, upstream: Upstream, redis_url: str, shutdown_timeout_s: float
) -> Iterator[ServeProcess]:
    port = free_port()
    config = tmp_path / "gateway.toml"
    server = f"port = {port}\nshutdown_timeout_s = {shutdown_timeout_s}"
    config.write_text(mock_gateway_toml(upstream.url, redis_url, server=server))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = start_serve(config, stdout=out, stderr=out)
    try:
        yield ServeProcess(process, f"http://127.0.0.1:{port}", log)
    finally:
        stop(process, signum=signal.SIGKILL)


async def wait_listener_closed(http: aiohttp.ClientSession, gw: ServeProcess) -> None:
    """After SIGTERM (once the process has handled it): connections are refused."""
    deadline = time.monotonic() + 5
    while True:
        try:
            async with http.get(gw.url + "/readyz") as response:
                await response.read()  # until the signal is handled: 200, or 503 draining
        except aiohttp.ClientConnectorError:
            return  # the listener is closed
        assert time.monotonic() < deadline, "the listener stayed open after SIGTERM"
        await asyncio.sleep(0.05)


async def wait_exit(gw: ServeProcess, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while (code := gw.process.poll()) is None:
        assert time.monotonic() < deadline, "the gateway did not exit:\n" + gw.output()
        await asyncio.sleep(0.05)
    return code


async def books(accounts: AccountStore, request_id: str) -> Any:
    account = await accounts.get_account("acme")
    ledger = [e for e in await accounts.ledger("acme") if e.type in ("charge", "release")]
    assert [e.request_id for e in ledger] == [request_id]
    assert (account.holds_live, account.held_usd) == (0, "0.00")
    charged = parse_usd(ledger[0].cost_usd or "0")
    assert parse_usd(account.topped_up_usd) - parse_usd(account.balance_usd) == charged
    return ledger[0]


async def new_key(storage: Storage) -> str:
    accounts = AccountStore(storage)
    await accounts.create_account(
        "acme", balance_nano=parse_usd("1.00"), limits=Limits(concurrency=2)
    )
    return (await accounts.create_key("acme", limits=Limits(concurrency=1))).key


async def test_sigterm_drains_an_inflight_stream_refuses_new_requests_and_settles_it(
    upstream: Upstream,
    redis_storage: Storage,
    redis_server: RedisProcess,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    key = await new_key(redis_storage)
    with serve(tmp_path, upstream, redis_server.url, shutdown_timeout_s=20) as gw:
        await wait_ready([gw.url], process=gw.process, log=gw.log)
        headers = {
            "Authorization": f"Bearer {key}",
            "x-request-id": "drained-1",
            "x-mock-chunk-delay-ms": "400",  # four pieces over ~1.2 s
        }
        stream = await http.post(gw.url + "/v1/chat/completions", json=CHAT_STREAM, headers=headers)
        assert stream.status == 200
        received = await stream.content.readuntil(b"tok4")

        gw.process.send_signal(signal.SIGTERM)
        await wait_listener_closed(http, gw)
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers)

        received += await stream.content.read()  # the stream runs on to its end
        stream.close()
        assert b" tok19" in received and received.rstrip().endswith(b"data: [DONE]")
        assert await wait_exit(gw, 15) == 0
        assert "draining 1 in-flight request(s)" in gw.output()

    entry = await books(AccountStore(redis_storage), "drained-1")
    assert (entry.outcome, entry.input_tokens, entry.output_tokens) == ("ok", 9, 20)


async def test_sigterm_cuts_a_stream_still_running_at_the_deadline_and_settles_it(
    upstream: Upstream,
    redis_storage: Storage,
    redis_server: RedisProcess,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    key = await new_key(redis_storage)
    with serve(tmp_path, upstream, redis_server.url, shutdown_timeout_s=0.5) as gw:
        await wait_ready([gw.url], process=gw.process, log=gw.log)
        headers = {
            "Authorization": f"Bearer {key}",
            "x-request-id": "cut-1",
            "x-mock-chunk-delay-ms": "3000",  # ten seconds to the end: far past the deadline
        }
        stream = await http.post(gw.url + "/v1/chat/completions", json=CHAT_STREAM, headers=headers)
        assert stream.status == 200
        await stream.content.readuntil(b"tok4")

        signalled = time.monotonic()
        gw.process.send_signal(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientPayloadError):  # cut: no terminating chunk
            await stream.content.read()
        stream.close()
        assert await wait_exit(gw, 15) == 0
        assert time.monotonic() - signalled < 5  # the deadline, not the stream, ended it
        assert "cutting 1 request(s) still running after 0.5s" in gw.output()

    entry = await books(AccountStore(redis_storage), "cut-1")
    # Settled by the handler's finally-block with what was relayed: one piece, 24 chars.
    body_tokens = estimate_input_tokens(len(json.dumps(CHAT_STREAM)))
    assert (entry.outcome, entry.input_tokens, entry.output_tokens) == (
        "client_disconnect",
        body_tokens,
        6,
    )
