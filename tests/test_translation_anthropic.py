"""The Anthropic Messages codec: callers' requests read into the IR, the IR written as an
upstream request, upstream answers and streams read back, and answers and streams written
for callers, checked against the official SDK's own types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.message_create_params import (
    MessageCreateParamsNonStreaming,
    MessageCreateParamsStreaming,
)
from pydantic import TypeAdapter

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.base import Route, Usage, sse_event_fields
from ratelimit_gw.protocols.translation.anthropic_messages import AnthropicMessagesCodec
from ratelimit_gw.protocols.translation.ir import (
    ChatAnswer,
    ChatRequest,
    Finished,
    Image,
    NamedTool,
    Reasoning,
    ReasoningDelta,
    ResponseFormat,
    Started,
    StreamEvent,
    Text,
    TextDelta,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStarted,
    ToolResult,
    ToolSpec,
    Turn,
    UsageReport,
)

CODEC = AnthropicMessagesCodec()
STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)
REQUEST_PARAMS = TypeAdapter(MessageCreateParamsNonStreaming)
STREAM_REQUEST_PARAMS = TypeAdapter(MessageCreateParamsStreaming)


def read(body: dict[str, Any]) -> ChatRequest:
    return CODEC.read_request(json.dumps(body).encode(), Route.MESSAGES, None)


def materialised(value: Any) -> Any:
    """Walk a validated TypedDict to the bottom: pydantic validates Iterable fields lazily."""
    if isinstance(value, dict):
        return {key: materialised(item) for key, item in value.items()}
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    return [materialised(item) for item in value]


def written(request: ChatRequest, model: str = "claude-sonnet-4-5", cap: int = 4096) -> Any:
    """The upstream body for ``request``, checked against the SDK's request types."""
    body = json.loads(CODEC.write_request(request, model, cap))
    params = STREAM_REQUEST_PARAMS if body.get("stream") else REQUEST_PARAMS
    materialised(params.validate_python(body))
    return body


def sse(text: str) -> list[tuple[str | None, bytes]]:
    """A recorded SSE stream as (event name, data) pairs, as the relay's tap hands them on."""
    events = []
    for raw in text.strip().split("\n\n"):
        name, data = sse_event_fields(raw.encode())
        assert data is not None
        events.append((name, data))
    return events


def read_stream(text: str) -> list[StreamEvent]:
    reader = CODEC.answer_reader()
    return [event for name, data in sse(text) for event in reader.feed(name, data)]


def parsed_events(stream: bytes) -> list[dict[str, Any]]:
    """The writer's bytes as whole events, each named, framed and valid for the SDK."""
    assert stream.endswith(b"\n\n")
    events = []
    for raw in stream[:-2].split(b"\n\n"):
        name_line, data_line = raw.split(b"\n")
        assert name_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        event = json.loads(data_line[6:])
        assert event["type"] == name_line[7:].decode()
        STREAM_EVENT.validate_python(event)
        events.append(event)
    return events


def accumulated(events: list[dict[str, Any]]) -> Message:
    """The message the official SDK builds from a stream."""
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for event in events:
        snapshot = accumulate_event(
            event=STREAM_EVENT.validate_python(event),
            current_snapshot=snapshot,
            json_bufs=json_bufs,
        )
    assert snapshot is not None
    return Message.model_validate(snapshot.to_dict())


def write_stream(request: ChatRequest, events: list[StreamEvent]) -> tuple[list[bytes], bytes]:
    writer = CODEC.answer_writer(request)
    return [writer.feed(event) for event in events], writer.close()


def caller(**fields: Any) -> ChatRequest:
    fields.setdefault("stream", False)
    return ChatRequest(model="claude-sonnet-4-5", **fields)


def user(*parts: Any) -> Turn:
    return Turn("user", list(parts))


def assistant(*parts: Any) -> Turn:
    return Turn("assistant", list(parts))


# --- read_request: recorded caller requests ---------------------------------------------


def test_read_request_maps_generation_settings_and_drops_tuning_fields() -> None:
    request = read(
        {
            "model": "gpt-4o",
            "max_tokens": 1024,
            "system": "You are terse.",
            "messages": [{"role": "user", "content": "Hello, Claude"}],
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "stop_sequences": ["\n\nHuman:"],
            "stream": True,
            "metadata": {"user_id": "13803d75-b4b5-4c3e-b2a2-6f21399b021b"},
            "service_tier": "auto",
            "inference_geo": "us",
            "frobnicate": 1,
        }
    )
    assert request.model == "gpt-4o" and request.stream
    assert request.system == ["You are terse."]
    assert request.turns == [Turn("user", [Text("Hello, Claude")])]
    assert (request.max_tokens, request.temperature, request.top_p, request.top_k) == (
        1024,
        0.2,
        0.9,
        40,
    )
    assert request.stop == ["\n\nHuman:"]
    assert request.dropped == ["metadata", "service_tier", "inference_geo", "frobnicate"]


