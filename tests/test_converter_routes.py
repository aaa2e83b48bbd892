"""The converter routes at the HTTP level (docs/converters.md): each direction's plain and
streamed answer in the caller's shape, the translated request the upstream got, settlement
from the upstream's usage, errors in the caller's envelope, and the routes around them.

The official SDKs drive the same routes in test_converter_e2e.py.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from .conftest import Gateway
from .http_helpers import auth, call
from .test_sdk_e2e import settled

CLAUDE, GEMINI, GPT = "claude-sonnet-4-6", "gemini-2.5-flash", "gpt-4o-mini"
FULL_TEXT = " ".join(f"tok{i}" for i in range(20))


def openai_body(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Say something."},
        ],
        **extra,
    }


def anthropic_body(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 100,
        "system": "Be terse.",
        "messages": [{"role": "user", "content": "Say something."}],
        **extra,
    }


GEMINI_BODY: dict[str, Any] = {
    "systemInstruction": {"parts": [{"text": "Be terse."}]},
    "contents": [{"role": "user", "parts": [{"text": "Say something."}]}],
}


def sse_data(body: bytes) -> list[Any]:
    """The JSON payloads of an SSE body (``[DONE]`` left out)."""
    events = []
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_openai_caller_reaches_an_anthropic_model_plain(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    reply = await call(
        http, gateway, "/openai/v1/chat/completions", openai_body(CLAUDE), auth("openai", key)
    )
    assert reply.status == 200, reply.body
    answer = reply.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == FULL_TEXT
    assert answer["choices"][0]["finish_reason"] == "stop"
    sent = gateway.upstream.state.requests[-1]
    assert sent.path == "/v1/messages"
    upstream_body = sent.json()
    assert upstream_body["system"] == "Be terse."
    assert upstream_body["max_tokens"] == 1000  # the model's cap: the caller gave none
    assert upstream_body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Say something."}]}
    ]
    assert sent.headers.get("anthropic-version") == "2023-06-01"
    usage = answer["usage"]
    [entry] = await settled(gateway, "acme", 1)
    assert (entry.input_tokens, entry.output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


async def test_openai_caller_streams_from_a_gemini_model_with_the_usage_chunk(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    body = openai_body(GEMINI, stream=True, stream_options={"include_usage": True})
    reply = await call(http, gateway, "/openai/v1/chat/completions", body, auth("openai", key))
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert reply.body.endswith(b"data: [DONE]\n\n")
    chunks = sse_data(reply.body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == FULL_TEXT
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    sent = gateway.upstream.state.requests[-1]
    assert sent.path.endswith(f"/models/{GEMINI}:streamGenerateContent")
    assert sent.query_string == "alt=sse"


async def test_anthropic_caller_streams_from_an_openai_model(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    body = anthropic_body(GPT, stream=True)
    reply = await call(http, gateway, "/anthropic/v1/messages", body, auth("anthropic", key))
    assert reply.status == 200, reply.body
    names = [line[7:] for line in reply.body.decode().splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "message_delta" in names
    events = sse_data(reply.body)
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert text == FULL_TEXT
    [delta] = [e for e in events if e["type"] == "message_delta"]
    assert delta["usage"]["output_tokens"] == 20
    upstream_body = gateway.upstream.state.requests[-1].json()
    assert upstream_body["messages"][0] == {"role": "system", "content": "Be terse."}
    assert upstream_body["max_completion_tokens"] == 100


async def test_gemini_caller_reaches_an_anthropic_model_plain_and_json_array_stream(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    path = f"/gemini/v1beta/models/{CLAUDE}:generateContent"
    reply = await call(http, gateway, path, GEMINI_BODY, auth("gemini", key))
    assert reply.status == 200, reply.body
    answer = reply.json()
    assert answer["candidates"][0]["content"]["parts"][0]["text"] == FULL_TEXT
    assert answer["candidates"][0]["finishReason"] == "STOP"
    assert answer["usageMetadata"]["candidatesTokenCount"] == 20
    stream_path = f"/gemini/v1/models/{CLAUDE}:streamGenerateContent"
    reply = await call(http, gateway, stream_path, GEMINI_BODY, auth("gemini", key))
    assert reply.status == 200, reply.body
    chunks = reply.json()  # no ?alt=sse: one JSON array
    assert (
        "".join(p.get("text", "") for c in chunks for p in c["candidates"][0]["content"]["parts"])
        == FULL_TEXT
    )


async def test_a_model_of_the_callers_own_protocol_is_relayed_natively(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    reply = await call(
        http, gateway, "/openai/v1/chat/completions", openai_body(GPT), auth("openai", key)
    )
    assert reply.status == 200, reply.body
    sent = gateway.upstream.state.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json() == openai_body(GPT)  # the caller's body, unchanged
    path = f"/gemini/v1beta/models/{GEMINI}:generateContent"
    reply = await call(http, gateway, path, GEMINI_BODY, auth("gemini", key))
    assert reply.status == 200, reply.body
    assert gateway.upstream.state.requests[-1].path == f"/v1beta/models/{GEMINI}:generateContent"


async def test_responses_on_the_converter_route_is_a_typed_404_naming_chat(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    reply = await call(
        http, gateway, "/openai/v1/responses", {"model": CLAUDE, "input": "hi"}, auth("openai", key)
    )
    assert reply.status == 404
    assert reply.error()["reason"] == "route_not_found"
    assert "/openai/v1/chat/completions" in reply.error()["message"]


async def test_protocol_mismatch_names_a_converter_route_that_serves_the_same_body(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    refused = await call(
        http, gateway, "/v1/chat/completions", openai_body(CLAUDE), auth("openai", key)
    )
    assert refused.status == 400 and refused.error()["reason"] == "protocol_mismatch"
    route = "/openai/v1/chat/completions"
    assert route in refused.error()["message"]
    served = await call(http, gateway, route, openai_body(CLAUDE), auth("openai", key))
    assert served.status == 200, served.body


async def test_an_upstream_error_comes_in_the_callers_envelope_with_its_status(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    headers = {**auth("anthropic", key), "x-mock-error": "503"}
    reply = await call(http, gateway, "/anthropic/v1/messages", anthropic_body(GPT), headers)
    assert reply.status == 503, reply.body
    document = reply.json()
    assert document["type"] == "error"  # Anthropic's envelope, from an OpenAI upstream
    assert document["error"]["type"] == "api_error"


async def test_dropped_and_refused_fields(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gateway.new_key()
    route = "/openai/v1/chat/completions"
    reply = await call(
        http, gateway, route, openai_body(CLAUDE, user="u1", seed=7), auth("openai", key)
    )
    assert reply.status == 200, reply.body
    dropped = {name.strip() for name in reply.headers["x-rlgw-dropped-params"].split(",")}
    assert {"user", "seed"} <= dropped
    refused = await call(http, gateway, route, openai_body(CLAUDE, n=2), auth("openai", key))
    assert refused.status == 400
    assert refused.error()["param"] == "n"


@pytest.mark.parametrize(
    ("path", "protocol"),
    [
        ("/openai/v1/models", "openai"),
        ("/anthropic/v1/models", "anthropic"),
        ("/gemini/v1beta/models", "gemini"),
    ],
)
async def test_model_lists_show_every_model_in_the_callers_shape(
    gateway: Gateway, http: aiohttp.ClientSession, path: str, protocol: str
) -> None:
    key = await gateway.new_key()
    reply = await call(http, gateway, path, None, auth(protocol, key), method="GET")
    assert reply.status == 200, reply.body
    document = reply.json()
    if protocol == "gemini":
        names = [m["name"] for m in document["models"]]
        assert f"models/{CLAUDE}" in names and f"models/{GPT}" in names
    else:
        ids = [m["id"] for m in document["data"]]
        assert {CLAUDE, GEMINI, GPT} <= set(ids)
