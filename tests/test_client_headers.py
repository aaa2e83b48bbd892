"""Which client headers reach the upstream (docs/relay.md#request-headers), seen at the mock.

Per provider an allow list (``forward_headers``) or a deny list (``drop_headers``); by default
the headers that pick the upstream account (``OpenAI-Organization``, ``OpenAI-Project``) are
dropped, in any letter case, on native and converter routes. The gateway's own credential is
never the client's to override.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ratelimit_gw.settings import ConfigError, build_settings

from .conftest import UPSTREAM_KEY, Gateway, Upstream, custom_endpoint, start_gateway
from .http_helpers import auth, call

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
# What an OpenAI SDK configured with an organization and project sends, and some more.
CLIENT_HEADERS = {
    "OpenAI-Organization": "org-client",
    "openai-project": "proj_client",
    "OpenAI-Beta": "assistants=v2",
    "X-Custom": "kept",
    "X-Internal-Trace": "t-1",
    "User-Agent": "headers-test/1.0",
}
POOL_KEY_B = "sk-pool-b-secret"
StartGateway = Callable[..., Awaitable[Gateway]]
_accounts = itertools.count()


@pytest.fixture
async def gateway_with(upstream: Upstream, redis_storage: Any) -> AsyncIterator[StartGateway]:
    """Gateways on the session's Redis whose every provider carries ``provider_options``, and
    whose custom endpoint ``acme-ai/llm`` carries ``endpoint_options``."""
    runners: list[web.AppRunner] = []

    async def start(
        *, endpoint_options: dict[str, Any] | None = None, **provider_options: Any
    ) -> Gateway:
        providers = [
            {
                "name": f"mock-{protocol}",
                "protocol": protocol,
                "base_url": upstream.url,
                "api_key_env": "RLGW_TEST_UPSTREAM_KEY",
                **provider_options,
            }
            for protocol in ("openai", "anthropic", "gemini")
        ]
        runner, gw = await start_gateway(
            upstream,
            redis_storage,
            {"ENDPOINT_KEY": "endpoint-secret", "POOL_KEY_B": POOL_KEY_B},
            providers=providers,
            custom_endpoints=[custom_endpoint(upstream.url, **(endpoint_options or {}))],
        )
        runners.append(runner)
        return gw

    yield start
    for runner in runners:
        await runner.cleanup()


async def _sent_upstream(
    http: aiohttp.ClientSession,
    gw: Gateway,
    path: str = "/v1/chat/completions",
    body: dict[str, Any] = CHAT,
    protocol: str = "openai",
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The headers the mock received for one request with :data:`CLIENT_HEADERS`."""
    key = await gw.new_key(f"acct-{next(_accounts)}")
    headers = {**CLIENT_HEADERS, **(extra or {}), **auth(protocol, key)}
    reply = await call(http, gw, path, body, headers)
    assert reply.status == 200, reply.body
    received = gw.upstream.state.requests[-1].headers
    assert key not in str(received)
    return received


