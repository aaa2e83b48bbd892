"""The OpenAI Chat Completions codec (translation/openai_chat.py): requests read from and
written for OpenAI chat, answers and streams read from an OpenAI upstream (recorded wire
examples) and written for an OpenAI caller (checked with the official SDK's own types)."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import msgspec
import openai
import pydantic
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.completion_create_params import CompletionCreateParamsStreaming

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.base import Route, Usage, sse_event_fields
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
from ratelimit_gw.protocols.translation.openai_chat import OpenAIChatCodec

CODEC = OpenAIChatCodec()

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
WEATHER_SPEC = ToolSpec(
    "get_weather",
    "Current weather in a city",
    {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
)


def read(body: dict[str, Any]) -> ChatRequest:
    return CODEC.read_request(json.dumps(body).encode(), Route.CHAT, None)


def refused(body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        read(body)
    assert caught.value.status == 400
    return caught.value


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "messages": list(messages), **fields}


USER_HI = {"role": "user", "content": "Hi"}


# --- read_request: recorded requests --------------------------------------------------------

# What the openai SDK sent for an agent's second round: a developer prompt, parallel tool
# calls answered by two tool messages (one with a list of parts), a mid-conversation system
# message, two user messages in a row (the second with an image).
AGENT_REQUEST: dict[str, Any] = {
    "messages": [
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": "What's the weather in Paris and Bogotá?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_7ZLnLYQAykXOxPmg2yD35FXW",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                },
                {
                    "id": "call_Q6CBpIaNxRa9H4dADsVDgn4c",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Bogotá"}'},
                },
            ],
            "refusal": None,
        },
        {
            "role": "tool",
            "tool_call_id": "call_7ZLnLYQAykXOxPmg2yD35FXW",
            "content": "18°C, cloudy",
        },
        {
            "role": "tool",
            "tool_call_id": "call_Q6CBpIaNxRa9H4dADsVDgn4c",
            "content": [{"type": "text", "text": "24°C"}, {"type": "text", "text": ", sunny"}],
        },
        {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Thanks."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And this one?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        },
    ],
    "model": "claude-sonnet-4-5",
    "max_completion_tokens": 1024,
    "parallel_tool_calls": True,
    "stream": True,
    "stream_options": {"include_usage": True},
    "temperature": 0.2,
    "top_p": 0.9,
    "stop": ["\n\nHuman:"],
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "seed": 7,
    "tool_choice": "auto",
    "tools": [WEATHER_TOOL],
}


def test_agent_request_reads_into_turns_with_tool_results_in_a_user_turn() -> None:
    request = read(AGENT_REQUEST)

    assert request.model == "claude-sonnet-4-5"
    assert request.stream and request.include_usage
    # Several system messages, anywhere, merged in order.
    assert request.system == ["You are terse.", "Answer in French."]
    paris, bogota = "call_7ZLnLYQAykXOxPmg2yD35FXW", "call_Q6CBpIaNxRa9H4dADsVDgn4c"
    assert request.turns == [
        Turn("user", [Text("What's the weather in Paris and Bogotá?")]),
        Turn(
            "assistant",
            [
                ToolCall(paris, "get_weather", {"location": "Paris"}),
                ToolCall(bogota, "get_weather", {"location": "Bogotá"}),
            ],
        ),
        # Both tool messages answer one assistant turn: one user turn, names paired.
        Turn(
            "user",
            [
                ToolResult(paris, "get_weather", [Text("18°C, cloudy")]),
                ToolResult(bogota, "get_weather", [Text("24°C"), Text(", sunny")]),
            ],
        ),
        # Consecutive user messages stay two turns: a writer that needs alternation merges.
        Turn("user", [Text("Thanks.")]),
        Turn(
            "user",
            [
                Text("And this one?"),
                Image("image/png", data="iVBORw0KGgo=", param="messages[7].content[1]"),
                Image(None, url="https://example.com/cat.jpg", param="messages[7].content[2]"),
            ],
        ),
    ]
    assert request.max_tokens == 1024
    assert request.param("max_tokens") == "max_completion_tokens"
    assert (request.temperature, request.top_p, request.seed) == (0.2, 0.9, 7)
    assert (request.presence_penalty, request.frequency_penalty) == (0.5, 0.25)
    assert request.stop == ["\n\nHuman:"]
    assert request.tools == [WEATHER_SPEC]
    assert request.tool_choice == "auto"
    assert request.parallel_tool_calls is True
    assert request.dropped == []


def test_a_plain_request_has_no_stream_usage_and_drops_nothing() -> None:
    request = read(chat(USER_HI, stream_options={"include_usage": True}))

    assert not request.stream and not request.include_usage
    assert request.turns == [Turn("user", [Text("Hi")])]
    assert request.system == [] and request.dropped == []


def test_legacy_max_tokens_and_a_stop_string() -> None:
    request = read(chat(USER_HI, max_tokens=300, stop="END"))

    assert request.max_tokens == 300
    assert request.param("max_tokens") == "max_tokens"
    assert request.stop == ["END"]


def test_both_caps_given_the_larger_is_sent_as_the_adapter_holds_it() -> None:
    request = read(chat(USER_HI, max_tokens=300, max_completion_tokens=500))

    assert request.max_tokens == 500


@pytest.mark.parametrize(
    ("effort", "budget"),
    [
        ("none", 0),
        ("minimal", 1024),
        ("low", 2048),
        ("medium", 8192),
        ("high", 24576),
        ("xhigh", 24576),
        ("max", 24576),
    ],
)
def test_reasoning_effort_reads_as_a_thinking_budget(effort: str, budget: int) -> None:
    request = read(chat(USER_HI, reasoning_effort=effort))

    assert request.reasoning_budget == budget
    assert request.param("reasoning_budget") == "reasoning_effort"
    assert not request.show_reasoning  # an OpenAI caller has no place to be shown it


def test_response_formats() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    json_schema = {"name": "city", "schema": schema, "strict": True}

    assert read(chat(USER_HI, response_format={"type": "text"})).response_format is None
    assert read(chat(USER_HI, response_format={"type": "json_object"})).response_format == (
        ResponseFormat("json_object")
    )
    given = {"type": "json_schema", "json_schema": json_schema}
    assert read(chat(USER_HI, response_format=given)).response_format == ResponseFormat(
        "json_schema", schema=schema, name="city", strict=True
    )


@pytest.mark.parametrize(
    ("given", "choice"),
    [
        ("none", "none"),
        ("required", "required"),
        ({"type": "function", "function": {"name": "get_weather"}}, NamedTool("get_weather")),
    ],
)
def test_tool_choices(given: Any, choice: Any) -> None:
    assert read(chat(USER_HI, tools=[WEATHER_TOOL], tool_choice=given)).tool_choice == choice


def test_allowed_tools_offers_only_those_tools() -> None:
    time_tool = {"type": "function", "function": {"name": "get_time"}}
    allowed = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "get_time"}}],
        },
    }
    request = read(chat(USER_HI, tools=[WEATHER_TOOL, time_tool], tool_choice=allowed))

    # A tool with no parameters gets the empty object schema the targets need.
    assert request.tools == [ToolSpec("get_time", None, {"type": "object", "properties": {}})]
    assert request.tool_choice == "required"


def test_reasoning_content_in_history_reads_as_reasoning() -> None:
    # DeepSeek-style clients echo the reasoning they were sent.
    assistant = {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4."}
    request = read(chat(USER_HI, assistant, {"role": "user", "content": "Sure?"}))

    assert request.turns[1] == Turn("assistant", [Reasoning("2+2 is 4."), Text("4")])
    # A writer that drops it names the caller's field.
    request.drop("reasoning")
    assert request.dropped == ["messages[].reasoning_content"]


def test_history_details_empty_arguments_refusal_text_and_silent_assistant() -> None:
    request = read(
        chat(
            USER_HI,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "now", "arguments": ""}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "noon"},
            {"role": "tool", "tool_call_id": "unknown", "content": "?"},
            {"role": "assistant", "content": None, "refusal": "I can't help with that."},
            {"role": "assistant", "content": None},
            {"role": "user", "content": "ok"},
        )
    )

    assert request.turns[1:] == [
        Turn("assistant", [ToolCall("c1", "now", {})]),
        Turn(
            "user",
            [ToolResult("c1", "now", [Text("noon")]), ToolResult("unknown", None, [Text("?")])],
        ),
        Turn("assistant", [Text("I can't help with that.")]),
        Turn("user", [Text("ok")]),
    ]


# --- read_request: refusals and drops -------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True, "top_logprobs": 3}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"response_format": {"type": "grammar"}}, "response_format"),
        ({"tools": [{"type": "custom", "custom": {"name": "sql"}}]}, "tools[0]"),
        ({"tool_choice": {"type": "custom", "custom": {"name": "sql"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_fields_no_target_can_honour_are_refused(fields: dict[str, Any], param: str) -> None:
    err = refused(chat(USER_HI, **fields))

    assert err.param == param
    assert err.reason == "invalid_request"
    assert err.message.startswith(f"'{param}' is not supported on this converter route: ")


@pytest.mark.parametrize(
    ("message", "param"),
    [
        (
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}}
                ],
            },
            "messages[0].content[0]",
        ),
        (
            {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]},
            "messages[0].content[0]",
        ),
        (
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/svg+xml,%3Csvg%3E"}}
                ],
            },
            "messages[0].content[0]",
        ),
        ({"role": "function", "name": "f", "content": "x"}, "messages[0].role"),
        ({"role": "assistant", "audio": {"id": "audio_abc"}}, "messages[0].audio"),
        (
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
                ],
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{'a'"}}
                ],
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {
                "role": "system",
                "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
            },
            "messages[0].content[0]",
        ),
    ],
)
def test_message_parts_no_target_can_take_are_refused(message: dict[str, Any], param: str) -> None:
    err = refused(chat(message))

    assert err.param == param
    assert err.message.startswith(f"'{param}' is not supported on this converter route: ")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat({"role": "user", "content": 5}), "messages[0].content"),
        (chat({"content": "no role"}), "messages[0]"),
        ({"model": "m"}, "messages"),
        (chat(USER_HI, temperature="hot"), "temperature"),
        (chat({"role": "tool", "content": "x"}), "messages[0].tool_call_id"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    assert refused(body).param == param


def test_a_request_without_a_model_is_refused() -> None:
    with pytest.raises(GatewayError) as caught:
        read({"messages": [USER_HI]})
    assert caught.value.reason == "missing_model"


def test_a_request_that_is_no_object_is_invalid_json() -> None:
    with pytest.raises(GatewayError) as caught:
        CODEC.read_request(b"[1]", Route.CHAT, None)
    assert caught.value.reason == "invalid_json"


def test_tuning_and_unknown_fields_are_dropped_and_named() -> None:
    strict_tool = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "strict": True}}
    image = {
        "type": "image_url",
        "image_url": {"url": "https://example.com/a.png", "detail": "low"},
        "cache_control": {"type": "ephemeral"},
    }
    body = chat(
        {"role": "user", "name": "alice", "content": [image]},
        user="alice",
        metadata={"team": "a"},
        service_tier="flex",
        store=True,
        prediction={"type": "content", "content": "x"},
        logit_bias={"50256": -100},
        safety_identifier="h",
        prompt_cache_key="k",
        verbosity="low",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "r", "description": "why", "schema": {"type": "object"}},
        },
        stream=True,
        stream_options={"include_usage": False, "include_obfuscation": True},
        tools=[strict_tool],
        x_vendor_option=1,
        n=1,
        logprobs=False,
        modalities=["text"],
        seed=None,
    )
    request = read(body)

    assert request.dropped == [
        "stream_options.include_obfuscation",
        "response_format.json_schema.description",
        "user",
        "metadata",
        "service_tier",
        "store",
        "prediction",
        "logit_bias",
        "safety_identifier",
        "prompt_cache_key",
        "verbosity",
        "x_vendor_option",
        "messages[].name",
        "messages[].content[].cache_control",
        "messages[].content[].image_url.detail",
        "tools[].function.strict",
    ]


# --- write_request --------------------------------------------------------------------------

_STREAM_PARAMS = pydantic.TypeAdapter(CompletionCreateParamsStreaming)


def _materialise(value: Any) -> Any:
    """Run pydantic's lazy validators (the SDK types its lists as Iterable)."""
    if isinstance(value, dict):
        return {key: _materialise(item) for key, item in value.items()}
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    return [_materialise(item) for item in value]