def test_missing_max_tokens_reads_as_none() -> None:
    request = read({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]})
    assert request.max_tokens is None and not request.stream


def test_system_blocks_and_system_turns_merge_in_order() -> None:
    request = read(
        {
            "model": "gemini-2.5-flash",
            "max_tokens": 256,
            "system": [
                {"type": "text", "text": "You are Claude Code."},
                {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            ],
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "system", "content": "Answer in French from now on."},
                {"role": "user", "content": [{"type": "text", "text": "Ça va ?"}]},
            ],
        }
    )
    assert request.system == ["You are Claude Code.", "Be brief.", "Answer in French from now on."]
    assert request.turns == [user(Text("Hi")), user(Text("Ça va ?"))]
    assert request.dropped == ["cache_control"]


def test_parallel_tool_calls_and_tool_results_with_a_list_of_parts() -> None:
    request = read(
        {
            "model": "gpt-4o",
            "max_tokens": 1024,
            "tools": [
                {
                    "name": "get_weather",
                    "description": "Get the current weather in a given location",
                    "input_schema": {
                        "type": "object",
                        "properties": {"location": {"type": "string"}},
                        "required": ["location"],
                    },
                    "cache_control": {"type": "ephemeral"},
                },
                {"type": "custom", "name": "get_time", "input_schema": {"type": "object"}},
            ],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": False},
            "messages": [
                {"role": "user", "content": "Weather and time in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Checking both."},
                        {
                            "type": "tool_use",
                            "id": "toolu_01A09q90qw90lq917835lq9",
                            "name": "get_weather",
                            "input": {"location": "Paris"},
                        },
                        {
                            "type": "tool_use",
                            "id": "toolu_01B09q90qw90lq917835lq9",
                            "name": "get_time",
                            "input": {},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                            "content": [
                                {"type": "text", "text": "15 degrees"},
                                {
                                    "type": "image",
                                    "source": {
                                        "type": "base64",
                                        "media_type": "image/png",
                                        "data": "iVBORw0KGgo=",
                                    },
                                },
                            ],
                        },
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_01B09q90qw90lq917835lq9",
                            "content": "clock unavailable",
                            "is_error": True,
                        },
                    ],
                },
            ],
        }
    )
    assert request.tools == [
        ToolSpec(
            "get_weather",
            "Get the current weather in a given location",
            {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        ),
        ToolSpec("get_time", None, {"type": "object"}),
    ]
    assert request.tool_choice == "auto" and request.parallel_tool_calls is True
    assert request.turns[1] == assistant(
        Text("Checking both."),
        ToolCall("toolu_01A09q90qw90lq917835lq9", "get_weather", {"location": "Paris"}),
        ToolCall("toolu_01B09q90qw90lq917835lq9", "get_time", {}),
    )
    image = Image("image/png", data="iVBORw0KGgo=", param="messages[2].content[0].content[1]")
    assert request.turns[2] == user(
        ToolResult("toolu_01A09q90qw90lq917835lq9", "get_weather", [Text("15 degrees"), image]),
        ToolResult(
            "toolu_01B09q90qw90lq917835lq9",
            "get_time",
            [Text("clock unavailable")],
            is_error=True,
        ),
    )
    assert request.dropped == ["cache_control"]


@pytest.mark.parametrize(
    ("tool_choice", "expected", "parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        ({"type": "tool", "name": "get_weather"}, NamedTool("get_weather"), None),
        ({"type": "none"}, "none", None),
    ],
)
def test_tool_choice(tool_choice: dict[str, Any], expected: Any, parallel: bool | None) -> None:
    request = read(
        {
            "model": "gpt-4o",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": tool_choice,
        }
    )
    assert (request.tool_choice, request.parallel_tool_calls) == (expected, parallel)


def test_images_by_base64_and_by_url_keep_their_field_for_a_refusal() -> None:
    request = read(
        {
            "model": "gemini-2.5-flash",
            "max_tokens": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/jpeg",
                                "data": "/9j/4AAQSkZJRg==",
                            },
                        },
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://example.com/cat.jpg"},
                        },
                        {"type": "text", "text": "Same cat?"},
                    ],
                }
            ],
        }
    )
    assert request.turns[0].parts == [
        Image("image/jpeg", data="/9j/4AAQSkZJRg==", param="messages[0].content[0]"),
        Image(None, url="https://example.com/cat.jpg", param="messages[0].content[1]"),
        Text("Same cat?"),
    ]


