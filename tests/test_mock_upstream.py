"""The mock upstream, driven over a real socket by the official OpenAI, Anthropic and Gemini SDKs.

Expected usage numbers are written out by hand from the documented formula (input tokens =
max(1, ceil(prompt chars / 4)); output = chunks * tokens_per_chunk words, cut at the cap) so a
change in either the formula or the wire shapes fails here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from ratelimit_gw.testing.mock_upstream import (
    MOCK_STATE,
    MockSettings,
    MockState,
    start_mock_upstream,
)

# 14 + 21 = 35 prompt chars -> ceil(35 / 4) = 9 input tokens, in every protocol.
SYSTEM = "You are terse."
USER = "Say something please."
PROMPT_TOKENS = 9
FULL_TEXT = " ".join(f"tok{i}" for i in range(20))  # default 4 chunks x 5 tokens
PIECES = ["tok0 tok1 tok2 tok3 tok4", " tok5 tok6 tok7 tok8 tok9"]


@dataclass
class Mock:
    url: str
    state: MockState


@pytest.fixture
async def mock() -> AsyncIterator[Mock]:
    runner, url = await start_mock_upstream("127.0.0.1", 0, MockSettings())
    try:
        yield Mock(url, runner.app[MOCK_STATE])
    finally:
        await runner.cleanup()


@pytest.fixture
async def oai(mock: Mock) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{mock.url}/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
async def claude(mock: Mock) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=mock.url, api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
async def gemini(mock: Mock) -> AsyncIterator[genai.client.AsyncClient]:
    # Hand google-genai our own aiohttp session: the one it builds itself subclasses
    # ClientSession, which aiohttp flags with a DeprecationWarning (an error under pytest here).
    async with aiohttp.ClientSession() as session:
        options = genai_types.HttpOptions(base_url=mock.url, aiohttp_client=session)
        client = genai.Client(api_key="x", http_options=options)
        try:
            yield client.aio
        finally:
            await client.aio.aclose()
            client.close()


CHAT_MESSAGES: Any = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
CLAUDE_MESSAGES: Any = [{"role": "user", "content": USER}]
GEMINI_CONFIG = genai_types.GenerateContentConfig(system_instruction=SYSTEM)


# --- OpenAI chat completions ------------------------------------------------------------------


async def test_chat_plain_usage_and_text(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(model="gpt-4o-mini", messages=CHAT_MESSAGES)
    assert resp.choices[0].message.content == FULL_TEXT
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == "gpt-4o-mini"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (PROMPT_TOKENS, 20)
    assert resp.usage.total_tokens == PROMPT_TOKENS + 20


async def test_chat_stream_include_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=CHAT_MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    *body, last = chunks
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    deltas = [c.choices[0].delta.content for c in body if c.choices[0].delta.content]
    assert deltas[:2] == PIECES and len(deltas) == 4
    assert "".join(deltas) == FULL_TEXT
    assert body[-1].choices[0].finish_reason == "stop"
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT_TOKENS, 20)
    assert last.usage.total_tokens == PROMPT_TOKENS + 20


async def test_chat_stream_without_include_usage_has_no_usage_chunk(
    oai: openai.AsyncOpenAI,
) -> None:
    stream = await oai.chat.completions.create(model="m", messages=CHAT_MESSAGES, stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert len(chunks) == 1 + 4 + 1  # role chunk, 4 text chunks, finish chunk


async def test_chat_cap_stops_early(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(model="m", messages=CHAT_MESSAGES, max_tokens=7)
    assert resp.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 7

    stream = await oai.chat.completions.create(
        model="m",
        messages=CHAT_MESSAGES,
        max_completion_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    deltas = [c.choices[0].delta.content for c in chunks[:-1] if c.choices[0].delta.content]
    assert deltas == [*PIECES, " tok10 tok11"]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


async def test_chat_ignore_cap_and_chunk_override(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(
        model="m",
        messages=CHAT_MESSAGES,
        max_tokens=7,
        extra_headers={"x-mock-ignore-cap": "1", "x-mock-chunks": "2"},
    )
    assert resp.choices[0].message.content == "".join(PIECES)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 10


# --- OpenAI responses -------------------------------------------------------------------------


async def test_responses_plain(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.responses.create(model="gpt-4o-mini", instructions=SYSTEM, input=USER)
    assert resp.status == "completed"
    assert resp.output_text == FULL_TEXT
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (PROMPT_TOKENS, 20)
    assert resp.usage.total_tokens == PROMPT_TOKENS + 20
    assert resp.usage.input_tokens_details.cached_tokens == 0


async def test_responses_stream_events_and_final_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(
        model="m", input=[{"role": "user", "content": SYSTEM + USER}], stream=True
    )
    events = [e async for e in stream]
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.usage is not None
    assert (final.response.usage.input_tokens, final.response.usage.output_tokens) == (9, 20)
    assert final.response.output_text == FULL_TEXT


async def test_responses_stream_helper(oai: openai.AsyncOpenAI) -> None:
    # The SDK's accumulating helper rebuilds the response from the deltas, so it checks
    # that item ids, indexes and parts line up across events.
    async with oai.responses.stream(model="m", input=USER) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert deltas[:2] == PIECES
    assert final.output_text == FULL_TEXT
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (6, 20)  # 21 chars


async def test_responses_cap_is_incomplete(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.responses.create(model="m", input=USER, max_output_tokens=3)
    assert resp.status == "incomplete"
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == "tok0 tok1 tok2"

    # As on the real API, a truncated stream ends with response.incomplete (the SDK's
    # responses.stream() helper only accepts response.completed, so read raw events).
    stream = await oai.responses.create(model="m", input=USER, max_output_tokens=3, stream=True)
    events = [e async for e in stream]
    final = events[-1]
    assert final.type == "response.incomplete"
    assert final.response.usage is not None
    assert (final.response.usage.input_tokens, final.response.usage.output_tokens) == (6, 3)


# --- Anthropic messages -----------------------------------------------------------------------


async def test_anthropic_plain(claude: anthropic.AsyncAnthropic) -> None:
    msg = await claude.messages.create(
        model="claude-sonnet-4-6", system=SYSTEM, messages=CLAUDE_MESSAGES, max_tokens=100
    )
    assert msg.content[0].type == "text" and msg.content[0].text == FULL_TEXT
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_TOKENS, 20)


async def test_anthropic_stream_final_message(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="c",
        system=[{"type": "text", "text": SYSTEM}],
        messages=CLAUDE_MESSAGES,
        max_tokens=100,
    ) as stream:
        texts = [t async for t in stream.text_stream]
        msg = await stream.get_final_message()
    assert texts[:2] == PIECES and len(texts) == 4
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_TOKENS, 20)
    assert msg.stop_reason == "end_turn"


async def test_anthropic_stream_raw_events_and_cap(claude: anthropic.AsyncAnthropic) -> None:
    stream = await claude.messages.create(
        model="c", messages=CLAUDE_MESSAGES, max_tokens=8, stream=True
    )
    events = [e async for e in stream]  # the SDK drops the ping
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    assert (start.message.usage.input_tokens, start.message.usage.output_tokens) == (6, 1)
    assert delta.usage.output_tokens == 8
    assert delta.delta.stop_reason == "max_tokens"


# --- Gemini -----------------------------------------------------------------------------------


async def test_gemini_generate_content(gemini: genai.client.AsyncClient) -> None:
    resp = await gemini.models.generate_content(
        model="gemini-2.5-flash", contents=USER, config=GEMINI_CONFIG
    )
    assert resp.text == FULL_TEXT
    assert resp.candidates and resp.candidates[0].finish_reason == genai_types.FinishReason.STOP
    usage = resp.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count) == (PROMPT_TOKENS, 20)
    assert usage.total_token_count == PROMPT_TOKENS + 20


async def test_gemini_stream_running_totals(mock: Mock, gemini: genai.client.AsyncClient) -> None:
    stream = await gemini.models.generate_content_stream(
        model="gemini-2.5-flash", contents=USER, config=GEMINI_CONFIG
    )
    chunks = [c async for c in stream]
    assert [c.text for c in chunks][:2] == PIECES and len(chunks) == 4
    running = [c.usage_metadata.candidates_token_count for c in chunks if c.usage_metadata]
    assert running == [5, 10, 15, 20]
    last = chunks[-1].usage_metadata
    assert last is not None and last.total_token_count == PROMPT_TOKENS + 20
    # google-genai picks /v1 or /v1beta by version; both prefixes are served.
    path = mock.state.requests[-1].path
    assert path.endswith("/models/gemini-2.5-flash:streamGenerateContent")
    assert mock.state.requests[-1].query_string == "alt=sse"


async def test_gemini_cap(gemini: genai.client.AsyncClient) -> None:
    config = genai_types.GenerateContentConfig(system_instruction=SYSTEM, max_output_tokens=6)
    resp = await gemini.models.generate_content(model="g", contents=USER, config=config)
    assert resp.text == "tok0 tok1 tok2 tok3 tok4 tok5"
    assert resp.candidates
    assert resp.candidates[0].finish_reason == genai_types.FinishReason.MAX_TOKENS
    assert resp.usage_metadata is not None
    assert resp.usage_metadata.candidates_token_count == 6


async def test_gemini_json_array_stream_under_v1(mock: Mock) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "abcdefghi"}]}]}  # 9 chars -> 3
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{mock.url}/v1/models/g:streamGenerateContent", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "application/json"
        chunks = await resp.json()
    assert len(chunks) == 4
    assert chunks[-1]["usageMetadata"] == {
        "promptTokenCount": 3,
        "candidatesTokenCount": 20,
        "totalTokenCount": 23,
    }
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"


# --- Errors -----------------------------------------------------------------------------------


async def test_injected_errors_use_each_protocol_shape(
    oai: openai.AsyncOpenAI,
    claude: anthropic.AsyncAnthropic,
    gemini: genai.client.AsyncClient,
) -> None:
    with pytest.raises(openai.RateLimitError) as oai_err:
        await oai.chat.completions.create(
            model="m", messages=CHAT_MESSAGES, extra_headers={"x-mock-error": "429"}
        )
    assert oai_err.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError):
        await oai.responses.create(model="m", input=USER, extra_headers={"x-mock-error": "503"})

    with pytest.raises(anthropic.OverloadedError) as claude_err:
        await claude.messages.create(
            model="c",
            messages=CLAUDE_MESSAGES,
            max_tokens=5,
            extra_headers={"x-mock-error": "529"},
        )
    assert isinstance(claude_err.value.body, dict)
    assert claude_err.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.PaymentRequiredError):
        await claude.messages.create(
            model="c",
            messages=CLAUDE_MESSAGES,
            max_tokens=5,
            extra_headers={"x-mock-error": "402"},
        )

    headers = {"x-mock-error": "429"}
    with pytest.raises(genai_errors.ClientError) as gem_err:
        await gemini.models.generate_content(
            model="g", contents=USER, config={"http_options": {"headers": headers}}
        )
    assert (gem_err.value.code, gem_err.value.status) == (429, "RESOURCE_EXHAUSTED")
    with pytest.raises(genai_errors.ServerError) as gem_server_err:
        await gemini.models.generate_content(
            model="g", contents=USER, config={"http_options": {"headers": {"x-mock-error": "503"}}}
        )
    assert gem_server_err.value.status == "UNAVAILABLE"


async def test_retry_after_and_bad_override_header(mock: Mock) -> None:
    async with aiohttp.ClientSession() as session:
        headers = {"x-mock-error": "429", "x-mock-retry-after": "3"}
        async with session.post(f"{mock.url}/v1/messages", json={}, headers=headers) as resp:
            assert resp.status == 429 and resp.headers["retry-after"] == "3"
            assert (await resp.json())["error"]["type"] == "rate_limit_error"
        headers = {"x-mock-chunks": "many"}
        async with session.post(f"{mock.url}/v1/responses", json={}, headers=headers) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["message"] == "x-mock-chunks must be an integer"


async def test_mid_stream_reset(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="m",
        messages=CHAT_MESSAGES,
        stream=True,
        extra_headers={"x-mock-error-after-chunks": "2"},
    )
    received: list[str] = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert received == PIECES


# --- Timing, model lists, request log ---------------------------------------------------------


async def test_latency_and_chunk_delay_headers(oai: openai.AsyncOpenAI) -> None:
    start_s = time.perf_counter()
    await oai.chat.completions.create(
        model="m", messages=CHAT_MESSAGES, extra_headers={"x-mock-latency-ms": "150"}
    )
    assert time.perf_counter() - start_s >= 0.15

    start_s = time.perf_counter()
    stream = await oai.chat.completions.create(
        model="m",
        messages=CHAT_MESSAGES,
        stream=True,
        extra_headers={"x-mock-chunk-delay-ms": "40"},
    )
    _ = [c async for c in stream]
    assert time.perf_counter() - start_s >= 3 * 0.04  # delays sit between the 4 chunks


async def test_model_lists(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, gemini: genai.client.AsyncClient
) -> None:
    expected = ["gpt-4o-mini", "claude-sonnet-4-6", "gemini-2.5-flash"]
    assert [m.id async for m in oai.models.list()] == expected
    assert [m.id async for m in claude.models.list()] == expected
    assert [m.name async for m in await gemini.models.list()] == [f"models/{m}" for m in expected]


async def test_request_log_http_and_python_api(mock: Mock, oai: openai.AsyncOpenAI) -> None:
    await oai.chat.completions.create(model="m", messages=CHAT_MESSAGES)
    [logged] = mock.state.requests
    assert (logged.method, logged.path) == ("POST", "/v1/chat/completions")
    assert logged.headers["authorization"] == "Bearer x"
    assert logged.json()["messages"] == CHAT_MESSAGES

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{mock.url}/mock/requests") as resp:
            [entry] = await resp.json()
        assert entry["path"] == "/v1/chat/completions"
        assert '"Say something please."' in entry["body"]
        async with session.delete(f"{mock.url}/mock/requests") as resp:
            assert resp.status == 204
        async with session.get(f"{mock.url}/mock/requests") as resp:
            assert await resp.json() == []
        async with session.get(f"{mock.url}/mock/stats") as resp:
            assert await resp.json() == {"requests": 1}  # introspection is not counted
    assert mock.state.requests == []


async def test_request_log_is_bounded() -> None:
    runner, url = await start_mock_upstream(settings=MockSettings(request_log_size=3))
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(5):
                async with session.post(f"{url}/v1/responses?n={i}", json={"input": "x"}) as r:
                    assert r.status == 200
        state = runner.app[MOCK_STATE]
        assert [r.query_string for r in state.requests] == ["n=2", "n=3", "n=4"]
        assert state.total_requests == 5
    finally:
        await runner.cleanup()


def test_create_mock_app_is_an_aiohttp_app() -> None:
    from ratelimit_gw.testing.mock_upstream import create_mock_app

    app = create_mock_app(MockSettings(chunks=2))
    assert isinstance(app, web.Application)
    assert app[MOCK_STATE].settings.chunks == 2
    with pytest.raises(ValueError):
        MockSettings(tokens_per_chunk=0)