def assert_openai_accepts(body: bytes) -> dict[str, Any]:
    """The body parses as the SDK's own streaming chat request params."""
    doc: dict[str, Any] = json.loads(body)
    _materialise(_STREAM_PARAMS.validate_python({**doc, "stream": True}))
    return doc


def full_request() -> ChatRequest:
    """What another protocol's reader makes of an agent's conversation."""
    return ChatRequest(
        model="gpt-4o",
        stream=True,
        system=["You are terse.", "Answer in French."],
        turns=[
            Turn("user", [Text("Weather in Paris?"), Image("image/jpeg", data="/9j/4AAQ")]),
            Turn("user", [Text("And Bogotá?")]),
            Turn(
                "assistant",
                [
                    Reasoning("Two cities: two calls.", signature="EqQBCkgIARABGAIiQL"),
                    Text("Checking "),
                    Text("both."),
                    ToolCall("toolu_01", "get_weather", {"location": "Paris"}),
                    ToolCall("toolu_02", "get_weather", {"location": "Bogotá"}),
                ],
            ),
            Turn(
                "user",
                [
                    ToolResult("toolu_01", "get_weather", [Text("18°C")]),
                    ToolResult(
                        "toolu_02",
                        "get_weather",
                        [Text("24°C"), Image("image/png", data="iVBORw0KGgo=")],
                        is_error=False,
                    ),
                    Text("Summarise."),
                ],
            ),
        ],
        max_tokens=512,
        temperature=0.3,
        top_p=0.8,
        stop=["END"],
        presence_penalty=0.1,
        frequency_penalty=0.2,
        seed=11,
        tools=[WEATHER_SPEC],
        tool_choice=NamedTool("get_weather"),
        parallel_tool_calls=False,
        response_format=ResponseFormat("json_schema", schema={"type": "object"}, strict=True),
        reasoning_budget=5000,
        params={"reasoning": "thinking", "max_tokens": "max_tokens"},
    )