def test_thinking_config_and_thinking_blocks_in_the_history() -> None:
    request = read(
        {
            "model": "gpt-5",
            "max_tokens": 16000,
            "thinking": {"type": "enabled", "budget_tokens": 10000},
            "messages": [
                {"role": "user", "content": "What is 27 * 453?"},
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "thinking",
                            "thinking": "27 * 453 = 12231",
                            "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds",
                        },
                        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
                        {"type": "text", "text": "12,231"},
                    ],
                },
                {"role": "user", "content": "Thanks"},
            ],
        }
    )
    assert request.reasoning_budget == 10000 and request.show_reasoning
    assert request.turns[1] == assistant(
        Reasoning("27 * 453 = 12231", "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"),
        Text("12,231"),
    )
    assert request.dropped == ["redacted_thinking"]
    assert request.param("reasoning") == "thinking"
    assert request.param("reasoning_budget") == "thinking"


@pytest.mark.parametrize(
    ("thinking", "budget", "shown"),
    [
        ({"type": "disabled"}, 0, False),
        ({"type": "adaptive"}, None, True),
        ({"type": "enabled", "budget_tokens": 2048, "display": "omitted"}, 2048, False),
    ],
)
def test_thinking_modes(thinking: dict[str, Any], budget: int | None, shown: bool) -> None:
    request = read(
        {
            "model": "gpt-5",
            "max_tokens": 4096,
            "thinking": thinking,
            "messages": [{"role": "user", "content": "Hi"}],
        }
    )
    assert (request.reasoning_budget, request.show_reasoning) == (budget, shown)


def test_structured_output_reads_as_a_response_schema_and_effort_is_dropped() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    request = read(
        {
            "model": "gpt-4o",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "Name a cat"}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
        }
    )
    assert request.response_format == ResponseFormat("json_schema", schema=schema)
    assert request.param("response_format") == "output_config.format"
    assert request.dropped == ["output_config.effort"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Summarise"},
                            {
                                "type": "document",
                                "source": {
                                    "type": "base64",
                                    "media_type": "application/pdf",
                                    "data": "JVBERi0=",
                                },
                            },
                        ],
                    }
                ]
            },
            "messages[0].content[1]",
        ),
        (
            {
                "messages": [{"role": "user", "content": "News?"}],
                "tools": [
                    {"name": "x", "input_schema": {"type": "object"}},
                    {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                ],
            },
            "tools[1]",
        ),
        (
            {
                "messages": [{"role": "user", "content": "Hi"}],
                "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "x"}],
            },
            "mcp_servers",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "file", "file_id": "file_011"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].source",
        ),
    ],
)
def test_what_no_other_vendor_can_honour_is_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as refused:
        read({"model": "gpt-4o", "max_tokens": 10, **body})
    assert (refused.value.status, refused.value.param) == (400, param)
    assert param in refused.value.message


@pytest.mark.parametrize(
    ("body", "reason", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"[]", "invalid_json", None),
        (b'{"max_tokens": 5, "messages": []}', "missing_model", "model"),
        (b'{"model": "m", "max_tokens": 5}', "invalid_request", "messages"),
        (b'{"model": "m", "max_tokens": "5", "messages": []}', "invalid_request", "max_tokens"),
        (
            b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}',
            "invalid_request",
            "messages[0].role",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            "invalid_request",
            "messages[0].content[0].text",
        ),
    ],
)
def test_malformed_requests_are_400s_naming_the_field(
    body: bytes, reason: str, param: str | None
) -> None:
    with pytest.raises(GatewayError) as rejected:
        CODEC.read_request(body, Route.MESSAGES, None)
    assert (rejected.value.status, rejected.value.reason, rejected.value.param) == (
        400,
        reason,
        param,
    )


# --- write_request: what the Anthropic API accepts ----------------------------------------


def test_write_request_always_sends_max_tokens() -> None:
    assert written(caller(turns=[user(Text("Hi"))]), cap=8192)["max_tokens"] == 8192
    assert written(caller(turns=[user(Text("Hi"))], max_tokens=300))["max_tokens"] == 300


