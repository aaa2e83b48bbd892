"""Custom endpoints (§10): ``ANY /proxy-api/{provider_account}/{endpoint}/{path…}``.

The configuration mirrors the PipeShift guide in the reference material: provider account
``pipeshift``, endpoint ``model``, the upstream ``Authorization`` configured on the gateway
as an env reference. Here the base URL is the mock upstream, which serves the OpenAI paths at
its root, so ``/proxy-api/pipeshift/model/v1/chat/completions`` reaches its chat route. The
official ``openai`` SDK is pointed at ``{gateway}/proxy-api/pipeshift/model/v1``, plain and
streaming; raw HTTP checks what the upstream receives and what is charged.

Every behaviour test runs on ``memory://`` and on a real Redis (the ``storage`` fixture).
Mock usage: input = max(1, ceil(prompt chars / 4)); output = 20 words cut at the cap.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict
from yarl import URL

from ratelimit_gw.accounts import LedgerEntry
from ratelimit_gw.money import cost_nano, format_usd, parse_usd
from ratelimit_gw.settings import ConfigError, build_settings

from .conftest import UPSTREAM_KEY, Gateway, Upstream, start_gateway
from .conftest import gateway_config as base_config

PIPESHIFT_KEY = "ps-upstream-secret-abcdef"
PRICE = "0.002"
OPEN_MODEL = "zai-org/GLM-5"  # not configured on the gateway: opaque, per-request price
MESSAGES: Any = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about the gateway"},
]
FULL_TEXT = " ".join(f"tok{i}" for i in range(20))
CHAT_PATH = "/proxy-api/pipeshift/model/v1/chat/completions"
CREDENTIAL = {"Authorization": "Bearer ${PIPESHIFT_API_KEY}", "Content-Type": "application/json"}


def endpoint(name: str = "model", **fields: Any) -> dict[str, Any]:
    return {
        "provider_account": "pipeshift",
        "name": name,
        "base_url": "",  # filled in with the mock's URL
        "headers": {**CREDENTIAL, "X-Endpoint-Tag": name},
        **fields,
    }


ENDPOINTS = [
    endpoint(price_per_request_usd=PRICE),
    endpoint("vision", accounts=["team-*", "partner"]),
    endpoint("free"),
]


@asynccontextmanager
async def proxy_gateway(
    upstream: Upstream, storage: Any, endpoints: list[dict[str, Any]] = ENDPOINTS
) -> AsyncIterator[Gateway]:
    configured = [{**e, "base_url": e["base_url"] or upstream.url} for e in endpoints]
    runner, gw = await start_gateway(
        upstream, storage, {"PIPESHIFT_API_KEY": PIPESHIFT_KEY}, custom_endpoints=configured
    )
    try:
        yield gw
    finally:
        await runner.cleanup()


@pytest.fixture
async def gw(upstream: Upstream, storage: Any) -> AsyncIterator[Gateway]:
    async with proxy_gateway(upstream, storage) as gateway:
        yield gateway


@asynccontextmanager
async def sdk(gw: Gateway, key: str, name: str = "model") -> AsyncIterator[openai.AsyncOpenAI]:
    async with (
        openai.DefaultAsyncHttpxClient() as transport,
        openai.AsyncOpenAI(
            base_url=f"{gw.url}/proxy-api/pipeshift/{name}/v1",
            api_key=key,
            max_retries=0,
            http_client=transport,
        ) as client,
    ):
        yield client


async def ledger(gw: Gateway, account: str = "acme") -> list[LedgerEntry]:
    """The account's settlement entries (not its top-ups), oldest first."""
    await gw.settled()
    entries = await gw.accounts.ledger(account)
    return [e for e in reversed(entries) if e.type in ("charge", "release")]


def upstream_calls(gw: Gateway) -> list[Any]:
    return [r for r in gw.upstream.state.requests if not r.path.startswith("/mock/")]