def test_write_request_emits_the_chat_request_openai_takes() -> None:
    request = full_request()
    doc = assert_openai_accepts(CODEC.write_request(request, "gpt-4o-2024-08-06", 4096))

    assert doc == {
        "model": "gpt-4o-2024-08-06",
        "messages": [
            {"role": "system", "content": "You are terse.\n\nAnswer in French."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in Paris?"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                ],
            },
            {"role": "user", "content": "And Bogotá?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "toolu_01",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
                    },
                    {
                        "id": "toolu_02",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Bogotá"}'},
                    },
                ],
            },
            # Tool results right after the calls; the turn's own text (and the image a tool
            # returned, which a tool message cannot carry) after them.
            {"role": "tool", "tool_call_id": "toolu_01", "content": "18°C"},
            {"role": "tool", "tool_call_id": "toolu_02", "content": "24°C"},
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {"type": "text", "text": "Summarise."},
                ],
            },
        ],
        "max_completion_tokens": 512,
        "temperature": 0.3,
        "top_p": 0.8,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "seed": 11,
        "stop": ["END"],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": {"type": "object"}, "strict": True},
        },
        "reasoning_effort": "medium",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather in a city",
                    "parameters": WEATHER_SPEC.parameters,
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # The other vendor's reasoning (signature and all) is never sent; its field is named.
    assert request.dropped == ["thinking"]
    assert CODEC.upstream_route(request) is Route.CHAT


def test_a_stream_always_asks_for_the_usage_chunk_and_no_cap_is_invented() -> None:
    request = ChatRequest(model="m", stream=True, turns=[Turn("user", [Text("Hi")])])
    doc = assert_openai_accepts(CODEC.write_request(request, "gpt-4o-mini", 4096))

    assert doc == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert request.dropped == []


def test_write_request_drops_what_openai_lacks_and_names_the_callers_fields() -> None:
    request = ChatRequest(
        model="m",
        stream=False,
        turns=[
            Turn("user", [Text("Hi")]),
            Turn("assistant", [Reasoning("only thought", signature="sig")]),
            Turn("user", [ToolResult("c1", "f", [Text("boom")], is_error=True)]),
        ],
        top_k=40,
        reasoning_budget=0,
        show_reasoning=True,
        tool_choice="required",
        parallel_tool_calls=True,
        params={
            "top_k": "generationConfig.topK",
            "reasoning_budget": "generationConfig.thinkingConfig.thinkingBudget",
            "show_reasoning": "generationConfig.thinkingConfig.includeThoughts",
            "tool_choice": "toolConfig.functionCallingConfig.mode",
        },
    )
    doc = json.loads(CODEC.write_request(request, "gpt-4o", 4096))

    # The assistant turn held only reasoning: nothing of it is sent.
    assert doc == {
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "tool", "tool_call_id": "c1", "content": "boom"},
        ],
    }
    assert request.dropped == [
        "reasoning",
        "is_error",
        "generationConfig.topK",
        "generationConfig.thinkingConfig.thinkingBudget",
        "generationConfig.thinkingConfig.includeThoughts",
        "toolConfig.functionCallingConfig.mode",
        "parallel_tool_calls",
    ]