def test_write_request_merges_turns_and_puts_tool_results_first() -> None:
    request = caller(
        stream=True,
        system=["You are a helpful assistant.", "", "Answer in English."],
        turns=[
            user(Text("Weather in Paris and Rome?")),
            user(Text("Quickly please.")),
            assistant(
                ToolCall("call_abc", "get_weather", {"city": "Paris"}),
                ToolCall("call_def", "get_weather", {"city": "Rome"}),
            ),
            user(ToolResult("call_abc", "get_weather", [Text("15C")])),
            user(Text(" \n")),  # no visible text: the turn is left out, not sent empty
            user(
                Text("And Madrid?"),
                ToolResult("call_def", "get_weather", [Text("20C")], is_error=True),
            ),
        ],
        temperature=0.5,
        top_p=0.9,
        top_k=20,
        stop=["END"],
        tools=[ToolSpec("get_weather", "Current weather", {"properties": {"city": {}}})],
    )
    body = written(request, model="claude-opus-4-1")
    assert body["model"] == "claude-opus-4-1" and body["stream"] is True
    assert body["system"] == "You are a helpful assistant.\n\nAnswer in English."
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather in Paris and Rome?"},
                {"type": "text", "text": "Quickly please."},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_abc",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "call_def",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_abc",
                    "content": [{"type": "text", "text": "15C"}],
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "call_def",
                    "content": [{"type": "text", "text": "20C"}],
                    "is_error": True,
                },
                {"type": "text", "text": "And Madrid?"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather",
            "input_schema": {"type": "object", "properties": {"city": {}}},
        }
    ]
    assert "tool_choice" not in body
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.5, 0.9, 20)
    assert body["stop_sequences"] == ["END"]
    assert request.dropped == []


def test_history_that_starts_with_the_assistant_is_sent_as_it_is() -> None:
    body = written(caller(turns=[assistant(Text("How can I help?")), user(Text("Hi"))]))
    assert [m["role"] for m in body["messages"]] == ["assistant", "user"]


def test_other_vendors_reasoning_is_dropped_and_named_once() -> None:
    request = caller(
        turns=[
            user(Text("Hi")),
            assistant(Reasoning("thinking about it", "gemini-signature"), Text("Hello")),
            assistant(Reasoning("more")),  # nothing left: the turn goes
            user(Text("Bye")),
        ],
        params={"reasoning": "messages[].reasoning_content"},
    )
    body = written(request)
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Hello"}],
    }
    assert len(body["messages"]) == 3
    assert request.dropped == ["messages[].reasoning_content"]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        (
            NamedTool("lookup"),
            False,
            {"type": "tool", "name": "lookup", "disable_parallel_tool_use": True},
        ),
        ("none", False, {"type": "none"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
def test_tool_choice_and_parallel_tool_use(
    choice: Any, parallel: bool | None, expected: dict[str, Any]
) -> None:
    request = caller(
        turns=[user(Text("Hi"))],
        tools=[ToolSpec("lookup", None, {"type": "object", "properties": {}})],
        tool_choice=choice,
        parallel_tool_calls=parallel,
    )
    assert written(request)["tool_choice"] == expected


def test_tool_history_without_tools_declares_them_and_forbids_calls() -> None:
    request = caller(
        turns=[
            user(Text("Weather?")),
            assistant(ToolCall("call_1", "get_weather", {"city": "Oslo"})),
            user(ToolResult("call_1", "get_weather", [Text("-3C")]), Text("Summarise.")),
        ]
    )
    body = written(request)
    assert body["tools"] == [{"name": "get_weather", "input_schema": {"type": "object"}}]
    assert body["tool_choice"] == {"type": "none"}


def test_tool_ids_are_made_to_fit_anthropics_pattern() -> None:
    request = caller(
        turns=[
            user(Text("Go")),
            assistant(ToolCall("functions.search:0", "search", {})),
            user(ToolResult("functions.search:0", "search", [])),
        ],
        tools=[ToolSpec("search", None, {"type": "object"})],
    )
    messages = written(request)["messages"]
    assert messages[1]["content"][0]["id"] == "functions_search_0"
    assert messages[2]["content"][0] == {"type": "tool_result", "tool_use_id": "functions_search_0"}


def test_images_inline_and_by_url() -> None:
    body = written(
        caller(
            turns=[
                user(
                    Image("image/png", data="iVBORw0KGgo="),
                    Image(None, url="https://example.com/a.png"),
                    Text("Compare"),
                )
            ]
        )
    )
    assert body["messages"][0]["content"][:2] == [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
    ]


@pytest.mark.parametrize(
    "image",
    [
        Image(None, url="gs://bucket/a.png", param="contents[0].parts[0]"),
        Image("application/pdf", data="JVBERi0=", param="contents[0].parts[0]"),
    ],
)
def test_images_anthropic_cannot_take_are_refused_naming_the_callers_field(image: Image) -> None:
    with pytest.raises(GatewayError) as refused:
        CODEC.write_request(caller(turns=[user(image)]), "claude", 100)
    assert (refused.value.status, refused.value.param) == (400, "contents[0].parts[0]")


def test_response_format_is_refused() -> None:
    request = caller(
        turns=[user(Text("Hi"))],
        response_format=ResponseFormat("json_object"),
        params={"response_format": "response_format"},
    )
    with pytest.raises(GatewayError) as refused:
        CODEC.write_request(request, "claude", 100)
    assert (refused.value.status, refused.value.param) == (400, "response_format")


def test_penalties_and_seed_are_dropped() -> None:
    request = caller(turns=[user(Text("Hi"))], presence_penalty=0.5, frequency_penalty=0.1, seed=7)
    body = written(request)
    assert {"presence_penalty", "frequency_penalty", "seed"}.isdisjoint(body)
    assert request.dropped == ["presence_penalty", "frequency_penalty", "seed"]


def test_a_final_assistant_prefill_loses_its_trailing_whitespace() -> None:
    body = written(caller(turns=[user(Text("Count")), assistant(Text("1, 2, "), Text("  "))]))
    assert body["messages"][-1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "1, 2,"}],
    }