async def post_chat(
    http: aiohttp.ClientSession, gw: Gateway, key: str | None, body: dict[str, Any], **kw: Any
) -> tuple[int, CIMultiDict[str], Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    async with http.post(f"{gw.url}{CHAT_PATH}", json=body, headers=headers, **kw) as resp:
        data = await resp.json(content_type=None)
        return resp.status, CIMultiDict(resp.headers), data


def chat(model: str = OPEN_MODEL, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **fields}


# --- the official SDK through the proxy path ---------------------------------------------------


async def test_openai_sdk_plain_call_reaches_the_base_url_with_the_configured_credential(
    gw: Gateway,
) -> None:
    key = await gw.new_key()
    async with sdk(gw, key) as client:
        resp = await client.chat.completions.create(
            model=OPEN_MODEL, messages=MESSAGES, temperature=0.7, stream=False
        )
    assert resp.choices[0].message.content == FULL_TEXT
    assert resp.model == OPEN_MODEL
    [seen] = upstream_calls(gw)
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    # The upstream saw the endpoint's configured headers and never the caller's gateway key.
    assert seen.headers["authorization"] == f"Bearer {PIPESHIFT_KEY}"
    assert seen.headers["x-endpoint-tag"] == "model"
    assert seen.headers["content-type"] == "application/json"
    assert not any(key in value for value in seen.headers.values())
    assert UPSTREAM_KEY not in seen.headers.values()  # not a native provider's credential
    # The body went through untouched.
    assert seen.json() == {
        "model": OPEN_MODEL,
        "messages": MESSAGES,
        "temperature": 0.7,
        "stream": False,
    }


async def test_openai_sdk_stream_is_relayed_untouched_and_charged_per_request(
    gw: Gateway,
) -> None:
    key = await gw.new_key(balance_usd="1.00")
    async with sdk(gw, key) as client:
        stream = await client.chat.completions.create(
            model=OPEN_MODEL, messages=MESSAGES, stream=True
        )
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FULL_TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    # An opaque request is forwarded as sent: the gateway asked for no usage chunk.
    [seen] = upstream_calls(gw)
    assert "stream_options" not in seen.json()
    [entry] = await ledger(gw)
    assert (entry.type, entry.cost_usd, entry.model) == ("charge", PRICE, "pipeshift/model")
    account = await gw.accounts.get_account("acme")
    assert (account.balance_usd, account.held_usd) == ("0.998", "0.00")


async def test_priced_model_is_charged_from_the_usage_of_the_answer(gw: Gateway) -> None:
    key = await gw.new_key(balance_usd="1.00")
    async with sdk(gw, key) as client:
        resp = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=12
        )
    assert resp.usage is not None
    used = (resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert used[1] == 12  # the mock honoured the cap
    [entry] = await ledger(gw)
    expected = cost_nano(*used, parse_usd("0.15"), parse_usd("0.60"))
    assert (entry.input_tokens, entry.output_tokens) == used
    assert (entry.model, entry.cost_usd) == ("gpt-4o-mini", format_usd(expected))
    account = await gw.accounts.get_account("acme")
    assert account.balance_usd == format_usd(parse_usd("1.00") - expected)
    # Not the endpoint's per-request price on top.
    assert account.spent_usd == format_usd(expected)


async def test_priced_model_stream_is_metered_and_the_usage_chunk_hidden(gw: Gateway) -> None:
    key = await gw.new_key(balance_usd="1.00")
    async with sdk(gw, key) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        chunks = [c async for c in stream]
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == FULL_TEXT
    [seen] = upstream_calls(gw)
    assert seen.json()["stream_options"] == {"include_usage": True}
    [entry] = await ledger(gw)
    assert entry.output_tokens == 20
    assert entry.cost_usd == format_usd(
        cost_nano(entry.input_tokens or 0, 20, parse_usd("2.50"), parse_usd("10.00"))
    )


async def test_priced_stream_with_include_usage_keeps_the_usage_chunk(gw: Gateway) -> None:
    key = await gw.new_key()
    async with sdk(gw, key) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    [entry] = await ledger(gw)
    assert (entry.input_tokens, entry.output_tokens) == (chunks[-1].usage.prompt_tokens, 20)


# --- transparency: method, path suffix, query, headers ----------------------------------------


async def test_method_path_suffix_and_query_are_forwarded(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key()
    auth = {"Authorization": f"Bearer {key}"}
    url = f"{gw.url}/proxy-api/pipeshift/model/v1/models?limit=2&q=a%20b&q=c"
    async with http.get(url, headers=auth) as resp:
        assert resp.status == 200
        listing = await resp.json()
    assert listing["object"] == "list"  # the mock's own OpenAI model list, relayed
    [seen] = upstream_calls(gw)
    assert (seen.method, seen.path, seen.query_string) == ("GET", "/v1/models", "limit=2&q=a b&q=c")
    # DELETE reaches the mock's log-clearing route: the method is the caller's.
    async with http.delete(f"{gw.url}/proxy-api/pipeshift/model/mock/requests", headers=auth) as r:
        assert r.status == 204
    assert gw.upstream.state.requests == []


async def test_client_headers_pass_except_credentials_and_configured_ones_replace_them(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key()
    status, headers, _ = await post_chat(
        http,
        gw,
        key,
        chat(),
        headers={
            "X-Client-Trace": "trace-42",
            "x-api-key": "client-other-credential",
            "X-Endpoint-Tag": "client-value",
            "x-request-id": "req-proxy-1",
        },
    )
    assert status == 200
    assert headers["x-request-id"] == "req-proxy-1"
    [seen] = upstream_calls(gw)
    assert seen.headers["x-client-trace"] == "trace-42"
    assert "x-api-key" not in seen.headers
    assert seen.headers["x-endpoint-tag"] == "model"  # the configured value wins
    assert seen.headers["authorization"] == f"Bearer {PIPESHIFT_KEY}"


async def test_upstream_errors_are_relayed_as_sent_and_charge_nothing(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key(balance_usd="1.00")
    status, _, body = await post_chat(
        http, gw, key, chat(), headers={"x-mock-error": "503", "x-mock-retry-after": "7"}
    )
    assert status == 503
    assert body["error"]["message"] == "mock upstream: injected 503 error"
    [entry] = await ledger(gw)
    assert (entry.type, entry.cost_usd, entry.outcome) == ("release", "0.00", "upstream_error")
    assert (await gw.accounts.get_account("acme")).balance_usd == "1.00"


async def test_several_endpoints_of_one_provider_account_keep_their_own_headers(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key()
    for name in ("model", "free"):
        async with sdk(gw, key, name) as client:
            await client.chat.completions.create(model=OPEN_MODEL, messages=MESSAGES)
    assert [r.headers["x-endpoint-tag"] for r in upstream_calls(gw)] == ["model", "free"]


async def test_dot_segments_in_the_path_suffix_are_refused(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key()
    url = URL(f"{gw.url}/proxy-api/pipeshift/model/v1/%2e%2e/%2E%2E/admin", encoded=True)
    async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["reason"] == "invalid_request"
    assert upstream_calls(gw) == []


# --- who may call ------------------------------------------------------------------------------


async def test_accounts_allow_list_decides_who_may_use_an_endpoint(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    outsider = await gw.new_key("acme")
    async with sdk(gw, outsider, "vision") as client:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model=OPEN_MODEL, messages=MESSAGES)
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"], error["reason"]) == (
        "permission_error",
        "403",
        "endpoint_not_allowed",
    )
    assert error["message"] == (
        "The account `acme` may not use the custom endpoint `pipeshift/vision`."
    )
    assert upstream_calls(gw) == []
    for account in ("team-red", "partner"):
        member = await gw.new_key(account)
        async with sdk(gw, member, "vision") as client:
            resp = await client.chat.completions.create(model=OPEN_MODEL, messages=MESSAGES)
        assert resp.choices[0].message.content == FULL_TEXT
    assert len(upstream_calls(gw)) == 2


async def test_gateway_key_is_required_and_errors_use_the_openai_envelope(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    status, _, body = await post_chat(http, gw, None, chat())
    assert (status, body["error"]["type"], body["error"]["reason"]) == (
        401,
        "authentication_error",
        "missing_key",
    )
    # The upstream's own key is not a gateway key.
    status, _, body = await post_chat(http, gw, PIPESHIFT_KEY, chat())
    assert (status, body["error"]["reason"]) == (401, "invalid_key")
    key = await gw.new_key()
    async with http.post(
        f"{gw.url}/proxy-api/pipeshift/nope/v1/chat/completions",
        json=chat(),
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert (error["type"], error["reason"]) == ("not_found_error", "endpoint_not_found")
    assert upstream_calls(gw) == []


async def test_a_priced_model_the_key_may_not_use_is_refused(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key(models=["gpt-4o-mini"])
    status, _, body = await post_chat(http, gw, key, chat("gpt-4o"))
    assert (status, body["error"]["reason"]) == (403, "model_not_allowed")
    status, _, _ = await post_chat(http, gw, key, chat("gpt-4o-mini"))
    assert status == 200
    assert len(upstream_calls(gw)) == 1


# --- limits and balance --------------------------------------------------------------------


async def test_per_request_price_is_held_and_charged_for_an_unpriced_model(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key(balance_usd="0.005")
    for _ in range(2):
        status, _, _ = await post_chat(http, gw, key, chat())
        assert status == 200
    await gw.settled()
    # 0.001 left: less than one request's price, so the next one is refused up front.
    status, headers, body = await post_chat(http, gw, key, chat())
    assert status == 402
    assert headers["x-should-retry"] == "false"
    assert body["error"]["message"] == (
        "Insufficient balance: $0.001 available, but a request to the custom endpoint "
        "`pipeshift/model` costs $0.002. Top up the account."
    )
    entries = await ledger(gw)
    assert [e.cost_usd for e in entries] == [PRICE, PRICE]
    assert (await gw.accounts.get_account("acme")).balance_usd == "0.001"
    assert len(upstream_calls(gw)) == 2


async def test_endpoint_without_a_price_charges_nothing_for_an_unpriced_model(
    gw: Gateway,
) -> None:
    key = await gw.new_key(balance_usd="0.00")
    async with sdk(gw, key, "free") as client:
        await client.chat.completions.create(model=OPEN_MODEL, messages=MESSAGES)
    [entry] = await ledger(gw)
    assert (entry.cost_usd, entry.model) == ("0.00", "pipeshift/free")


async def test_key_rate_limits_apply_with_headers_and_a_real_wait(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gw.new_key(rpm=2)
    async with sdk(gw, key) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=OPEN_MODEL, messages=MESSAGES
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        await client.chat.completions.create(model=OPEN_MODEL, messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=OPEN_MODEL, messages=MESSAGES)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["reason"] == "rpm_exceeded"
    wait_ms = int(caught.value.response.headers["retry-after-ms"])
    assert 29_000 < wait_ms <= 30_000  # one request refills in 60 s / 2
    assert len(upstream_calls(gw)) == 2


async def test_opaque_token_estimate_counts_body_size_and_declared_max_tokens(
    gw: Gateway, http: aiohttp.ClientSession
) -> None:
    # tpm 600: a body of ~150 bytes plus max_tokens 500 fits once, not twice.
    key = await gw.new_key(tpm=600)
    body = chat(max_tokens=500)
    status, headers, _ = await post_chat(http, gw, key, body)
    assert status == 200
    estimate = 600 - int(headers["x-ratelimit-remaining-tokens"])
    assert 500 < estimate < 600
    status, _, error = await post_chat(http, gw, key, body)
    assert (status, error["error"]["reason"]) == (429, "tpm_exceeded")
    # Counted at the estimate: settlement does not read an opaque answer's usage.
    [entry] = await ledger(gw)
    assert (entry.input_tokens or 0) + (entry.output_tokens or 0) == estimate


# --- configuration -------------------------------------------------------------------------


def _config_error(endpoints: list[dict[str, Any]], env: dict[str, str] | None = None) -> str:
    config = base_config("http://127.0.0.1:9", "memory://", custom_endpoints=endpoints)
    environ = {"RLGW_TEST_UPSTREAM_KEY": "k", "PIPESHIFT_API_KEY": "p", **(env or {})}
    with pytest.raises(ConfigError) as caught:
        build_settings(config, environ)
    return str(caught.value)


def _ep(**fields: Any) -> dict[str, Any]:
    return {**endpoint(), "base_url": "https://api.pipeshift.com/api", **fields}


@pytest.mark.parametrize(
    ("endpoints", "message"),
    [
        (
            [_ep(), _ep(base_url="https://other")],
            "custom_endpoints[1].name: duplicate custom endpoint 'pipeshift/model'",
        ),
        (
            [_ep(name="my model")],
            "custom_endpoints[0].name: 'my model' must be 1-64 letters, digits, '_', '.' or "
            "'-', starting with a letter or digit",
        ),
        (
            [_ep(provider_account="../x")],
            "custom_endpoints[0].provider_account: '../x' must be 1-64 letters, digits, '_', "
            "'.' or '-', starting with a letter or digit",
        ),
        (
            [_ep(headers={"Authorization": "Bearer ps-literal"})],
            "custom_endpoints[0].headers.Authorization: credentials must be an env reference "
            "like ${NAME}",
        ),
        (
            [_ep(headers={"X-Key": "${NOT_SET}"})],
            "custom_endpoints[0].headers.X-Key: environment variable NOT_SET is not set",
        ),
        (
            [_ep(base_url="ftp://x")],
            "custom_endpoints[0].base_url: must start with one of http://, https://, not 'ftp:…'",
        ),
        ([_ep(rpm=0)], "custom_endpoints[0].rpm: Expected `int` >= 1"),
        (
            [_ep(price_per_request_usd="0.0000000001")],
            "custom_endpoints[0].price_per_request_usd: '0.0000000001' must have at most 9 "
            "decimal places",
        ),
        (
            [_ep(accounts=["acme", " "])],
            "custom_endpoints[0].accounts[1]: must be an account id or a glob like 'team-*'",
        ),
    ],
)
def test_bad_custom_endpoint_config_names_the_field(
    endpoints: list[dict[str, Any]], message: str
) -> None:
    assert _config_error(endpoints) == message


def test_custom_endpoint_config_resolves_secrets_prices_and_defaults() -> None:
    config = base_config(
        "http://127.0.0.1:9",
        "memory://",
        custom_endpoints=[_ep(price_per_request_usd=0.0025, rpm=100), _ep(name="fast")],
    )
    settings = build_settings(config, {"RLGW_TEST_UPSTREAM_KEY": "k", "PIPESHIFT_API_KEY": "p"})
    model = settings.custom_endpoints[("pipeshift", "model")]
    assert model.upstream_headers["Authorization"] == "Bearer p"
    assert (model.price_per_request_nano, model.rpm, model.tpm) == (2_500_000, 100, None)
    fast = settings.custom_endpoints[("pipeshift", "fast")]
    assert (fast.accounts, fast.price_per_request_nano, fast.timeout_s) == (("*",), 0, 600.0)
    assert fast.allows_account("anyone")