def test_json_object_mode_and_a_tool_without_parameters() -> None:
    request = ChatRequest(
        model="m",
        stream=False,
        turns=[Turn("user", [Text("List as JSON")])],
        tools=[ToolSpec("now", None, {})],
        tool_choice="auto",
        response_format=ResponseFormat("json_object"),
        reasoning_budget=30000,
    )
    doc = assert_openai_accepts(CODEC.write_request(request, "o4-mini", 4096))

    assert doc["response_format"] == {"type": "json_object"}
    assert doc["tools"] == [
        {
            "type": "function",
            "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    assert doc["tool_choice"] == "auto"
    assert doc["reasoning_effort"] == "high"


def test_an_image_in_an_assistant_turn_is_refused() -> None:
    image = Image("image/png", data="AAAA", param="contents[1].parts[0]")
    request = ChatRequest(model="m", stream=False, turns=[Turn("assistant", [image])])
    with pytest.raises(GatewayError) as caught:
        CODEC.write_request(request, "gpt-4o", 4096)
    assert caught.value.param == "contents[1].parts[0]"


def test_an_openai_request_survives_the_round_trip() -> None:
    """Read and written again, an OpenAI request says what it said (names paired, tool
    messages in place, settings kept)."""
    body = {**AGENT_REQUEST, "messages": AGENT_REQUEST["messages"][:5]}
    doc = json.loads(CODEC.write_request(read(body), "gpt-4o", 4096))

    original, sent = body["messages"], doc["messages"]
    assert sent[0] == {"role": "system", "content": "You are terse."}  # was developer
    assert sent[1] == original[1]
    assert sent[3:] == original[3:]  # the tool messages, one with a list of parts
    assert sent[2]["content"] is None
    for mine, theirs in zip(sent[2]["tool_calls"], original[2]["tool_calls"], strict=True):
        assert (mine["id"], mine["type"]) == (theirs["id"], theirs["type"])
        assert mine["function"]["name"] == theirs["function"]["name"]
        arguments = mine["function"]["arguments"], theirs["function"]["arguments"]
        assert json.loads(arguments[0]) == json.loads(arguments[1])
    for name in ("max_completion_tokens", "temperature", "stop", "seed", "parallel_tool_calls"):
        assert doc[name] == AGENT_REQUEST[name]


# --- read_answer: recorded completions ------------------------------------------------------

TEXT_COMPLETION = b"""{
  "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
  "object": "chat.completion",
  "created": 1741570283,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "The image shows a wooden boardwalk.",
        "refusal": null,
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 1117,
    "completion_tokens": 46,
    "total_tokens": 1163,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
      "reasoning_tokens": 0,
      "audio_tokens": 0,
      "accepted_prediction_tokens": 0,
      "rejected_prediction_tokens": 0
    }
  },
  "service_tier": "default",
  "system_fingerprint": "fp_fc9f1d7035"
}"""

TOOL_CALLS_COMPLETION = b"""{
  "id": "chatcmpl-BQ4mXk3bqkYd5Ld3OaZlPpEgjgq3n",
  "object": "chat.completion",
  "created": 1745784000,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": null,
        "tool_calls": [
          {
            "id": "call_7ZLnLYQAykXOxPmg2yD35FXW",
            "type": "function",
            "function": {"name": "get_weather", "arguments": "{\\"location\\": \\"Paris\\"}"}
          },
          {
            "id": "call_Q6CBpIaNxRa9H4dADsVDgn4c",
            "type": "function",
            "function": {
              "name": "get_weather",
              "arguments": "{\\"location\\": \\"Bogot\xc3\xa1\\"}"
            }
          }
        ],
        "refusal": null,
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "tool_calls"
    }
  ],
  "usage": {
    "prompt_tokens": 82,
    "completion_tokens": 51,
    "total_tokens": 133,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}
  },
  "service_tier": "default",
  "system_fingerprint": "fp_f5bdcc3276"
}"""


def test_read_answer_text_with_cached_usage() -> None:
    answer = CODEC.read_answer(TEXT_COMPLETION)

    assert answer == ChatAnswer(
        id="chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        model="gpt-4o-2024-08-06",
        parts=[Text("The image shows a wooden boardwalk.")],
        stop="stop",
        usage=Usage(1117, 46, cache_read_tokens=1024),
    )


def test_read_answer_parallel_tool_calls_with_parsed_arguments() -> None:
    answer = CODEC.read_answer(TOOL_CALLS_COMPLETION)

    assert answer.parts == [
        ToolCall("call_7ZLnLYQAykXOxPmg2yD35FXW", "get_weather", {"location": "Paris"}),
        ToolCall("call_Q6CBpIaNxRa9H4dADsVDgn4c", "get_weather", {"location": "Bogotá"}),
    ]
    assert answer.stop == "tool_calls"
    assert answer.usage == Usage(82, 51)


def completion(message: dict[str, Any], finish_reason: str | None, **extra: Any) -> bytes:
    choice = {
        "index": 0,
        "message": {"role": "assistant", **message},
        "finish_reason": finish_reason,
    }
    body = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }
    return json.dumps({**body, **extra}).encode()


@pytest.mark.parametrize(
    ("message", "finish_reason", "stop"),
    [
        ({"content": "cut"}, "length", "length"),
        ({"content": None}, "content_filter", "content_filter"),
        # Structured outputs' refusal: its text is the answer, and it is a refusal.
        ({"content": None, "refusal": "I'm sorry, I can't help."}, "stop", "content_filter"),
        ({"content": "x"}, "function_call", "tool_calls"),
        ({"content": "x"}, None, "stop"),
        # OpenAI-compatible servers (Gemini's, some vLLM builds) end tool calls with "stop".
        (
            {
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            "stop",
            "tool_calls",
        ),
    ],
)
def test_read_answer_stop_reasons(
    message: dict[str, Any], finish_reason: str | None, stop: str
) -> None:
    assert CODEC.read_answer(completion(message, finish_reason)).stop == stop


def test_read_answer_reasoning_content_from_a_compatible_upstream() -> None:
    # DeepSeek's deepseek-reasoner answer, as recorded.
    body = completion(
        {"content": "9.11 is smaller.", "reasoning_content": "Compare 9.11 and 9.8..."},
        "stop",
        usage={
            "prompt_tokens": 17,
            "completion_tokens": 300,
            "total_tokens": 317,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 280},
            "prompt_cache_hit_tokens": 0,
            "prompt_cache_miss_tokens": 17,
        },
    )
    answer = CODEC.read_answer(body)

    assert answer.parts == [Reasoning("Compare 9.11 and 9.8..."), Text("9.11 is smaller.")]
    assert answer.usage == Usage(17, 300)


def test_read_answer_reasoning_field_from_a_compatible_upstream() -> None:
    # OpenRouter, Groq and newer vLLM name the reasoning text "reasoning".
    answer = CODEC.read_answer(completion({"content": "Hi", "reasoning": "Greet back."}, "stop"))

    assert answer.parts == [Reasoning("Greet back."), Text("Hi")]


def test_read_answer_arguments_cut_short_keep_the_call() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "write", "arguments": '{"text": "Once up'},
    }
    answer = CODEC.read_answer(completion({"content": None, "tool_calls": [call]}, "length"))

    assert answer.parts == [ToolCall("call_1", "write", {})]
    assert answer.stop == "length"


