"""The converter routes (docs/converters.md) driven by the official SDKs, unmodified, in all
six directions: an OpenAI, Anthropic or Gemini caller pointed at its converter base URL asks
a model of each of the two other protocols.

test_converter_routes.py checks the same routes at the HTTP level; here the SDKs must parse
every answer, stream and error, and the upstream's request, usage and the ledger's charge are
checked against what the mock upstream received and reported. Tool calls are in
test_converter_e2e_tools.py. Every test takes the ``gateway`` fixture, so it runs on
``memory://`` and on a real Redis.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from ratelimit_gw.money import cost_nano, format_usd, parse_usd

from .conftest import MODELS, Gateway
from .converter_callers import (
    CLAUDE,
    CONVERTER_BASE,
    FULL_TEXT,
    GEMINI,
    GPT,
    MODEL_MAX_OUTPUT,
    PROTOCOL,
    UPSTREAM_PATH,
    AnthropicCaller,
    caller,
    upstream_body,
    upstream_usage,
)
from .test_sdk_e2e import ALL_MODELS, AttemptLog, settled

FIRST = "You are terse."
SECOND = "Answer in English."

DIRECTIONS = [
    pytest.param("openai", CLAUDE, id="openai-to-anthropic"),
    pytest.param("openai", GEMINI, id="openai-to-gemini"),
    pytest.param("anthropic", GPT, id="anthropic-to-openai"),
    pytest.param("anthropic", GEMINI, id="anthropic-to-gemini"),
    pytest.param("gemini", GPT, id="gemini-to-openai"),
    pytest.param("gemini", CLAUDE, id="gemini-to-anthropic"),
]
PRICES = {model: (parse_usd(inp), parse_usd(out)) for model, _, inp, out in MODELS}


def upstream_systems(gw: Gateway, target: str) -> list[str]:
    """The system prompt the upstream got, in the target protocol's place, as its texts."""
    body = upstream_body(gw)
    if target == "anthropic":
        system = body["system"]
        return [system] if isinstance(system, str) else [block["text"] for block in system]
    if target == "gemini":
        return [part["text"] for part in body["systemInstruction"]["parts"]]
    return [m["content"] for m in body["messages"] if m["role"] in ("system", "developer")]


def upstream_cap(gw: Gateway, target: str) -> int | None:
    body = upstream_body(gw)
    if target == "anthropic":
        return body["max_tokens"]
    if target == "gemini":
        return body.get("generationConfig", {}).get("maxOutputTokens")
    return body.get("max_completion_tokens", body.get("max_tokens"))


def assert_reached(gw: Gateway, model: str) -> None:
    """The last upstream request went to the target protocol's own route for the model."""
    path = gw.upstream.state.requests[-1].path
    if PROTOCOL[model] == "gemini":
        assert re.fullmatch(rf"/v1(beta)?/models/{model}:(stream)?[gG]enerateContent", path), path
    else:
        assert path == UPSTREAM_PATH[PROTOCOL[model]], path


async def assert_charged(
    gw: Gateway, model: str, usage: tuple[int, int], cache_read: int = 0, count: int = 1
) -> None:
    """The ledger's newest entry: the upstream's usage (all input tokens, output tokens, cache
    reads among the input) at the TARGET model's prices."""
    entries = await settled(gw, "acme", count)
    assert len(entries) == count
    entry = entries[0]
    assert (entry.type, entry.model) == ("charge", model)
    assert (entry.input_tokens, entry.output_tokens) == usage
    assert (entry.cache_read_tokens or 0) == cache_read
    prices = gw.settings.models[model]
    assert entry.cost_usd == format_usd(
        cost_nano(
            *usage,
            prices.input_nano_usd_per_mtok,
            prices.output_nano_usd_per_mtok,
            cache_read_tokens=cache_read,
            cache_read_per_mtok_nano=prices.cache_read_nano_usd_per_mtok,
        )
    )
    # The prices are the config's (conftest.MODELS), not some other model's.
    assert (prices.input_nano_usd_per_mtok, prices.output_nano_usd_per_mtok) == PRICES[model]