@pytest.mark.parametrize(
    ("budget", "max_tokens", "thinking"),
    [
        (8192, 16000, {"type": "enabled", "budget_tokens": 8192}),
        (500, 16000, {"type": "enabled", "budget_tokens": 1024}),  # raised to the minimum
        (24576, 4096, {"type": "enabled", "budget_tokens": 4095}),  # kept under max_tokens
        (0, 4096, {"type": "disabled"}),
        (None, 4096, None),
    ],
)
def test_thinking_budget(budget: int | None, max_tokens: int, thinking: Any) -> None:
    request = caller(turns=[user(Text("Hi"))], reasoning_budget=budget, max_tokens=max_tokens)
    assert written(request).get("thinking") == thinking
    assert request.dropped == []


def test_thinking_is_left_out_where_the_api_would_refuse_it() -> None:
    too_small = caller(turns=[user(Text("Hi"))], reasoning_budget=2048, max_tokens=1000)
    forced = caller(
        turns=[user(Text("Hi"))],
        reasoning_budget=2048,
        tools=[ToolSpec("f", None, {"type": "object"})],
        tool_choice="required",
    )
    in_a_tool_loop = caller(
        turns=[
            user(Text("Hi")),
            assistant(Reasoning("gemini thought"), ToolCall("c1", "f", {})),
            user(ToolResult("c1", "f", [Text("ok")])),
        ],
        reasoning_budget=2048,
        tools=[ToolSpec("f", None, {"type": "object"})],
        params={"reasoning_budget": "reasoning_effort", "reasoning": "reasoning_content"},
    )
    for request in (too_small, forced, in_a_tool_loop):
        assert "thinking" not in written(request)
    assert too_small.dropped == forced.dropped == ["reasoning_budget"]
    assert in_a_tool_loop.dropped == ["reasoning_content", "reasoning_effort"]


def test_sampling_settings_thinking_cannot_take_are_dropped() -> None:
    request = caller(
        turns=[user(Text("Hi"))], reasoning_budget=2048, temperature=0.3, top_p=0.5, top_k=5
    )
    body = written(request)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert {"temperature", "top_p", "top_k"}.isdisjoint(body)
    assert request.dropped == ["temperature", "top_p", "top_k"]
    kept = caller(turns=[user(Text("Hi"))], reasoning_budget=2048, temperature=1, top_p=0.95)
    assert (written(kept)["temperature"], written(kept)["top_p"]) == (1, 0.95)


def test_shown_reasoning_without_a_budget_is_named_as_dropped() -> None:
    request = caller(
        turns=[user(Text("Hi"))],
        show_reasoning=True,
        params={"show_reasoning": "generationConfig.thinkingConfig.includeThoughts"},
    )
    assert "thinking" not in written(request)
    assert request.dropped == ["generationConfig.thinkingConfig.includeThoughts"]