async def test_account_choosing_headers_are_dropped_by_default_in_any_letter_case(
    gateway_with: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_with()
    seen = await _sent_upstream(http, gw, extra={"OPENAI-PROJECT": "proj_upper"})
    assert "openai-organization" not in seen and "openai-project" not in seen
    assert seen["openai-beta"] == "assistants=v2"
    assert seen["x-custom"] == "kept" and seen["x-internal-trace"] == "t-1"
    assert seen["user-agent"] == "headers-test/1.0"
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    # Any provider's: an Anthropic-protocol one relayed natively…
    seen = await _sent_upstream(http, gw, "/v1/messages", MESSAGES, "anthropic")
    assert "openai-organization" not in seen and "openai-project" not in seen
    assert seen["x-custom"] == "kept"
    # …and through a converter route, to a model of the caller's protocol and of another.
    for model in ("gpt-4o-mini", "claude-sonnet-4-6"):
        seen = await _sent_upstream(
            http, gw, "/openai/v1/chat/completions", {**CHAT, "model": model}
        )
        assert "openai-organization" not in seen and "openai-project" not in seen
        assert seen["x-custom"] == "kept"


async def test_a_deny_list_replaces_the_default(
    gateway_with: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_with(drop_headers=["x-INTERNAL-trace"])
    seen = await _sent_upstream(http, gw)
    assert "x-internal-trace" not in seen
    assert seen["openai-organization"] == "org-client" and seen["openai-project"] == "proj_client"
    assert seen["x-custom"] == "kept"

    everything = await gateway_with(drop_headers=[])
    seen = await _sent_upstream(http, everything)
    assert {name.lower() for name in CLIENT_HEADERS} <= set(seen)


async def test_an_allow_list_forwards_only_what_it_names(
    gateway_with: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_with(forward_headers=["Content-Type", "x-custom", "OpenAI-Beta"])
    seen = await _sent_upstream(http, gw)
    assert seen["x-custom"] == "kept" and seen["openai-beta"] == "assistants=v2"
    for dropped in ("openai-organization", "openai-project", "x-internal-trace", "user-agent"):
        assert dropped not in seen
    # What the gateway itself sends still goes: the upstream credential, the body's framing.
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen["content-type"] == "application/json"
    assert seen["host"] == gw.upstream.url.removeprefix("http://")
    # Anthropic's required version header comes from the gateway on a converted request.
    seen = await _sent_upstream(
        http, gw, "/openai/v1/chat/completions", {**CHAT, "model": "claude-sonnet-4-6"}
    )
    assert seen["x-api-key"] == UPSTREAM_KEY and "anthropic-version" in seen
    assert "user-agent" not in seen and "openai-beta" not in seen  # another protocol's


async def test_a_client_cannot_override_the_gateway_credential_whatever_the_policy(
    gateway_with: StartGateway, http: aiohttp.ClientSession
) -> None:
    for options in ({}, {"drop_headers": []}, {"forward_headers": ["x-custom"]}):
        gw = await gateway_with(**options)
        # An Anthropic caller's key is in x-api-key; it adds a forged Authorization too.
        seen = await _sent_upstream(
            http,
            gw,
            "/v1/messages",
            MESSAGES,
            "anthropic",
            extra={"Authorization": "Bearer forged", "X-Goog-Api-Key": "forged"},
        )
        assert seen["x-api-key"] == UPSTREAM_KEY, options
        assert "authorization" not in seen and "x-goog-api-key" not in seen, options


async def test_a_pool_providers_upstream_sees_a_keys_credential_never_the_callers(
    gateway_with: StartGateway, http: aiohttp.ClientSession
) -> None:
    pool = [
        {"name": "a", "api_key_env": "RLGW_TEST_UPSTREAM_KEY"},
        {"name": "b", "api_key_env": "POOL_KEY_B"},
    ]
    gw = await gateway_with(api_key_env=None, keys=pool)
    # An OpenAI caller's own Authorization (its gateway key) is replaced by a pool key's.
    seen = await _sent_upstream(http, gw)
    assert seen["authorization"] in (f"Bearer {UPSTREAM_KEY}", f"Bearer {POOL_KEY_B}")
    # An Anthropic caller's forged Authorization does not reach the upstream beside the key.
    seen = await _sent_upstream(
        http, gw, "/v1/messages", MESSAGES, "anthropic", extra={"Authorization": "Bearer forged"}
    )
    assert seen["x-api-key"] in (UPSTREAM_KEY, POOL_KEY_B)
    assert "authorization" not in seen


async def test_a_pool_endpoints_upstream_sees_a_keys_headers_never_the_callers(
    gateway_with: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_with(
        endpoint_options={
            "headers": {},
            "keys": [
                {"name": "a", "headers": {"X-Upstream-Token": "${ENDPOINT_KEY}"}},
                {"name": "b", "headers": {"X-Upstream-Token": "${POOL_KEY_B}"}},
            ],
        }
    )
    key = await gw.new_key()
    reply = await call(
        http,
        gw,
        "/proxy-api/acme-ai/llm/v1/chat/completions",
        CHAT,
        {**CLIENT_HEADERS, "Authorization": f"Bearer {key}", "x-upstream-TOKEN": "forged"},
    )
    assert reply.status == 200, reply.body
    seen = gw.upstream.state.requests[-1].headers
    assert seen["x-upstream-token"] in ("endpoint-secret", POOL_KEY_B)
    assert "authorization" not in seen
    assert seen["openai-organization"] == "org-client"  # otherwise still transparent


async def test_custom_endpoints_stay_transparent(
    gateway_with: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_with()
    key = await gw.new_key()
    reply = await call(
        http,
        gw,
        "/proxy-api/acme-ai/llm/v1/chat/completions",
        CHAT,
        {**CLIENT_HEADERS, "Authorization": f"Bearer {key}"},
    )
    assert reply.status == 200, reply.body
    seen = gw.upstream.state.requests[-1].headers
    assert seen["openai-organization"] == "org-client"
    assert seen["authorization"] == "Bearer endpoint-secret"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"forward_headers": ["x-a"], "drop_headers": ["x-b"]},
            "providers[0]: forward_headers (an allow list) and drop_headers (a deny list) "
            "exclude each other; keep one",
        ),
        (
            {"drop_headers": ["x-ok", "bad name"]},
            "providers[0].drop_headers[1]: 'bad name' is not a valid HTTP header name",
        ),
        (
            {"forward_headers": ["x-ok", "Authorization"]},
            "providers[0].forward_headers[1]: Authorization never comes from the client (a "
            "credential, a hop-by-hop header, or one this provider's configuration sets); "
            "remove it",
        ),
        (
            {"forward_headers": ["Connection"]},
            "providers[0].forward_headers[0]: Connection never comes from the client (a "
            "credential, a hop-by-hop header, or one this provider's configuration sets); "
            "remove it",
        ),
        (
            {"forward_headers": ["x-team"], "headers": {"X-Team": "gateway"}},
            "providers[0].forward_headers[0]: x-team never comes from the client (a "
            "credential, a hop-by-hop header, or one this provider's configuration sets); "
            "remove it",
        ),
        ({"drop_headers": "x-a"}, "providers[0].drop_headers: Expected `array | null`, got `str`"),
    ],
)
def test_header_lists_are_validated_with_their_field_path(
    options: dict[str, Any], message: str
) -> None:
    provider = {"name": "p", "protocol": "openai", "base_url": "http://127.0.0.1:1", **options}
    with pytest.raises(ConfigError) as raised:
        build_settings({"providers": [provider]}, {})
    assert str(raised.value) == message