def test_read_answer_without_usage_or_choices() -> None:
    answer = CODEC.read_answer(
        b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[]}'
    )

    assert answer == ChatAnswer("c", "m", [], "stop", None)


def test_read_answer_of_no_completion_raises_what_the_relay_turns_into_a_502() -> None:
    with pytest.raises(msgspec.DecodeError):
        CODEC.read_answer(b"<html>Bad gateway</html>")
    with pytest.raises(msgspec.DecodeError):
        CODEC.read_answer(b'{"choices": "none"}')


# --- answer_reader: recorded streams --------------------------------------------------------


def read_stream(wire: bytes) -> list[StreamEvent]:
    """Feed a recorded SSE stream event by event, as the relay's tap does."""
    reader = CODEC.answer_reader()
    events: list[StreamEvent] = []
    for event in wire.split(b"\n\n"):
        name, data = sse_event_fields(event)
        if data is not None:
            events.extend(reader.feed(name, data))
    return events


TEXT_STREAM = (
    b'data: {"id":"chatcmpl-BVb7x","object":"chat.completion.chunk","created":1746800000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"yA3E"}\n\n'
    b'data: {"id":"chatcmpl-BVb7x","object":"chat.completion.chunk","created":1746800000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0",'
    b'"choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],'
    b'"usage":null,"obfuscation":"Tq"}\n\n'
    b'data: {"id":"chatcmpl-BVb7x","object":"chat.completion.chunk","created":1746800000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0",'
    b'"choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":null}],'
    b'"usage":null,"obfuscation":"x9PqT"}\n\n'
    b'data: {"id":"chatcmpl-BVb7x","object":"chat.completion.chunk","created":1746800000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null,'
    b'"obfuscation":"m"}\n\n'
    b'data: {"id":"chatcmpl-BVb7x","object":"chat.completion.chunk","created":1746800000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_dbaca60df0",'
    b'"choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":3,"total_tokens":2009,'
    b'"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"u7"}\n\n'
    b"data: [DONE]\n\n"
)


def test_answer_reader_text_stream_with_cached_usage() -> None:
    assert read_stream(TEXT_STREAM) == [
        Started("chatcmpl-BVb7x", "gpt-4o-mini-2024-07-18"),
        TextDelta("Hello"),
        TextDelta("!"),
        Finished("stop"),
        UsageReport(Usage(2006, 3, cache_read_tokens=1920)),
    ]


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-BQ5",
        "object": "chat.completion.chunk",
        "created": 1745784100,
        "model": "gpt-4.1-2025-04-14",
        "system_fingerprint": "fp_b3f1157249",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": None,
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _args(index: int, fragment: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}


# Two parallel calls, each named in its first delta and then sent in argument fragments.
PARALLEL_TOOL_STREAM = b"".join(
    [
        _chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
                "refusal": None,
            }
        ),
        _chunk(_args(0, '{"lo')),
        _chunk(_args(0, 'cation": "Paris"}')),
        _chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_b2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    }
                ]
            }
        ),
        _chunk(_args(1, '{"tz": "Europe/Paris"}')),
        _chunk({}, "tool_calls"),
        b'data: {"id":"chatcmpl-BQ5","object":"chat.completion.chunk","created":1745784100,'
        b'"model":"gpt-4.1-2025-04-14","system_fingerprint":"fp_b3f1157249","choices":[],'
        b'"usage":{"prompt_tokens":120,"completion_tokens":40,"total_tokens":160,'
        b'"prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},'
        b'"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}}}\n\n',
        b"data: [DONE]\n\n",
    ]
)


def test_answer_reader_parallel_tool_call_fragments() -> None:
    assert read_stream(PARALLEL_TOOL_STREAM) == [
        Started("chatcmpl-BQ5", "gpt-4.1-2025-04-14"),
        ToolCallStarted(0, "call_a1", "get_weather"),
        ToolArgumentsDelta(0, '{"lo'),
        ToolArgumentsDelta(0, 'cation": "Paris"}'),
        ToolCallStarted(1, "call_b2", "get_time"),
        ToolArgumentsDelta(1, '{"tz": "Europe/Paris"}'),
        Finished("tool_calls"),
        UsageReport(Usage(120, 40, cache_read_tokens=64)),
    ]