def test_an_anthropic_callers_request_round_trips_to_an_anthropic_body() -> None:
    original = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 2048,
        "system": "Be brief.",
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Call f"}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "ok"}],
                    }
                ],
            },
        ],
    }
    assert written(read(original), model="claude-sonnet-4-5") == original


# --- read_answer: recorded Message bodies ---------------------------------------------------


def test_read_answer_with_tool_calls_and_cache_usage() -> None:
    body = b"""{
      "id": "msg_01Aq9w938a90dw8q",
      "type": "message",
      "role": "assistant",
      "model": "claude-sonnet-4-5-20250929",
      "content": [
        {"type": "text", "text": "I'll check the weather."},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
         "input": {"location": "San Francisco, CA", "unit": "celsius"}},
        {"type": "tool_use", "id": "toolu_01B09q90qw90lq917835lq9", "name": "get_time",
         "input": {}}
      ],
      "stop_reason": "tool_use",
      "stop_sequence": null,
      "usage": {"input_tokens": 12, "cache_creation_input_tokens": 50,
                "cache_read_input_tokens": 100, "output_tokens": 89,
                "cache_creation": {"ephemeral_5m_input_tokens": 50, "ephemeral_1h_input_tokens": 0},
                "service_tier": "standard"}
    }"""
    answer = CODEC.read_answer(body)
    assert answer == ChatAnswer(
        id="msg_01Aq9w938a90dw8q",
        model="claude-sonnet-4-5-20250929",
        parts=[
            Text("I'll check the weather."),
            ToolCall(
                "toolu_01A09q90qw90lq917835lq9",
                "get_weather",
                {"location": "San Francisco, CA", "unit": "celsius"},
            ),
            ToolCall("toolu_01B09q90qw90lq917835lq9", "get_time", {}),
        ],
        stop="tool_calls",
        usage=Usage(162, 89, cache_read_tokens=100, cache_write_tokens=50),
    )


def test_read_answer_with_thinking_and_redacted_thinking() -> None:
    body = b"""{"id":"msg_02","type":"message","role":"assistant","model":"claude-opus-4-1",
      "content":[
        {"type":"thinking","thinking":"Let me analyze this.","signature":"WaUjzkypQ2mUEVM36O2T"},
        {"type":"redacted_thinking","data":"EmwKAhgBEgy3va3pzix/LafPsn4a"},
        {"type":"text","text":"The answer is 42."}],
      "stop_reason":"end_turn","stop_sequence":null,
      "usage":{"input_tokens":40,"output_tokens":300}}"""
    answer = CODEC.read_answer(body)
    assert answer.parts == [
        Reasoning("Let me analyze this.", "WaUjzkypQ2mUEVM36O2T"),
        Text("The answer is 42."),
    ]
    assert answer.stop == "stop" and answer.usage == Usage(40, 300)


