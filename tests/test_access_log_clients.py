"""The access log's caller fields (docs/operations.md#access-log): the client address, from
X-Forwarded-For only as far as trusted proxies wrote it, and the user agent, escaped.

Requests come over real sockets from 127.0.0.1, so "a trusted proxy" is loopback here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from ratelimit_gw.settings import ConfigError, build_settings

from .conftest import Gateway, Upstream, start_gateway

CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
# The access log's fields before this change, in their order: appended to, never reordered.
EARLIER_FIELDS = [
    "ts",
    "request_id",
    "settlement_id",
    "method",
    "path",
    "route",
    "protocol",
    "status",
    "reason",
    "key_id",
    "account",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "duration_ms",
    "upstream_ttfb_ms",
]
StartGateway = Callable[[list[str]], Awaitable[Gateway]]


@pytest.fixture
async def gateway_trusting(upstream: Upstream, redis_storage: Any) -> AsyncIterator[StartGateway]:
    runners: list[web.AppRunner] = []

    async def start(trusted_proxies: list[str]) -> Gateway:
        server = {"host": "127.0.0.1", "port": 0, "trusted_proxies": trusted_proxies}
        runner, gw = await start_gateway(upstream, redis_storage, server=server)
        runners.append(runner)
        return gw

    yield start
    for runner in runners:
        await runner.cleanup()


async def _logged(
    gw: Gateway,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    headers: list[tuple[str, str]],
) -> dict[str, Any]:
    """The access-log line of one request sent with ``headers`` (repeats kept)."""
    caplog.clear()
    async with http.post(gw.url + "/v1/chat/completions", data=CHAT, headers=CIMultiDict(headers)):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "ratelimit_gw.access"]
    assert len(lines) == 1, lines
    assert "\n" not in lines[0] and "\r" not in lines[0]
    line: dict[str, Any] = json.loads(lines[0])
    return line


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="ratelimit_gw.access")
    return caplog


@pytest.mark.parametrize("trusted", [[], ["10.0.0.0/8"]])
async def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(
    trusted: list[str],
    gateway_trusting: StartGateway,
    http: aiohttp.ClientSession,
    access_log: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway_trusting(trusted)
    line = await _logged(gw, http, access_log, [("X-Forwarded-For", "198.51.100.7")])
    assert line["client"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("forwarded_for", "client"),
    [
        ([], "127.0.0.1"),  # no header: the peer itself
        (["198.51.100.7"], "198.51.100.7"),
        (["198.51.100.7, 10.1.2.3"], "198.51.100.7"),  # an inner proxy appended itself
        (["203.0.113.66, 198.51.100.7"], "198.51.100.7"),  # the caller's own entry: not believed
        (["203.0.113.66", "198.51.100.7, 10.1.2.3"], "198.51.100.7"),  # two header lines
        (["10.9.9.9, 10.1.1.1"], "10.9.9.9"),  # every hop trusted: the left-most
        (["not-an-address, 10.1.2.3"], "10.1.2.3"),  # nothing left of garbage is believed
        ([f"{'9' * 4000}, 10.1.2.3"], "10.1.2.3"),  # nor left of text too long for an address
        (["198.51.100.7:4711"], "198.51.100.7"),
        (["[2001:db8::7]:443"], "2001:db8::7"),
        (["2001:db8::7"], "2001:db8::7"),
    ],
)
async def test_a_trusted_peer_gives_the_rightmost_untrusted_forwarded_address(
    forwarded_for: list[str],
    client: str,
    gateway_trusting: StartGateway,
    http: aiohttp.ClientSession,
    access_log: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway_trusting(["127.0.0.1", "10.0.0.0/8"])
    headers = [("X-Forwarded-For", value) for value in forwarded_for]
    line = await _logged(gw, http, access_log, headers)
    assert line["client"] == client


async def test_the_user_agent_is_logged_escaped_and_bounded_after_the_earlier_fields(
    gateway_trusting: StartGateway,
    http: aiohttp.ClientSession,
    access_log: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway_trusting([])
    forged = 'agent/1.0\t" ,"status":200,"x":"\\ caf\u00e9'
    line = await _logged(gw, http, access_log, [("User-Agent", forged)])
    assert list(line)[: len(EARLIER_FIELDS)] == EARLIER_FIELDS
    assert list(line)[len(EARLIER_FIELDS) : len(EARLIER_FIELDS) + 2] == ["client", "user_agent"]
    assert line["user_agent"] == forged
    assert line["status"] == 401  # the forged field did not take the place of the real one

    line = await _logged(gw, http, access_log, [("User-Agent", "x" * 5000)])
    assert line["user_agent"] == "x" * 256

    async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as bare:
        line = await _logged(gw, bare, access_log, [])
    assert line["user_agent"] is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "10.0.0.1/8",
            "server.trusted_proxies[1]: 10.0.0.1/8 has host bits set; write an address like "
            "10.0.0.5 or a network like 10.0.0.0/8",
        ),
        (
            "proxy.internal",
            "server.trusted_proxies[1]: 'proxy.internal' does not appear to be an IPv4 or IPv6 "
            "network; write an address like 10.0.0.5 or a network like 10.0.0.0/8",
        ),
    ],
)
def test_trusted_proxies_are_validated_with_their_field_path(entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        build_settings({"server": {"trusted_proxies": ["127.0.0.1", entry]}}, {})
    assert str(raised.value) == message
    settings = build_settings({"server": {"trusted_proxies": ["127.0.0.1", "fd00::/8"]}}, {})
    assert settings.server.trusted_proxies == ["127.0.0.1", "fd00::/8"]