# --- text -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS)
async def test_plain_text_system_prompts_usage_and_charge(
    gateway: Gateway, protocol: str, model: str
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        answer = await sdk.ask(model, systems=[FIRST, SECOND])
    assert_reached(gateway, model)
    assert (answer.text, answer.stop, answer.events) == (FULL_TEXT, sdk.stops.end, 1)
    # Both system prompts reached the upstream in its own place, merged in order.
    assert upstream_systems(gateway, PROTOCOL[model]) == [f"{FIRST}\n\n{SECOND}"]
    usage = upstream_usage(gateway, 20)
    assert (answer.input_tokens, answer.output_tokens) == usage
    await assert_charged(gateway, model, usage)


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS)
async def test_streamed_text_arrives_in_several_events(
    gateway: Gateway, protocol: str, model: str
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        answer = await sdk.ask(model, systems=[FIRST], stream=True)
    assert_reached(gateway, model)
    assert upstream_body(gateway).get("stream", True) is True  # Gemini: the route says it
    assert (answer.text, answer.stop) == (FULL_TEXT, sdk.stops.end)
    assert answer.events >= 4  # the mock's four text pieces at least
    assert upstream_systems(gateway, PROTOCOL[model]) == [FIRST]
    usage = upstream_usage(gateway, 20)
    assert (answer.input_tokens, answer.output_tokens) == usage
    await assert_charged(gateway, model, usage)


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS)
async def test_cached_input_is_shown_in_the_callers_meaning_and_charged_as_reported(
    gateway: Gateway, protocol: str, model: str
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        answer = await sdk.ask(model, systems=[FIRST], headers={"x-mock-cache-read-tokens": "3"})
    total, output = upstream_usage(gateway, 20)
    # OpenAI prompt_tokens and Gemini promptTokenCount include the cached input; Anthropic's
    # input_tokens leaves it out, whatever the upstream's protocol said.
    shown = total - 3 if protocol == "anthropic" else total
    assert (answer.input_tokens, answer.cached, answer.output_tokens) == (shown, 3, output)
    await assert_charged(gateway, model, (total, output), cache_read=3)


# --- output cap -------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_the_callers_cap_arrives_and_a_cut_answer_stops_for_length(
    gateway: Gateway, protocol: str, model: str, stream: bool
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        answer = await sdk.ask(model, max_tokens=7, stream=stream)
    assert upstream_cap(gateway, PROTOCOL[model]) == 7
    assert answer.text == " ".join(f"tok{i}" for i in range(7))
    assert answer.stop == sdk.stops.length
    usage = upstream_usage(gateway, 7)
    assert (answer.input_tokens, answer.output_tokens) == usage
    await assert_charged(gateway, model, usage)


@pytest.mark.parametrize("protocol", ["openai", "gemini"])
async def test_an_anthropic_target_without_a_cap_gets_the_models_max_output(
    gateway: Gateway, protocol: str
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        answer = await sdk.ask(CLAUDE)
    assert upstream_body(gateway)["max_tokens"] == MODEL_MAX_OUTPUT
    assert answer.text == FULL_TEXT


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS)
async def test_a_prepaid_account_is_sent_the_held_cap_and_charged_from_its_balance(
    gateway: Gateway, protocol: str, model: str
) -> None:
    """No cap from an OpenAI or Gemini caller: every target gets the held cap (the model's,
    all affordable here); the balance then drops by exactly the settled charge."""
    key = await gateway.new_key(balance_usd="1.00")
    async with caller(gateway, protocol, key) as sdk:
        answer = await sdk.ask(model)
    # (the Anthropic SDK always sends a cap: AnthropicCaller's default)
    held = AnthropicCaller.default_max_tokens if protocol == "anthropic" else MODEL_MAX_OUTPUT
    assert upstream_cap(gateway, PROTOCOL[model]) == held
    usage = upstream_usage(gateway, 20)
    assert (answer.input_tokens, answer.output_tokens) == usage
    entries = await settled(gateway, "acme", 2)  # the charge and the top-up
    await assert_charged(gateway, model, usage, count=len(entries))
    state = await gateway.accounts.get_account("acme")
    cost = parse_usd(entries[0].cost_usd or "0")
    assert (state.balance_usd, state.spent_usd) == (
        format_usd(1_000_000_000 - cost),
        format_usd(cost),
    )


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS)
async def test_the_gateways_429_comes_in_the_callers_envelope(
    gateway: Gateway, protocol: str, model: str
) -> None:
    key = await gateway.new_key(rpm=1)
    async with caller(gateway, protocol, key) as sdk:
        await sdk.ask(model)
        err = await sdk.error(model)
    assert err.status == 429
    assert err.reason == "rpm_exceeded"
    assert "1 request per minute" in err.message
    assert isinstance(
        err.exception,
        {"openai": openai.RateLimitError, "anthropic": anthropic.RateLimitError}.get(
            protocol, Exception
        ),
    )
    assert err.type == {"gemini": "RESOURCE_EXHAUSTED"}.get(protocol, "rate_limit_error")
    assert len(gateway.upstream.state.requests) == 1


