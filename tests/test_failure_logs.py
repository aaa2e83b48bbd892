"""Failures say where and why (docs/operations.md#what-failures-log): storage errors name
the host:port (never the password) and the cause, in the gateway's log and in the CLI's
error; an unreachable upstream is logged with its provider name and URL, never a credential.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator

import aiohttp
import pytest

from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import open_storage
from ratelimit_gw.storage.location import storage_location, url_secrets

from .cli_helpers import cli
from .conftest import UPSTREAM_KEY, Upstream, start_gateway
from .http_helpers import auth, call
from .redis_process import RedisProcess, free_port, start_redis

PASSWORD = "pw-Secret-4242"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[RedisProcess]:
    """A redis-server that wants a password."""
    server = start_redis(None, "--requirepass", PASSWORD)
    try:
        yield server
    finally:
        server.stop()


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def _cli_storage_error(url: str) -> str:
    done = cli("accounts", "list", "--storage", url)
    assert done.returncode == 1, done
    assert done.stdout == ""
    return done.stderr.strip()


def test_cli_names_a_refused_storage_port_and_never_the_password() -> None:
    port = free_port()
    message = _cli_storage_error(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    assert message.endswith(
        f"storage call smembers failed at redis://127.0.0.1:{port}/0: connection refused"
    ), message
    assert PASSWORD not in message


def test_cli_says_noauth_or_wrongpass_when_the_password_is_missing_or_wrong(
    locked_redis: RedisProcess,
) -> None:
    place = f"127.0.0.1:{locked_redis.port}/0"
    missing = _cli_storage_error(f"redis://{place}")
    assert f"failed at redis://{place}: NOAUTH " in missing, missing
    wrong = _cli_storage_error(f"redis://:not-{PASSWORD}@{place}")
    assert f"failed at redis://{place}: WRONGPASS invalid username-password pair" in wrong, wrong
    assert PASSWORD not in wrong
    # The right one works: the message was about the password, not the server.
    done = cli("accounts", "list", "--storage", f"redis://:{PASSWORD}@{place}")
    assert (done.returncode, done.stderr) == (0, ""), done


def test_cli_says_timed_out_for_a_frozen_redis() -> None:
    server = start_redis()
    server.process.send_signal(signal.SIGSTOP)
    try:
        message = _cli_storage_error(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0")
    finally:
        server.process.send_signal(signal.SIGCONT)
        server.stop()
    assert message.endswith(f"failed at redis://127.0.0.1:{server.port}/0: timed out"), message
    assert PASSWORD not in message


@pytest.mark.parametrize("failure", ["refused", "wrong password"])
async def test_gateway_logs_where_storage_failed_and_why_without_the_password(
    failure: str,
    locked_redis: RedisProcess,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port() if failure == "refused" else locked_redis.port
    secret = PASSWORD if failure == "refused" else f"not-{PASSWORD}"
    cause = "connection refused" if failure == "refused" else "WRONGPASS invalid username-password"
    storage = open_storage(
        StorageSettings(
            url=f"redis://:{secret}@127.0.0.1:{port}/0",
            command_timeout_s=0.5,
            connect_timeout_s=0.5,
            breaker_failures=2,
        )
    )
    runner, gw = await start_gateway(upstream, storage)
    try:
        for _ in range(3):  # key lookups fail; the breaker opens after two
            reply = await call(http, gw, "/v1/chat/completions", CHAT, auth("openai", "rlgw-x"))
            assert reply.status == 503, reply.body
    finally:
        await runner.cleanup()
        await storage.close()
    place = f"redis://127.0.0.1:{port}/0"
    logged = _messages(caplog)
    assert any(f"failed at {place}: {cause}" in m for m in logged), logged
    assert f"storage at {place} unavailable ({cause}" in "\n".join(logged), logged
    assert any(
        f"circuit breaker open, storage at {place} failed recently ({cause}" in m for m in logged
    ), logged
    assert not any(secret in m for m in logged)


async def test_an_unreachable_upstream_is_logged_with_provider_and_url_never_a_credential(
    redis_storage: object,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    closed = f"http://127.0.0.1:{free_port()}"
    provider = {
        "name": "closed-openai",
        "protocol": "openai",
        "base_url": closed,
        "api_key_env": "RLGW_TEST_UPSTREAM_KEY",
        "headers": {"X-Team-Secret": "${TEAM_SECRET}"},
    }
    model = {"id": "gpt-4o-mini", "provider": "closed-openai", "default_max_output": 100}
    runner, gw = await start_gateway(
        upstream,
        redis_storage,  # type: ignore[arg-type]
        {"TEAM_SECRET": "team-secret-value"},
        providers=[provider],
        models=[model],
    )
    try:
        key = await gw.new_key()
        reply = await call(
            http, gw, "/v1/chat/completions?trace=q-secret", CHAT, auth("openai", key)
        )
    finally:
        await runner.cleanup()
    assert reply.status == 502, reply.body
    logged = [r for r in caplog.records if r.name == "ratelimit_gw.upstream"]
    assert [r.getMessage() for r in logged] == [
        f"upstream closed-openai at {closed}/v1/chat/completions unreachable: connection refused"
    ]
    assert logged[0].levelno == logging.WARNING
    for message in _messages(caplog):
        for secret in (UPSTREAM_KEY, "team-secret-value", key, "q-secret"):
            assert secret not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("memory://", "memory://"),
        (f"redis://:{PASSWORD}@10.0.0.5:6379/2", "redis://10.0.0.5:6379/2"),
        (f"rediss://app:{PASSWORD}@redis.internal:6380", "rediss://redis.internal:6380"),
        (
            f"unix://:{PASSWORD}@/run/redis.sock?db=3&password={PASSWORD}",
            "unix:///run/redis.sock?db=3",
        ),
        (f"unix:///run/redis.sock?password={PASSWORD}", "unix:///run/redis.sock"),
        (
            f"redis+sentinel://:{PASSWORD}@10.0.0.1:26379,10.0.0.2:26379/mymaster/1",
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/1",
        ),
        (
            f"redis+cluster://:{PASSWORD}@10.0.0.1:7000,10.0.0.2:7000",
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
        ),
    ],
)
def test_the_storage_location_keeps_hosts_and_database_and_drops_credentials(
    url: str, shown: str
) -> None:
    assert storage_location(url) == shown
    assert (PASSWORD in url_secrets(url)) == (PASSWORD in url)
