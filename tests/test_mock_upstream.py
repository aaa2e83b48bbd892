"""The mock upstream, driven over a real socket by the official OpenAI, Anthropic and Gemini SDKs.

Expected usage numbers are written out by hand from the documented formula (input tokens =
max(1, ceil(prompt chars / 4)); output = chunks * tokens_per_chunk words, cut at the cap, or
ceil(len(arguments JSON) / 4) per tool call) so a change in either the formula or the wire
shapes fails here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import openai
import pydantic
import pytest
from aiohttp import web
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ratelimit_gw.testing.mock_keys import KeyBehaviour, credential_of
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


async def test_a_client_hanging_up_mid_stream_logs_no_error(
    mock: Mock, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway closes its upstream connection when its caller leaves: routine for a
    provider, so the mock's log (the demo's terminal) shows no traceback for it."""
    caplog.set_level(logging.DEBUG)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": USER}]}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"{mock.url}/v1/chat/completions",
            json=body,
            headers={"x-mock-chunk-delay-ms": "100"},  # 4 chunks: the stream lasts 300 ms
        )
        assert PIECES[0] in (await resp.content.readany()).decode()
        resp.close()  # drops the connection: the mock's next write fails
    await asyncio.sleep(0.5)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert mock.state.total_requests == 1


# --- Tool calls -------------------------------------------------------------------------------

# A request that declares tools is answered with calls (mock_tools): one value per schema
# property, each call costing ceil(len(compact arguments JSON) / 4) output tokens. Every raw
# body and frame is also validated with the SDK's own types, which the clients do not do.
WEATHER_SCHEMA: Any = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "metric": {"type": "boolean"},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city"],
}
SEARCH_SCHEMA: Any = {
    "type": "object",
    "properties": {
        "query": {"type": "string"},
        "limit": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "filters": {"type": "object"},
    },
}
WEATHER_ARGS = {"city": "city-value", "days": 1, "metric": True, "unit": "c"}
SEARCH_ARGS = {"query": "query-value", "limit": 1.5, "tags": [], "filters": {}}
WEATHER_TOKENS = 14  # {"city":"city-value","days":1,"metric":true,"unit":"c"}: 55 chars
SEARCH_TOKENS = 15  # {"query":"query-value","limit":1.5,"tags":[],"filters":{}}: 58 chars
# x-mock-tool-calls: 3 cycles through the declared tools.
PARALLEL_3 = [("get_weather", WEATHER_ARGS), ("search", SEARCH_ARGS), ("get_weather", WEATHER_ARGS)]
TOOL_RESULT = "sunny"  # counted as prompt text where it sits under "content" (OpenAI, Anthropic)
CALL_ID = re.compile(r"call_[0-9a-f]{24}")
TOOLU_ID = re.compile(r"toolu_[0-9a-f]{24}")

OAI_TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "search", "parameters": SEARCH_SCHEMA}},
]
CLAUDE_TOOLS: Any = [
    {"name": "get_weather", "description": "Weather by city.", "input_schema": WEATHER_SCHEMA},
    {"name": "search", "input_schema": SEARCH_SCHEMA},
]
_STR, _INT, _BOOL = genai_types.Type.STRING, genai_types.Type.INTEGER, genai_types.Type.BOOLEAN
# get_weather as a types.Schema, which google-genai sends with Gemini's upper-case type names;
# search as plain JSON Schema (parametersJsonSchema).
GEMINI_TOOLS = [
    genai_types.Tool(
        function_declarations=[
            genai_types.FunctionDeclaration(
                name="get_weather",
                parameters=genai_types.Schema(
                    type=genai_types.Type.OBJECT,
                    properties={
                        "city": genai_types.Schema(type=_STR),
                        "days": genai_types.Schema(type=_INT),
                        "metric": genai_types.Schema(type=_BOOL),
                        "unit": genai_types.Schema(type=_STR, enum=["c", "f"]),
                    },
                ),
            ),
            genai_types.FunctionDeclaration(name="search", parameters_json_schema=SEARCH_SCHEMA),
        ]
    )
]


def tool_headers(n: int) -> dict[str, str]:
    return {"x-mock-tool-calls": str(n)}