# The caller's type (OpenAI, Anthropic) or google.rpc status (Gemini) of each upstream status.
UPSTREAM_ERROR_TYPE = {
    503: {"openai": "api_error", "anthropic": "api_error", "gemini": "UNAVAILABLE"},
    # 422 is in no table of the gateway's own errors: still a client error, never api_error.
    422: {
        "openai": "invalid_request_error",
        "anthropic": "invalid_request_error",
        "gemini": "INVALID_ARGUMENT",
    },
}


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS)
@pytest.mark.parametrize("status", [503, 422])
async def test_an_upstream_error_is_translated_with_its_status(
    gateway: Gateway, protocol: str, model: str, status: int
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        err = await sdk.error(model, headers={"x-mock-error": str(status)})
        streamed = await sdk.error(model, stream=True, headers={"x-mock-error": str(status)})
    for e in (err, streamed):
        assert (e.status, e.type) == (status, UPSTREAM_ERROR_TYPE[status][protocol])
        assert e.reason == "upstream_error"
        assert f"mock upstream: injected {status} error" in e.message
    assert_reached(gateway, model)
    entries = await settled(gateway, "acme", 2)
    assert [(e.type, e.cost_usd) for e in entries] == [("release", "0.00")] * 2


@pytest.mark.parametrize("protocol", ["openai", "anthropic", "gemini"])
async def test_a_bad_key_is_a_401_in_the_callers_envelope(gateway: Gateway, protocol: str) -> None:
    model = {"openai": CLAUDE, "anthropic": GEMINI, "gemini": GPT}[protocol]
    async with caller(gateway, protocol, "rlgw-not-a-real-key-0123456789") as sdk:
        err = await sdk.error(model)
    assert err.status == 401
    assert err.type == {"gemini": "UNAUTHENTICATED"}.get(protocol, "authentication_error")
    assert isinstance(
        err.exception,
        {"openai": openai.AuthenticationError, "anthropic": anthropic.AuthenticationError}.get(
            protocol, Exception
        ),
    )
    assert gateway.upstream.state.requests == []


# --- own-protocol models, routes and model lists ----------------------------------------------


def request_bytes_trace() -> tuple[aiohttp.TraceConfig, list[bytes]]:
    """An aiohttp trace that keeps every request body chunk google-genai sends."""
    sent: list[bytes] = []
    trace = aiohttp.TraceConfig()

    async def on_chunk(_s: Any, _c: Any, params: aiohttp.TraceRequestChunkSentParams) -> None:
        sent.append(params.chunk)

    trace.on_request_chunk_sent.append(on_chunk)
    return trace, sent


@pytest.mark.parametrize(
    ("protocol", "model", "path"),
    [
        ("openai", GPT, "/v1/chat/completions"),
        ("anthropic", CLAUDE, "/v1/messages"),
        ("gemini", GEMINI, f"/models/{GEMINI}:generateContent"),
    ],
)
async def test_the_callers_own_protocol_is_relayed_natively(
    gateway: Gateway, protocol: str, model: str, path: str
) -> None:
    key = await gateway.new_key()
    log = AttemptLog()
    trace, chunks = request_bytes_trace()
    async with caller(gateway, protocol, key, log=log, trace_configs=[trace]) as sdk:
        answer = await sdk.ask(model, systems=[FIRST], max_tokens=30, temperature=0.5)
    sent = b"".join(chunks) if protocol == "gemini" else log.attempts[-1].body
    recorded = gateway.upstream.state.requests[-1]
    assert recorded.path.endswith(path)
    assert recorded.body == sent  # the SDK's bytes, unchanged
    assert answer.text == FULL_TEXT
    await assert_charged(gateway, model, upstream_usage(gateway, 20))


async def test_responses_is_a_404_naming_chat_completions(gateway: Gateway) -> None:
    key = await gateway.new_key()
    async with caller(gateway, "openai", key) as sdk:
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.client.responses.create(model=CLAUDE, input="hi")
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["reason"] == "route_not_found"
    assert "/openai/v1/chat/completions" in body["message"]
    assert gateway.upstream.state.requests == []


async def listed(gw: Gateway, protocol: str, key: str) -> list[str]:
    """The model ids the SDK's own ``models.list()`` returns, each checked for its shape."""
    async with caller(gw, protocol, key) as sdk:
        if protocol == "gemini":
            models = [m async for m in await sdk.client.models.list()]
            assert all(m.output_token_limit == MODEL_MAX_OUTPUT for m in models)
            return [m.name.removeprefix("models/") for m in models]
        models = [m async for m in sdk.client.models.list()]
        kind = "object" if protocol == "openai" else "type"
        assert all(getattr(m, kind) == "model" for m in models)
        return [m.id for m in models]


@pytest.mark.parametrize("protocol", ["openai", "anthropic", "gemini"])
async def test_the_model_list_shows_every_model_the_key_may_use(
    gateway: Gateway, protocol: str
) -> None:
    everything = await gateway.new_key()
    restricted = await gateway.new_key(create_account=False, models=["claude-*", GPT])
    assert sorted(await listed(gateway, protocol, everything)) == sorted(ALL_MODELS)
    assert sorted(await listed(gateway, protocol, restricted)) == [CLAUDE, GPT]
    assert gateway.upstream.state.requests == []  # the gateway's own catalogue


# --- fields the target lacks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "model", "extra", "name"),
    [
        pytest.param("openai", GEMINI, {"user": "u1"}, "user", id="openai-user-to-gemini"),
        pytest.param("anthropic", GPT, {"top_k": 5}, "top_k", id="anthropic-top_k-to-openai"),
        pytest.param(
            "gemini",
            CLAUDE,
            {"seed": 7, "presence_penalty": 0.5},
            "generationConfig.seed",
            id="gemini-seed-to-anthropic",
        ),
    ],
)
async def test_a_dropped_tuning_field_is_named_in_x_rlgw_dropped_params(
    gateway: Gateway, protocol: str, model: str, extra: dict[str, Any], name: str
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        answer = await sdk.ask(model, **extra)
        streamed = await sdk.ask(model, stream=True, **extra)
    for a in (answer, streamed):
        assert a.text == FULL_TEXT
        headers = {k.lower(): v for k, v in a.headers.items()}
        dropped = {n.strip() for n in headers["x-rlgw-dropped-params"].split(",")}
        assert name in dropped, dropped


@pytest.mark.parametrize(
    ("protocol", "model", "extra", "name"),
    [
        pytest.param("openai", CLAUDE, {"n": 2}, "n", id="openai-n-to-anthropic"),
        pytest.param("openai", GEMINI, {"n": 2}, "n", id="openai-n-to-gemini"),
        pytest.param(
            "gemini", GPT, {"candidate_count": 2}, "candidateCount", id="gemini-count-to-openai"
        ),
        pytest.param(
            "gemini",
            CLAUDE,
            {"candidate_count": 2},
            "candidateCount",
            id="gemini-count-to-anthropic",
        ),
    ],
)
async def test_a_refused_field_is_a_400_naming_it(
    gateway: Gateway, protocol: str, model: str, extra: dict[str, Any], name: str
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        err = await sdk.error(model, **extra)
    assert err.status == 400
    assert name in err.message
    if protocol == "openai":
        assert isinstance(err.exception, openai.BadRequestError)
        assert err.param == name
    assert gateway.upstream.state.requests == []


# --- issue 19: the native route's protocol_mismatch names the converter route -------------------


NATIVE_BASE = {"openai": "/v1", "anthropic": "", "gemini": ""}


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS[::2])  # each caller once
async def test_protocol_mismatch_names_a_converter_route_that_then_serves_the_call(
    gateway: Gateway, protocol: str, model: str
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key, base_path=NATIVE_BASE[protocol]) as native:
        err = await native.error(model, systems=[FIRST])
    assert (err.status, err.reason) == (400, "protocol_mismatch")
    named = re.findall(r"/(?:openai|anthropic|gemini)/[\w./:{}-]*\w", err.message)
    base = CONVERTER_BASE[protocol]
    assert any(route.startswith(base) for route in named), err.message
    assert gateway.upstream.state.requests == []
    # The very call the user made, pointed at the named base URL, works.
    async with caller(gateway, protocol, key, base_path=base) as converted:
        answer = await converted.ask(model, systems=[FIRST])
    assert answer.text == FULL_TEXT
    assert_reached(gateway, model)