# deepseek-reasoner: reasoning_content deltas first, usage on the finish chunk itself.
DEEPSEEK_STREAM = (
    b'data: {"id":"5f3c","object":"chat.completion.chunk","created":1738000000,'
    b'"model":"deepseek-reasoner",'
    b'"system_fingerprint":"fp_7e73fd9a08","choices":[{"index":0,"delta":{"role":"assistant","content":null,'
    b'"reasoning_content":""},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"5f3c","object":"chat.completion.chunk","created":1738000000,'
    b'"model":"deepseek-reasoner",'
    b'"system_fingerprint":"fp_7e73fd9a08","choices":[{"index":0,"delta":{"content":null,'
    b'"reasoning_content":"Okay, the user"},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"5f3c","object":"chat.completion.chunk","created":1738000000,'
    b'"model":"deepseek-reasoner",'
    b'"system_fingerprint":"fp_7e73fd9a08","choices":[{"index":0,"delta":{"content":"Hello",'
    b'"reasoning_content":null},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"5f3c","object":"chat.completion.chunk","created":1738000000,'
    b'"model":"deepseek-reasoner",'
    b'"system_fingerprint":"fp_7e73fd9a08","choices":[{"index":0,"delta":{"content":"",'
    b'"reasoning_content":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":13,'
    b'"completion_tokens":42,"total_tokens":55,"prompt_tokens_details":{"cached_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":30},"prompt_cache_hit_tokens":0,'
    b'"prompt_cache_miss_tokens":13}}\n\n'
    b"data: [DONE]\n\n"
)


def test_answer_reader_reasoning_content_and_usage_on_the_finish_chunk() -> None:
    assert read_stream(DEEPSEEK_STREAM) == [
        Started("5f3c", "deepseek-reasoner"),
        ReasoningDelta("Okay, the user"),
        TextDelta("Hello"),
        Finished("stop"),
        UsageReport(Usage(13, 42)),
    ]


# An OpenAI-compatible server that sends each call whole, with no index, and ends with "stop".
INDEXLESS_TOOL_STREAM = (
    b'data: {"id":"x1","object":"chat.completion.chunk","created":1,"model":"gemini-2.5-flash",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","tool_calls":[{"id":"function-call-1",'
    b'"type":"function","function":{"name":"get_weather","arguments":"{\\"location\\":\\"Paris\\"}"}},'
    b'{"id":"function-call-2","type":"function","function":{"name":"get_weather",'
    b'"arguments":"{\\"location\\":\\"Rome\\"}"}}]},"finish_reason":null}]}\n\n'
    b'data: {"id":"x1","object":"chat.completion.chunk","created":1,"model":"gemini-2.5-flash",'
    b'"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":30,"completion_tokens":12,"total_tokens":42}}\n\n'
    b"data: [DONE]\n\n"
)


def test_answer_reader_calls_without_index_and_a_stop_after_calls() -> None:
    assert read_stream(INDEXLESS_TOOL_STREAM) == [
        Started("x1", "gemini-2.5-flash"),
        ToolCallStarted(0, "function-call-1", "get_weather"),
        ToolArgumentsDelta(0, '{"location":"Paris"}'),
        ToolCallStarted(1, "function-call-2", "get_weather"),
        ToolArgumentsDelta(1, '{"location":"Rome"}'),
        Finished("tool_calls"),
        UsageReport(Usage(30, 12)),
    ]


# Azure OpenAI: a first chunk of prompt filter results, content filter results on each choice.
AZURE_STREAM = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
    b'[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}'
    b"\n\n"
    b'data: {"choices":[{"content_filter_results":{},"delta":{"content":"","refusal":null,'
    b'"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":1746000000,'
    b'"id":"chatcmpl-AzX1","model":"gpt-4o-2024-11-20","object":"chat.completion.chunk",'
    b'"system_fingerprint":"fp_ee1d74bde0"}\n\n'
    b'data: {"choices":[{"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}},'
    b'"delta":{"content":"Hi"},"finish_reason":null,"index":0,"logprobs":null}],'
    b'"created":1746000000,"id":"chatcmpl-AzX1","model":"gpt-4o-2024-11-20",'
    b'"object":"chat.completion.chunk","system_fingerprint":"fp_ee1d74bde0"}\n\n'
    b'data: {"choices":[{"content_filter_results":{},"delta":{},"finish_reason":"content_filter",'
    b'"index":0,"logprobs":null}],"created":1746000000,"id":"chatcmpl-AzX1",'
    b'"model":"gpt-4o-2024-11-20","object":"chat.completion.chunk",'
    b'"system_fingerprint":"fp_ee1d74bde0"}\n\n'
    b"data: [DONE]\n\n"
)


def test_answer_reader_azure_prompt_filter_chunk_and_a_content_filter_stop() -> None:
    assert read_stream(AZURE_STREAM) == [
        Started("chatcmpl-AzX1", "gpt-4o-2024-11-20"),
        TextDelta("Hi"),
        Finished("content_filter"),
    ]


def test_answer_reader_refusal_and_a_mid_stream_error() -> None:
    wire = (
        _chunk({"role": "assistant", "content": None, "refusal": ""})
        + _chunk({"refusal": "I can't help with that."})
        + _chunk({}, "stop")
    )
    assert read_stream(wire) == [
        Started("chatcmpl-BQ5", "gpt-4.1-2025-04-14"),
        TextDelta("I can't help with that."),
        Finished("content_filter"),
    ]
    error = (
        b'{"error":{"message":"The server had an error","type":"server_error",'
        b'"param":null,"code":null}}'
    )
    with pytest.raises(GatewayError) as raised:
        CODEC.answer_reader().feed(None, error)
    assert (raised.value.status, raised.value.reason) == (502, "upstream_error")
    assert "The server had an error" in raised.value.message