@pytest.mark.parametrize(
    ("stop_reason", "stop_sequence", "stop"),
    [
        ("end_turn", None, "stop"),
        ("stop_sequence", "###", "stop"),
        ("pause_turn", None, "stop"),
        ("max_tokens", None, "length"),
        ("model_context_window_exceeded", None, "length"),
        ("tool_use", None, "tool_calls"),
        ("refusal", None, "content_filter"),
    ],
)
def test_read_answer_stop_reasons(stop_reason: str, stop_sequence: str | None, stop: str) -> None:
    body = json.dumps(
        {
            "id": "msg_03",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5",
            "content": [],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    ).encode()
    answer = CODEC.read_answer(body)
    assert (answer.stop, answer.stop_sequence) == (stop, stop_sequence)


# --- answer_reader: recorded streams --------------------------------------------------------

TOOL_STREAM = r"""
event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,"cache_read_input_tokens":1024,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay, let's check"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" the weather:"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \"San Francisco, CA\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01QKzy6CY5TVJ4zLSG7H2Cq1","name":"get_time","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"input_tokens":472,"cache_read_input_tokens":1024,"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}
"""  # noqa: E501


def test_answer_reader_reads_a_tool_use_stream_with_cache_usage() -> None:
    assert read_stream(TOOL_STREAM) == [
        Started(
            "msg_014p7gG3wDgGV9EUtLvnow3U",
            "claude-sonnet-4-5-20250929",
            Usage(1496, 2, cache_read_tokens=1024),
        ),
        TextDelta("Okay, let's check"),
        TextDelta(" the weather:"),
        ToolCallStarted(0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather"),
        ToolArgumentsDelta(0, '{"location":'),
        ToolArgumentsDelta(0, ' "San Francisco, CA"}'),
        ToolCallStarted(1, "toolu_01QKzy6CY5TVJ4zLSG7H2Cq1", "get_time"),
        ToolArgumentsDelta(1, "{}"),
        Finished("tool_calls"),
        UsageReport(Usage(1496, 89, cache_read_tokens=1024)),
    ]


THINKING_STREAM = r"""
event: message_start
data: {"type": "message_start", "message": {"id": "msg_01", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-4-1", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 40, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 0, "output_tokens": 1}}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me solve this step by step:\n\n1. First break down 27 * 453"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: content_block_start
data: {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "27 * 453 = 12,231"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 1}

event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": null}, "usage": {"output_tokens": 2000}}

event: message_stop
data: {"type": "message_stop"}
"""  # noqa: E501


def test_answer_reader_reads_thinking_and_keeps_start_input_when_the_end_omits_it() -> None:
    events = read_stream(THINKING_STREAM)
    assert events[1:] == [
        ReasoningDelta("Let me solve this step by step:\n\n1. First break down 27 * 453"),
        ReasoningDelta("", signature="EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"),
        TextDelta("27 * 453 = 12,231"),
        Finished("length"),
        UsageReport(Usage(70, 2000, cache_write_tokens=30)),
    ]


def test_answer_reader_reads_a_stop_sequence() -> None:
    reader = CODEC.answer_reader()
    data = (
        b'{"type":"message_delta","delta":{"stop_reason":"stop_sequence","stop_sequence":"###"},'
        b'"usage":{"output_tokens":7}}'
    )
    assert reader.feed("message_delta", data) == [
        Finished("stop", "###"),
        UsageReport(Usage(0, 7)),
    ]


def test_answer_reader_raises_an_error_event_as_the_upstreams_error() -> None:
    reader = CODEC.answer_reader()
    with pytest.raises(GatewayError) as failed:
        reader.feed(
            "error",
            b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}',
        )
    assert failed.value.status == 529 and "Overloaded" in failed.value.message


# --- write_answer: Message bodies the SDK accepts --------------------------------------------


def test_write_answer_with_tool_calls_converts_usage_to_anthropics_meaning() -> None:
    answer = ChatAnswer(
        id="chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        model="gpt-4o-2024-08-06",
        parts=[
            Text("Let me look."),
            ToolCall("call_abc", "get_weather", {"city": "Paris"}),
            ToolCall("call_def", "get_weather", {"city": "Rome"}),
        ],
        stop="tool_calls",
        usage=Usage(1200, 40, cache_read_tokens=1024),
    )
    message = Message.model_validate_json(CODEC.write_answer(answer, caller()))
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert message.model_dump()["content"][2] == {
        "type": "tool_use",
        "id": "call_def",
        "name": "get_weather",
        "input": {"city": "Rome"},
        "caller": None,
        "toolset_name": None,
    }
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (176, 1024)
    assert (message.usage.cache_creation_input_tokens, message.usage.output_tokens) == (0, 40)


def test_write_answer_shows_reasoning_only_when_asked() -> None:
    answer = ChatAnswer(
        id="msg_x",
        model="gemini-2.5-pro",
        parts=[Reasoning("**Weighing it up**"), Text("Yes.")],
        stop="stop",
        usage=None,
    )
    hidden = Message.model_validate_json(CODEC.write_answer(answer, caller()))
    assert [block.type for block in hidden.content] == ["text"]
    shown = Message.model_validate_json(CODEC.write_answer(answer, caller(show_reasoning=True)))
    assert shown.model_dump()["content"][0] == {
        "type": "thinking",
        "thinking": "**Weighing it up**",
        "signature": "",
    }
    assert (shown.usage.input_tokens, shown.usage.output_tokens) == (0, 0)


@pytest.mark.parametrize(
    ("stop", "stop_sequence", "stop_reason"),
    [
        ("stop", None, "end_turn"),
        ("stop", "###", "stop_sequence"),
        ("length", None, "max_tokens"),
        ("tool_calls", None, "tool_use"),
        ("content_filter", None, "refusal"),
    ],
)
def test_write_answer_stop_reasons(stop: Any, stop_sequence: str | None, stop_reason: str) -> None:
    answer = ChatAnswer("id", "m", [], stop, Usage(3, 1), stop_sequence=stop_sequence)
    message = Message.model_validate_json(CODEC.write_answer(answer, caller()))
    assert (message.stop_reason, message.stop_sequence) == (stop_reason, stop_sequence)


# --- answer_writer: event streams the SDK accepts ---------------------------------------------


def test_answer_writer_streams_text_as_it_arrives_and_ends_with_usage() -> None:
    chunks, tail = write_stream(
        caller(),
        [
            Started("chatcmpl-1", "gpt-4o"),
            TextDelta("Hel"),
            TextDelta("lo"),
            Finished("stop"),
            UsageReport(Usage(13, 5, cache_read_tokens=8)),
        ],
    )
    # Each event leaves as soon as it can: Finished closes the open block at once, and its
    # stop reason waits for the usage after it (message_delta carries both).
    assert all(chunks) and tail == b""
    assert b"message_delta" not in chunks[3] and b"message_delta" in chunks[4]
    events = parsed_events(b"".join(chunks))
    assert [event["type"] for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[5]["usage"] == {
        "input_tokens": 5,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 8,
    }
    message = accumulated(events)
    assert message.id == "chatcmpl-1" and message.stop_reason == "end_turn"
    assert message.content[0].type == "text" and message.content[0].text == "Hello"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 5)


def test_answer_writer_streams_parallel_tool_calls() -> None:
    chunks, tail = write_stream(
        caller(),
        [
            Started("msg_1", "gemini-2.5-flash", Usage(100, 0, cache_read_tokens=60)),
            TextDelta("Checking."),
            ToolCallStarted(0, "call_a", "get_weather"),
            ToolArgumentsDelta(0, '{"city":'),
            ToolArgumentsDelta(0, ' "Paris"}'),
            ToolCallStarted(1, "call_b", "get_weather"),
            ToolArgumentsDelta(1, '{"city": "Rome"}'),
            Finished("tool_calls"),
        ],
    )
    events = parsed_events(b"".join(chunks) + tail)
    assert events[0]["message"]["usage"]["input_tokens"] == 40
    message = accumulated(events)
    assert message.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in message.content] == [
        ("text", None),
        ("tool_use", {"city": "Paris"}),
        ("tool_use", {"city": "Rome"}),
    ]
    # No usage was reported: close() still ends the stream whole.
    assert events[-2]["usage"] == {"output_tokens": 0}