async def sse_data(url: str, body: Any, headers: dict[str, str] | None = None) -> list[Any]:
    """Each SSE frame's data as sent, decoded (a ``[DONE]`` kept as the string)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as r,
    ):
        assert r.status == 200
        text = await r.text()
    data = [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def oai_calls(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


async def test_chat_tool_call_plain(oai: openai.AsyncOpenAI) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=CHAT_MESSAGES, tools=OAI_TOOLS
    )
    resp = ChatCompletion.model_validate(raw.http_response.json())
    [choice] = resp.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and CALL_ID.fullmatch(call.id)
    assert oai_calls(choice.message) == [("get_weather", WEATHER_ARGS)]
    usage = resp.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, WEATHER_TOKENS)


async def test_chat_parallel_tool_calls_stream(mock: Mock, oai: openai.AsyncOpenAI) -> None:
    body = {
        "model": "m",
        "messages": CHAT_MESSAGES,
        "tools": OAI_TOOLS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    frames = await sse_data(f"{mock.url}/v1/chat/completions", body, tool_headers(3))
    assert frames[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(f) for f in frames[:-1]]
    *body_chunks, finish, usage_chunk = chunks
    assert body_chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.tool_calls for c in body_chunks[1:]]
    assert all(d is not None and len(d) == 1 for d in deltas)
    calls = [d[0] for d in deltas if d]
    # Per call in turn: index, id, type and name with empty arguments; then its arguments in
    # two or more fragments that carry only the index.
    assert [c.index for c in calls] == sorted(c.index for c in calls)
    for i, (name, args) in enumerate(PARALLEL_3):
        start, *fragments = [c for c in calls if c.index == i]
        assert start.id is not None and CALL_ID.fullmatch(start.id) and start.type == "function"
        assert start.function is not None
        assert (start.function.name, start.function.arguments) == (name, "")
        assert len(fragments) >= 2
        assert all(f.id is None and f.function and f.function.name is None for f in fragments)
        arguments = "".join(f.function.arguments or "" for f in fragments if f.function)
        assert json.loads(arguments) == args
    assert [c.index for c in calls if c.id] == [0, 1, 2]
    assert (
        finish.choices[0].finish_reason == "tool_calls"
        and finish.choices[0].delta.tool_calls is None
    )
    usage = usage_chunk.usage
    assert usage_chunk.choices == [] and usage is not None
    output = 2 * WEATHER_TOKENS + SEARCH_TOKENS
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, output)

    # The SDK's stream helper puts the calls back together; usage matches the plain answer's.
    async with oai.chat.completions.stream(
        model="m",
        messages=CHAT_MESSAGES,
        tools=OAI_TOOLS,
        stream_options={"include_usage": True},
        extra_headers=tool_headers(3),
    ) as stream:
        final = await stream.get_final_completion()
    plain = await oai.chat.completions.create(
        model="m", messages=CHAT_MESSAGES, tools=OAI_TOOLS, extra_headers=tool_headers(3)
    )
    assert oai_calls(final.choices[0].message) == oai_calls(plain.choices[0].message) == PARALLEL_3
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and plain.usage is not None
    assert final.usage.completion_tokens == plain.usage.completion_tokens == output


async def test_chat_tool_choice(oai: openai.AsyncOpenAI) -> None:
    async def create(**kwargs: Any) -> Any:
        return await oai.chat.completions.create(
            model="m", messages=CHAT_MESSAGES, tools=OAI_TOOLS, **kwargs
        )

    named = await create(
        tool_choice={"type": "function", "function": {"name": "search"}},
        extra_headers=tool_headers(2),
    )
    assert oai_calls(named.choices[0].message) == [("search", SEARCH_ARGS)] * 2
    assert named.usage.completion_tokens == 2 * SEARCH_TOKENS
    required = await create(tool_choice="required", extra_headers=tool_headers(2))
    assert oai_calls(required.choices[0].message) == [
        ("get_weather", WEATHER_ARGS),
        ("search", SEARCH_ARGS),
    ]
    single = await create(parallel_tool_calls=False, extra_headers=tool_headers(3))
    assert oai_calls(single.choices[0].message) == [("get_weather", WEATHER_ARGS)]
    none = await create(tool_choice="none", extra_headers=tool_headers(2))
    assert none.choices[0].message.content == FULL_TEXT
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason == "stop" and none.usage.completion_tokens == 20


async def test_chat_tool_round_trip(oai: openai.AsyncOpenAI) -> None:
    first = await oai.chat.completions.create(model="m", messages=CHAT_MESSAGES, tools=OAI_TOOLS)
    message = first.choices[0].message
    [call] = message.tool_calls or []
    history: Any = [
        *CHAT_MESSAGES,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT},
    ]
    second = await oai.chat.completions.create(model="m", messages=history, tools=OAI_TOOLS)
    assert second.choices[0].message.content == FULL_TEXT
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].finish_reason == "stop"
    assert second.usage is not None
    assert (second.usage.prompt_tokens, second.usage.completion_tokens) == (10, 20)  # 40 chars


async def test_tool_calls_stay_within_the_cap(oai: openai.AsyncOpenAI) -> None:
    # Whole calls, as many as fit: finish "length" when one is left out; the usual text cut at
    # the cap when not even one fits; all of them when the mock ignores the cap.
    async def create(cap: int, **headers: str) -> Any:
        return await oai.chat.completions.create(
            model="m",
            messages=CHAT_MESSAGES,
            tools=OAI_TOOLS,
            max_tokens=cap,
            extra_headers={**tool_headers(2), **headers},
        )

    one = await create(WEATHER_TOKENS + SEARCH_TOKENS - 1)
    assert oai_calls(one.choices[0].message) == [("get_weather", WEATHER_ARGS)]
    assert one.choices[0].finish_reason == "length"
    assert one.usage.completion_tokens == WEATHER_TOKENS
    text = await create(3)
    assert text.choices[0].message.content == "tok0 tok1 tok2"
    assert text.choices[0].message.tool_calls is None
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 3
    both = await create(3, **{"x-mock-ignore-cap": "1"})
    assert len(oai_calls(both.choices[0].message)) == 2
    assert both.choices[0].finish_reason == "tool_calls"


async def test_anthropic_tool_use_plain(claude: anthropic.AsyncAnthropic) -> None:
    raw = await claude.messages.with_raw_response.create(
        model="claude-sonnet-4-6",
        system=SYSTEM,
        messages=CLAUDE_MESSAGES,
        max_tokens=100,
        tools=CLAUDE_TOOLS,
        extra_headers=tool_headers(2),
    )
    msg = anthropic.types.Message.model_validate(raw.http_response.json())
    assert msg.stop_reason == "tool_use"
    blocks = [b for b in msg.content if b.type == "tool_use"]
    assert len(blocks) == len(msg.content) == 2
    assert [(b.name, b.input) for b in blocks] == [
        ("get_weather", WEATHER_ARGS),
        ("search", SEARCH_ARGS),
    ]
    assert all(TOOLU_ID.fullmatch(b.id) for b in blocks) and blocks[0].id != blocks[1].id
    output = WEATHER_TOKENS + SEARCH_TOKENS
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_TOKENS, output)


async def test_anthropic_tool_use_stream(mock: Mock, claude: anthropic.AsyncAnthropic) -> None:
    body = {
        "model": "c",
        "max_tokens": 100,
        "messages": CLAUDE_MESSAGES,
        "tools": CLAUDE_TOOLS,
        "stream": True,
    }
    frames = await sse_data(f"{mock.url}/v1/messages", body, tool_headers(2))
    events_type: Any = anthropic.types.RawMessageStreamEvent
    adapter = pydantic.TypeAdapter(events_type)
    events = [adapter.validate_python(f) for f in frames if f["type"] != "ping"]
    start, *blocks, delta, stop = events
    assert (start.type, delta.type, stop.type) == ("message_start", "message_delta", "message_stop")
    for i, (name, args) in enumerate([("get_weather", WEATHER_ARGS), ("search", SEARCH_ARGS)]):
        mine = [e for e in blocks if e.index == i]
        first, *fragments, last = mine
        assert first.type == "content_block_start" and first.content_block.type == "tool_use"
        assert TOOLU_ID.fullmatch(first.content_block.id)
        assert (first.content_block.name, first.content_block.input) == (name, {})
        assert len(fragments) >= 2
        assert all(f.type == "content_block_delta" for f in fragments)
        assert all(f.delta.type == "input_json_delta" for f in fragments)
        assert json.loads("".join(f.delta.partial_json for f in fragments)) == args
        assert last.type == "content_block_stop"
    assert [e.index for e in blocks] == sorted(e.index for e in blocks)  # one block at a time
    output = WEATHER_TOKENS + SEARCH_TOKENS
    assert delta.delta.stop_reason == "tool_use" and delta.usage.output_tokens == output

    # The SDK's stream helper rebuilds each input from its partial_json fragments.
    async with claude.messages.stream(
        model="c",
        max_tokens=100,
        messages=CLAUDE_MESSAGES,
        tools=CLAUDE_TOOLS,
        extra_headers=tool_headers(2),
    ) as stream:
        final = await stream.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        ("tool_use", WEATHER_ARGS),
        ("tool_use", SEARCH_ARGS),
    ]
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (6, output)


async def test_anthropic_tool_choice(claude: anthropic.AsyncAnthropic) -> None:
    async def create(tool_choice: Any, n: int) -> anthropic.types.Message:
        return await claude.messages.create(
            model="c",
            max_tokens=100,
            messages=CLAUDE_MESSAGES,
            tools=CLAUDE_TOOLS,
            tool_choice=tool_choice,
            extra_headers=tool_headers(n),
        )

    def calls(msg: anthropic.types.Message) -> list[tuple[str, Any]]:
        return [(b.name, b.input) for b in msg.content if b.type == "tool_use"]

    named = await create({"type": "tool", "name": "search"}, 2)
    assert calls(named) == [("search", SEARCH_ARGS)] * 2
    single = await create({"type": "any", "disable_parallel_tool_use": True}, 3)
    assert calls(single) == [("get_weather", WEATHER_ARGS)]
    assert single.usage.output_tokens == WEATHER_TOKENS
    none = await create({"type": "none"}, 2)
    assert none.content[0].type == "text" and none.content[0].text == FULL_TEXT
    assert none.stop_reason == "end_turn"


async def test_anthropic_tool_round_trip(claude: anthropic.AsyncAnthropic) -> None:
    first = await claude.messages.create(
        model="c", system=SYSTEM, messages=CLAUDE_MESSAGES, max_tokens=100, tools=CLAUDE_TOOLS
    )
    [block] = first.content
    assert block.type == "tool_use"
    history: Any = [
        *CLAUDE_MESSAGES,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block.id, "content": TOOL_RESULT}],
        },
    ]
    second = await claude.messages.create(
        model="c", system=SYSTEM, messages=history, max_tokens=100, tools=CLAUDE_TOOLS
    )
    assert second.content[0].type == "text" and second.content[0].text == FULL_TEXT
    assert second.stop_reason == "end_turn"
    assert (second.usage.input_tokens, second.usage.output_tokens) == (10, 20)  # 40 chars


def gemini_calls(resp: genai_types.GenerateContentResponse) -> list[tuple[Any, ...]]:
    return [(c.name, c.args, c.id) for c in resp.function_calls or []]


async def test_gemini_function_calls_plain_and_stream(
    mock: Mock, gemini: genai.client.AsyncClient
) -> None:
    config = genai_types.GenerateContentConfig(
        system_instruction=SYSTEM,
        tools=GEMINI_TOOLS,
        http_options=genai_types.HttpOptions(headers=tool_headers(2)),
    )
    resp = await gemini.models.generate_content(
        model="gemini-2.5-flash", contents=USER, config=config
    )
    # Gemini's calls carry no id.
    assert gemini_calls(resp) == [
        ("get_weather", WEATHER_ARGS, None),
        ("search", SEARCH_ARGS, None),
    ]
    assert resp.candidates and resp.candidates[0].finish_reason == genai_types.FinishReason.STOP
    output = WEATHER_TOKENS + SEARCH_TOKENS
    usage = resp.usage_metadata
    assert usage is not None
    assert (usage.prompt_token_count, usage.candidates_token_count) == (PROMPT_TOKENS, output)
    sent = mock.state.requests[-1].json()
    assert sent["tools"][0]["functionDeclarations"][0]["parameters"]["type"] == "OBJECT"

    stream = await gemini.models.generate_content_stream(
        model="gemini-2.5-flash", contents=USER, config=config
    )
    chunks = [c async for c in stream]
    # One whole call a chunk; running usage totals; the finish reason on the last chunk.
    assert [gemini_calls(c) for c in chunks] == [
        [("get_weather", WEATHER_ARGS, None)],
        [("search", SEARCH_ARGS, None)],
    ]
    running = [c.usage_metadata.candidates_token_count for c in chunks if c.usage_metadata]
    assert running == [WEATHER_TOKENS, output]
    finishes = [c.candidates[0].finish_reason for c in chunks if c.candidates]
    assert finishes == [None, genai_types.FinishReason.STOP]

    # The same request as the SDK sent it, answered plain, as SSE and as a JSON array: every
    # body validates as a GenerateContentResponse (which forbids unknown fields).
    validate = genai_types.GenerateContentResponse.model_validate
    headers = tool_headers(2)
    base = f"{mock.url}/v1beta/models/gemini-2.5-flash"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}:generateContent", json=sent, headers=headers) as r:
            plain = validate(await r.json())
        async with session.post(f"{base}:streamGenerateContent", json=sent, headers=headers) as r:
            array = [validate(c) for c in await r.json()]
    sse = [
        validate(d) for d in await sse_data(f"{base}:streamGenerateContent?alt=sse", sent, headers)
    ]
    assert gemini_calls(plain) == gemini_calls(resp)
    assert (
        [gemini_calls(c) for c in array]
        == [gemini_calls(c) for c in sse]
        == [gemini_calls(c) for c in chunks]
    )
    assert plain.usage_metadata == sse[-1].usage_metadata == array[-1].usage_metadata


async def test_gemini_tool_config(mock: Mock, gemini: genai.client.AsyncClient) -> None:
    def config(mode: str, allowed: list[str] | None = None) -> genai_types.GenerateContentConfig:
        calling = genai_types.FunctionCallingConfig(
            mode=genai_types.FunctionCallingConfigMode(mode), allowed_function_names=allowed
        )
        return genai_types.GenerateContentConfig(
            tools=GEMINI_TOOLS,
            tool_config=genai_types.ToolConfig(function_calling_config=calling),
            http_options=genai_types.HttpOptions(headers=tool_headers(2)),
        )

    named = await gemini.models.generate_content(
        model="g", contents=USER, config=config("ANY", ["search"])
    )
    assert gemini_calls(named) == [("search", SEARCH_ARGS, None)] * 2
    none = await gemini.models.generate_content(model="g", contents=USER, config=config("NONE"))
    assert none.text == FULL_TEXT and not none.function_calls

    # snake_case fields and lower-case JSON Schema types, as a hand-written request may send.
    body = {
        "contents": [{"role": "user", "parts": [{"text": USER}]}],
        "tools": [{"function_declarations": [{"name": "w", "parameters": WEATHER_SCHEMA}]}],
        "tool_config": {"function_calling_config": {"mode": "ANY"}},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{mock.url}/v1beta/models/g:generateContent", json=body) as resp,
    ):
        answer = await resp.json()
    assert answer["candidates"][0]["content"]["parts"] == [
        {"functionCall": {"name": "w", "args": WEATHER_ARGS}}
    ]


async def test_gemini_function_round_trip(gemini: genai.client.AsyncClient) -> None:
    config = genai_types.GenerateContentConfig(system_instruction=SYSTEM, tools=GEMINI_TOOLS)
    first = await gemini.models.generate_content(model="g", contents=USER, config=config)
    assert first.candidates and first.candidates[0].content and first.function_calls
    [call] = first.function_calls
    assert call.name is not None
    reply = genai_types.Part.from_function_response(
        name=call.name, response={"result": TOOL_RESULT}
    )
    contents = [
        genai_types.Content(role="user", parts=[genai_types.Part(text=USER)]),
        first.candidates[0].content,
        genai_types.Content(role="user", parts=[reply]),
    ]
    second = await gemini.models.generate_content(model="g", contents=contents, config=config)
    assert second.text == FULL_TEXT and not second.function_calls
    assert second.candidates and second.candidates[0].finish_reason == genai_types.FinishReason.STOP
    usage = second.usage_metadata
    assert usage is not None  # a functionResponse is not prompt text in the mock's count
    assert (usage.prompt_token_count, usage.candidates_token_count) == (PROMPT_TOKENS, 20)


async def test_tool_choice_of_an_undeclared_tool_and_bad_header(
    oai: openai.AsyncOpenAI,
    claude: anthropic.AsyncAnthropic,
    gemini: genai.client.AsyncClient,
) -> None:
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(
            model="m",
            messages=CHAT_MESSAGES,
            tools=OAI_TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    with pytest.raises(anthropic.BadRequestError):
        await claude.messages.create(
            model="c",
            max_tokens=10,
            messages=CLAUDE_MESSAGES,
            tools=CLAUDE_TOOLS,
            tool_choice={"type": "tool", "name": "nope"},
        )
    calling = genai_types.FunctionCallingConfig(
        mode=genai_types.FunctionCallingConfigMode.ANY, allowed_function_names=["nope"]
    )
    config = genai_types.GenerateContentConfig(
        tools=GEMINI_TOOLS, tool_config=genai_types.ToolConfig(function_calling_config=calling)
    )
    with pytest.raises(genai_errors.ClientError) as gem_err:
        await gemini.models.generate_content(model="g", contents=USER, config=config)
    assert gem_err.value.status == "INVALID_ARGUMENT"
    with pytest.raises(openai.BadRequestError) as bad_header:
        await oai.chat.completions.create(
            model="m", messages=CHAT_MESSAGES, tools=OAI_TOOLS, extra_headers=tool_headers(0)
        )
    assert bad_header.value.message.endswith("x-mock-tool-calls must be >= 1")


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
            # introspection is not counted
            assert await resp.json() == {"requests": 1, "by_key": {"x": 1}}
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


# --- Per-credential behaviour (upstream key pools) --------------------------------------------

# One request of each protocol, by the credential it sends (each route's own auth header).
KEYED_CALLS: dict[str, tuple[str, Any, Any]] = {
    "openai": (
        "/v1/chat/completions",
        {"model": "m", "messages": CHAT_MESSAGES},
        lambda key: {"Authorization": f"Bearer {key}"},
    ),
    "anthropic": (
        "/v1/messages",
        {"model": "c", "messages": CLAUDE_MESSAGES, "max_tokens": 5},
        lambda key: {"x-api-key": key, "anthropic-version": "2023-06-01"},
    ),
    "gemini": (
        "/v1beta/models/g:generateContent",
        {"contents": [{"parts": [{"text": USER}]}]},
        lambda key: {"x-goog-api-key": key},
    ),
}
ERROR_KIND = {  # what each protocol's error body calls the statuses the pools react to
    401: {"openai": "invalid_request_error", "anthropic": "authentication_error"},
    429: {"openai": "requests", "anthropic": "rate_limit_error"},
    503: {"openai": "server_error", "anthropic": "api_error"},
}
RPC_STATUS = {401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


async def keyed_call(
    http: aiohttp.ClientSession, url: str, protocol: str, key: str
) -> tuple[int, Any, Any]:
    path, body, auth = KEYED_CALLS[protocol]
    async with http.post(url + path, json=body, headers=auth(key)) as resp:
        return resp.status, resp.headers.copy(), await resp.json()


async def put_key(http: aiohttp.ClientSession, url: str, key: str, body: Any) -> Any:
    async with http.put(f"{url}/mock/keys/{key}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.mark.parametrize("status", [401, 429, 503])
@pytest.mark.parametrize("protocol", ["openai", "anthropic", "gemini"])
async def test_a_key_answers_its_status_in_each_protocol_shape_while_others_answer_normally(
    mock: Mock, protocol: str, status: int
) -> None:
    async with aiohttp.ClientSession() as http:
        stored = await put_key(http, mock.url, "k-bad", {"status": status})
        assert stored == {
            "status": status,
            "retry_after_s": None,
            "retry_after_ms": None,
            "latency_ms": 0.0,
            "retry_headers": True,
        }
        code, headers, body = await keyed_call(http, mock.url, protocol, "k-bad")
        assert code == status
        assert "retry-after" not in headers and "retry-after-ms" not in headers
        if protocol == "gemini":
            assert (body["error"]["code"], body["error"]["status"]) == (status, RPC_STATUS[status])
            assert "details" not in body["error"]  # no hint, no RetryInfo
        else:
            assert body["error"]["type"] == ERROR_KIND[status][protocol]
        assert "k-bad" not in json.dumps(body)  # an upstream key never echoed

        code, _, body = await keyed_call(http, mock.url, protocol, "k-ok")
        assert code == 200 and ("usage" in body or "usageMetadata" in body)


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
async def test_a_429_key_sends_its_retry_hint_headers(mock: Mock, protocol: str) -> None:
    mock.state.set_key_behaviour(
        "k-429", KeyBehaviour(status=429, retry_after_s=2, retry_after_ms=1500)
    )
    async with aiohttp.ClientSession() as http:
        code, headers, _ = await keyed_call(http, mock.url, protocol, "k-429")
    assert code == 429
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "1500")


async def test_a_gemini_429_key_sends_retry_info_like_the_real_api(mock: Mock) -> None:
    async with aiohttp.ClientSession() as http:
        await put_key(http, mock.url, "k-429", {"status": 429, "retry_after_s": 2})
        code, headers, body = await keyed_call(http, mock.url, "gemini", "k-429")
        assert code == 429 and headers["retry-after"] == "2"
        error = body["error"]
        assert (error["code"], error["status"]) == (429, "RESOURCE_EXHAUSTED")
        # As in the real answer (protocol notes §3.1): the quota that failed, then RetryInfo.
        quota, retry = error["details"]
        assert quota["@type"] == "type.googleapis.com/google.rpc.QuotaFailure"
        assert quota["violations"][0]["quotaId"]
        assert retry == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}

        # Milliseconds win for the delay; without headers the body is the only hint, as from
        # the real Gemini API. The key may also come as ?key=.
        await put_key(
            http,
            mock.url,
            "k-429",
            {"status": 429, "retry_after_s": 2, "retry_after_ms": 1250, "retry_headers": False},
        )
        path, payload, _ = KEYED_CALLS["gemini"]
        async with http.post(f"{mock.url}{path}?key=k-429", json=payload) as resp:
            assert resp.status == 429
            assert "retry-after" not in resp.headers and "retry-after-ms" not in resp.headers
            body = await resp.json()
    assert body["error"]["details"][-1]["retryDelay"] == "1.250s"


async def test_the_sdks_see_a_keyed_429_as_a_rate_limit(mock: Mock) -> None:
    mock.state.set_key_behaviour("k-429", KeyBehaviour(status=429, retry_after_s=1))
    async with openai.AsyncOpenAI(base_url=f"{mock.url}/v1", api_key="k-429", max_retries=0) as oai:
        with pytest.raises(openai.RateLimitError) as err:
            await oai.chat.completions.create(model="m", messages=CHAT_MESSAGES)
    assert err.value.response.headers["retry-after"] == "1"
    async with aiohttp.ClientSession() as session:
        options = genai_types.HttpOptions(base_url=mock.url, aiohttp_client=session)
        client = genai.Client(api_key="k-429", http_options=options)
        try:
            with pytest.raises(genai_errors.ClientError) as gem_err:
                await client.aio.models.generate_content(model="g", contents=USER)
        finally:
            await client.aio.aclose()
            client.close()
    assert gem_err.value.code == 429
    assert gem_err.value.details["error"]["details"][-1]["retryDelay"] == "1s"


async def test_a_401_key_fails_the_model_lists_until_healed_over_http(mock: Mock) -> None:
    lists = [  # each SDK's model-list call, with the key where that SDK sends it
        ("/v1/models", {"Authorization": "Bearer k-401"}, "invalid_request_error"),
        ("/v1/models", {"x-api-key": "k-401", "anthropic-version": "x"}, "authentication_error"),
        ("/v1beta/models", {"x-goog-api-key": "k-401"}, "UNAUTHENTICATED"),
        ("/v1beta/models?key=k-401", {}, "UNAUTHENTICATED"),
    ]
    async with aiohttp.ClientSession() as http:
        await put_key(http, mock.url, "k-401", {"status": 401})
        async with http.get(f"{mock.url}/mock/keys") as resp:
            listed = await resp.json()
        assert list(listed) == ["k-401"] and listed["k-401"]["status"] == 401
        for path, headers, kind in lists:
            async with http.get(mock.url + path, headers=headers) as resp:
                assert resp.status == 401, path
                error = (await resp.json())["error"]
                assert kind in (error.get("type"), error.get("status")), path

        async with http.delete(f"{mock.url}/mock/keys/k-401") as resp:
            assert resp.status == 204
        async with http.delete(f"{mock.url}/mock/keys/k-401") as resp:
            assert resp.status == 204  # healing a healthy key is a no-op
        async with http.get(f"{mock.url}/mock/keys") as resp:
            assert await resp.json() == {}
        for path, headers, _ in lists:
            async with http.get(mock.url + path, headers=headers) as resp:
                assert resp.status == 200, path
    assert mock.state.requests_by_key == {"k-401": 8}


async def test_a_slow_key_waits_before_its_headers(mock: Mock) -> None:
    mock.state.set_key_behaviour("k-slow", KeyBehaviour(latency_ms=200))
    async with aiohttp.ClientSession() as http:
        start_s = time.perf_counter()
        code, _, _ = await keyed_call(http, mock.url, "anthropic", "k-slow")
        assert code == 200 and time.perf_counter() - start_s >= 0.2

        mock.state.clear_key_behaviour("k-slow")
        start_s = time.perf_counter()
        code, _, _ = await keyed_call(http, mock.url, "anthropic", "k-slow")
        assert code == 200 and time.perf_counter() - start_s < 0.2


async def test_a_key_behaviour_comes_before_the_header_controls(mock: Mock) -> None:
    mock.state.set_key_behaviour("k-401", KeyBehaviour(status=401))
    async with aiohttp.ClientSession() as http:
        path, body, auth = KEYED_CALLS["openai"]
        headers = {**auth("k-401"), "x-mock-error": "503", "x-mock-retry-after": "9"}
        async with http.post(mock.url + path, json=body, headers=headers) as resp:
            assert resp.status == 401 and "retry-after" not in resp.headers
        headers = {**auth("k-ok"), "x-mock-error": "503", "x-mock-retry-after": "9"}
        async with http.post(mock.url + path, json=body, headers=headers) as resp:
            assert resp.status == 503 and resp.headers["retry-after"] == "9"


async def test_requests_are_counted_per_key(mock: Mock) -> None:
    async with aiohttp.ClientSession() as http:
        for protocol, key in [("openai", "k-a"), ("anthropic", "k-a"), ("gemini", "k-b")]:
            await keyed_call(http, mock.url, protocol, key)
        mock.state.set_key_behaviour("k-b", KeyBehaviour(status=429))
        await keyed_call(http, mock.url, "gemini", "k-b")  # refused requests count too
        async with http.get(f"{mock.url}/v1/models", headers={"Authorization": "Bearer k-c"}):
            pass
        async with http.post(f"{mock.url}/v1/responses", json={"input": "x"}):
            pass  # no credential: in the total only
        async with http.get(f"{mock.url}/mock/stats") as resp:
            stats = await resp.json()
    assert stats == {"requests": 6, "by_key": {"k-a": 2, "k-b": 2, "k-c": 1}}
    assert mock.state.requests_by_key == stats["by_key"]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"not json", "malformed"),
        (b"[429]", "Expected `object`"),
        (b'{"status": 200}', "$.status"),
        (b'{"status": "429"}', "$.status"),
        (b'{"status": 429, "retry_after_s": -1}', "$.retry_after_s"),
        (b'{"retry_after_ms": 1.5}', "$.retry_after_ms"),
        (b'{"latency_ms": -5}', "$.latency_ms"),
        (b'{"status": 429, "retry_after": 2}', "retry_after"),
    ],
)
async def test_a_bad_key_behaviour_is_refused_with_400(
    mock: Mock, body: bytes, problem: str
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{mock.url}/mock/keys/k", data=body) as resp:
            assert resp.status == 400
            assert problem in (await resp.json())["error"]
        async with http.get(f"{mock.url}/mock/keys") as resp:
            assert await resp.json() == {}


def test_a_bad_key_behaviour_is_refused_in_process() -> None:
    for bad in ({"status": 302}, {"retry_after_ms": -1}, {"latency_ms": float("nan")}):
        with pytest.raises(ValueError):
            KeyBehaviour(**bad)


@pytest.mark.parametrize(
    ("protocol", "headers", "query", "credential"),
    [
        ("openai", {"Authorization": "Bearer sk-1"}, {}, "sk-1"),
        ("openai", {"Authorization": "Basic sk-1"}, {}, ""),
        ("anthropic", {"x-api-key": "sk-ant"}, {}, "sk-ant"),
        ("gemini", {"x-goog-api-key": "AIza"}, {"key": "other"}, "AIza"),
        ("gemini", {}, {"key": "AIza"}, "AIza"),
        ("gemini", {}, {}, ""),
    ],
)
def test_the_credential_is_read_where_each_protocol_sends_it(
    protocol: Any, headers: dict[str, str], query: dict[str, str], credential: str
) -> None:
    assert credential_of(protocol, headers, query) == credential