def test_answer_reader_unreadable_event_raises_for_the_tap_to_skip() -> None:
    with pytest.raises(msgspec.DecodeError):
        CODEC.answer_reader().feed(None, b"{not json")


# --- write_answer: checked with the SDK's ChatCompletion ------------------------------------


def written(answer: ChatAnswer, request: ChatRequest | None = None) -> ChatCompletion:
    body = CODEC.write_answer(
        answer, request or ChatRequest(model="claude-sonnet-4-5", stream=False)
    )
    return ChatCompletion.model_validate_json(body)


def test_write_answer_text_and_usage() -> None:
    answer = ChatAnswer(
        "msg_01XFDUDYJgAACzvnptvVoYEL",
        "claude-sonnet-4-5-20250929",
        [Reasoning("Let me think.", signature="sig"), Text("Hello"), Text(" there")],
        "stop",
        Usage(2100, 35, cache_read_tokens=2000, cache_write_tokens=50),
    )
    completion = written(answer)

    assert completion.id == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert completion.model == "claude-sonnet-4-5-20250929"
    choice = completion.choices[0]
    # Reasoning has no slot in a chat completion: left out.
    assert choice.message.content == "Hello there"
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2100, 35, 2135)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 2000
    assert usage.prompt_tokens_details.cache_write_tokens == 50


def test_write_answer_tool_calls_carry_json_string_arguments() -> None:
    answer = ChatAnswer(
        "msg_1",
        "gemini-2.5-flash",
        [
            ToolCall("toolu_01", "get_weather", {"location": "Bogotá", "units": ["c"]}),
            ToolCall("toolu_02", "now", {}),
        ],
        "tool_calls",
        None,
    )
    completion = written(answer)

    message = completion.choices[0].message
    assert message.content is None
    calls = message.tool_calls or []
    assert [(c.id, c.type, c.function.name) for c in calls] == [  # type: ignore[union-attr]
        ("toolu_01", "function", "get_weather"),
        ("toolu_02", "function", "now"),
    ]
    assert json.loads(calls[0].function.arguments) == {"location": "Bogotá", "units": ["c"]}  # type: ignore[union-attr]
    assert json.loads(calls[1].function.arguments) == {}  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is None


def test_write_answer_of_a_blocked_prompt_is_an_empty_content_filter_answer() -> None:
    completion = written(ChatAnswer("r1", "", [], "content_filter", Usage(9, 0)))

    assert completion.model == "claude-sonnet-4-5"  # the upstream named none: the caller's
    assert completion.choices[0].message.content == ""
    assert completion.choices[0].finish_reason == "content_filter"


def test_an_answer_read_and_written_again_keeps_its_meaning() -> None:
    completion = written(CODEC.read_answer(TOOL_CALLS_COMPLETION))

    original = ChatCompletion.model_validate_json(TOOL_CALLS_COMPLETION)
    assert completion.choices[0].finish_reason == original.choices[0].finish_reason
    assert completion.usage is not None and original.usage is not None
    assert completion.usage.prompt_tokens == original.usage.prompt_tokens
    assert completion.usage.completion_tokens == original.usage.completion_tokens
    assert completion.usage.total_tokens == original.usage.total_tokens
    for mine, theirs in zip(
        completion.choices[0].message.tool_calls or [],
        original.choices[0].message.tool_calls or [],
        strict=True,
    ):
        assert mine.id == theirs.id
        assert json.loads(mine.function.arguments) == json.loads(theirs.function.arguments)  # type: ignore[union-attr]


# --- answer_writer: checked with the SDK's ChatCompletionChunk and its stream reader --------


def write_stream(events: list[StreamEvent], include_usage: bool) -> tuple[list[bytes], bytes]:
    """Each event's bytes as the writer returns them, and the close."""
    request = ChatRequest(model="claude-sonnet-4-5", stream=True, include_usage=include_usage)
    writer = CODEC.answer_writer(request)
    return [writer.feed(event) for event in events], writer.close()


def frames(wire: bytes) -> list[bytes]:
    assert wire.endswith(b"\n\n")
    return [frame + b"\n\n" for frame in wire[:-2].split(b"\n\n")]


def chunks(wire: bytes) -> list[ChatCompletionChunk]:
    """Every frame a complete ``data:`` event, the last ``[DONE]``, the rest SDK chunks."""
    parts = frames(wire)
    assert parts[-1] == b"data: [DONE]\n\n"
    for part in parts:
        assert part.startswith(b"data: ") and part.count(b"\n") == 2
    return [ChatCompletionChunk.model_validate_json(part[6:]) for part in parts[:-1]]


TOOL_EVENTS: list[StreamEvent] = [
    Started("msg_01", "claude-sonnet-4-5-20250929", Usage(500, 1)),
    ReasoningDelta("The user wants weather.", signature=None),
    TextDelta("Let me check."),
    ToolCallStarted(0, "toolu_01", "get_weather"),
    ToolArgumentsDelta(0, ""),
    ToolArgumentsDelta(0, '{"location": '),
    ToolArgumentsDelta(0, '"Paris"}'),
    ToolCallStarted(1, "toolu_02", "get_time"),
    ToolArgumentsDelta(1, "{}"),
    Finished("tool_calls"),
    UsageReport(Usage(520, 60, cache_read_tokens=500)),
]