def test_answer_writer_writes_reasoning_as_thinking_blocks_only_when_asked() -> None:
    events: list[StreamEvent] = [
        Started("msg_1", "gpt-5"),
        ReasoningDelta("Thinking "),
        ReasoningDelta("hard."),
        ReasoningDelta("", signature="sig-1"),
        ReasoningDelta("Again."),
        TextDelta("Done."),
        Finished("length"),
        UsageReport(Usage(10, 4000)),
    ]
    shown = accumulated(
        parsed_events(b"".join(write_stream(caller(show_reasoning=True), events)[0]))
    )
    assert [block.model_dump(exclude_none=True) for block in shown.content] == [
        {"type": "thinking", "thinking": "Thinking hard.", "signature": "sig-1"},
        {"type": "thinking", "thinking": "Again.", "signature": ""},
        {"type": "text", "text": "Done."},
    ]
    assert shown.stop_reason == "max_tokens"
    hidden = accumulated(parsed_events(b"".join(write_stream(caller(), events)[0])))
    assert [block.type for block in hidden.content] == ["text"]


def test_answer_writer_close_without_finished_or_started_is_still_a_whole_stream() -> None:
    writer = CODEC.answer_writer(caller())
    events = parsed_events(writer.feed(TextDelta("partial")) + writer.close())
    message = accumulated(events)
    assert message.model == "claude-sonnet-4-5" and message.stop_reason == "end_turn"
    assert writer.close() == b"" and writer.feed(TextDelta("late")) == b""


def test_answer_writer_keeps_the_stop_sequence() -> None:
    chunks, tail = write_stream(
        caller(), [Started("m", "gpt-4o"), TextDelta("a"), Finished("stop", "###")]
    )
    message = accumulated(parsed_events(b"".join(chunks) + tail))
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "###")


# --- error_message ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"type":"error","error":{"type":"rate_limit_error","message":"Number of requests '
            b'has exceeded your rate limit."},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}',
            "Number of requests has exceeded your rate limit.",
        ),
        (b"<html>502 Bad Gateway</html>", "<html>502 Bad Gateway</html>"),
        (b'{"detail": "nope"}', '{"detail": "nope"}'),
        (b"x" * 2000, "x" * 512),
    ],
)
def test_error_message(body: bytes, message: str) -> None:
    assert CODEC.error_message(body) == message


def test_codec_identity() -> None:
    assert CODEC.name == "anthropic"
    assert CODEC.upstream_route(caller()) is Route.MESSAGES