def test_answer_writer_streams_tool_calls_as_openai_does() -> None:
    written_events, closing = write_stream(TOOL_EVENTS, include_usage=False)
    wire = b"".join(written_events) + closing
    parsed = chunks(wire)

    # Each event leaves at once; reasoning, an empty fragment and the usage write nothing.
    assert [bool(out) for out in written_events] == [
        True, False, True, True, False, True, True, True, True, True, False
    ]  # fmt: skip
    deltas = [c.choices[0].delta for c in parsed]
    assert (deltas[0].role, deltas[0].content) == ("assistant", "")
    assert deltas[1].content == "Let me check."
    first = (deltas[2].tool_calls or [])[0]
    assert (first.index, first.id, first.type) == (0, "toolu_01", "function")
    assert first.function is not None
    assert (first.function.name, first.function.arguments) == ("get_weather", "")
    fragment = (deltas[3].tool_calls or [])[0]
    assert (fragment.index, fragment.id, fragment.type) == (0, None, None)
    assert parsed[-1].choices[0].finish_reason == "tool_calls"
    assert parsed[-1].choices[0].delta.content is None
    # No usage chunk, nor usage field, unless the caller asked.
    assert all(c.choices and c.usage is None for c in parsed)
    assert b'"usage"' not in wire
    assert {c.id for c in parsed} == {"msg_01"}
    assert {c.model for c in parsed} == {"claude-sonnet-4-5-20250929"}


def test_answer_writer_usage_chunk_only_when_asked_last_before_done() -> None:
    written_events, closing = write_stream(TOOL_EVENTS, include_usage=True)
    parsed = chunks(b"".join(written_events) + closing)

    usage_chunk = parsed[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (520, 60)
    assert usage_chunk.usage.total_tokens == 580
    assert usage_chunk.usage.prompt_tokens_details is not None
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens == 500
    assert parsed[-2].choices[0].finish_reason == "tool_calls"
    assert all(c.usage is None for c in parsed[:-1])
    # Held to the end: the usage report itself wrote nothing.
    assert written_events[-1] == b""


def test_the_openai_sdk_reads_the_written_stream_into_the_same_answer() -> None:
    written_events, closing = write_stream(TOOL_EVENTS, include_usage=True)
    wire = b"".join(written_events) + closing

    def upstream(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=wire)

    http = openai.DefaultHttpxClient(transport=httpx2.MockTransport(upstream))
    client = openai.OpenAI(
        api_key="rlgw-test", base_url="http://gateway/openai/v1", http_client=http
    )
    state = ChatCompletionStreamState()
    stream = client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Weather?"}], stream=True
    )
    for chunk in stream:
        state.handle_chunk(chunk)
    final = state.get_final_completion()

    message = final.choices[0].message
    assert message.content == "Let me check."
    calls = message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("toolu_01", "get_weather", {"location": "Paris"}),
        ("toolu_02", "get_time", {}),
    ]
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None and final.usage.total_tokens == 580


def test_a_read_stream_written_again_is_what_the_upstream_said() -> None:
    """OpenAI upstream → IR → OpenAI caller: the SDK assembles the same answer."""
    events = read_stream(PARALLEL_TOOL_STREAM)
    written_events, closing = write_stream(events, include_usage=True)

    def assemble(wire: bytes) -> Any:
        state = ChatCompletionStreamState()
        for chunk in chunks(wire):
            state.handle_chunk(chunk)
        return state.get_final_completion()

    mine, theirs = assemble(b"".join(written_events) + closing), assemble(PARALLEL_TOOL_STREAM)
    assert mine.choices[0].message.tool_calls == theirs.choices[0].message.tool_calls
    assert mine.choices[0].finish_reason == theirs.choices[0].finish_reason
    assert mine.usage.prompt_tokens_details.cached_tokens == 64


def test_answer_writer_writes_only_what_it_is_told() -> None:
    """No Started: the role chunk is written anyway. No Finished (an upstream error cut the
    stream): no finish reason is made up, as OpenAI's own stream cut short has none."""
    written_events, closing = write_stream([TextDelta("Hi")], include_usage=True)
    parsed = chunks(b"".join(written_events) + closing)

    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[0].id.startswith("chatcmpl-")
    assert parsed[0].model == "claude-sonnet-4-5"
    assert parsed[1].choices[0].delta.content == "Hi"
    assert len(parsed) == 2  # no finish, and no usage was reported: no usage chunk
    assert all(c.choices[0].finish_reason is None for c in parsed)


def test_answer_writer_of_an_empty_stream_writes_only_done() -> None:
    assert write_stream([], include_usage=True) == ([], b"data: [DONE]\n\n")


def test_answer_writer_content_filter_finish() -> None:
    events: list[StreamEvent] = [Started("r", "gemini-2.5-pro"), Finished("content_filter")]
    parsed = chunks(b"".join(write_stream(events, include_usage=False)[0]) + b"data: [DONE]\n\n")

    assert parsed[-1].choices[0].finish_reason == "content_filter"


# --- error_message --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"error":{"message":"You exceeded your current quota, please check your plan and '
            b'billing details.","type":"insufficient_quota","param":null,'
            b'"code":"insufficient_quota"}}',
            "You exceeded your current quota, please check your plan and billing details.",
        ),
        (b'{"error":"model not loaded"}', "model not loaded"),
        (
            b'{"object":"error","message":"max_tokens is too large","type":"BadRequestError"}',
            "max_tokens is too large",
        ),
        (b'{"detail":"Not Found"}', "Not Found"),
        (
            b"<html><body>502 Bad Gateway</body></html>\n",
            "<html><body>502 Bad Gateway</body></html>",
        ),
        (b'{"error":{"code":500}}', '{"error":{"code":500}}'),
        (b"x" * 2000, "x" * 500),
    ],
)
def test_error_message(body: bytes, message: str) -> None:
    assert CODEC.error_message(body) == message


def test_the_codec_is_the_openai_protocols() -> None:
    assert CODEC.name == "openai"
