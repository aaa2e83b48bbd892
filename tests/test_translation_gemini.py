"""The Gemini codec (protocols/translation/gemini_generate.py): caller requests read into the
IR, IR requests written for a Gemini upstream, Gemini answers and SSE streams read back, and
answers and streams written for a Gemini caller, checked with google-genai's own types."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from google import genai
from google.genai import types

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.base import Route, Usage, sse_event_fields
from ratelimit_gw.protocols.translation.gemini_generate import GeminiGenerateCodec
from ratelimit_gw.protocols.translation.ir import (
    EFFORT_BUDGETS,
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

CODEC = GeminiGenerateCodec()
PNG = (  # a 1×1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def read(body: dict[str, Any], route: Route = Route.GENERATE) -> ChatRequest:
    return CODEC.read_request(json.dumps(body).encode(), route, "claude-sonnet-4-5")


def refused(body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        read(body)
    assert caught.value.status == 400
    return caught.value


def written(request: ChatRequest) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(CODEC.write_request(request, "gemini-2.5-flash", 4096))
    # Every piece must be what google-genai itself would send.
    for content in body["contents"]:
        types.Content.model_validate(content)
    if "systemInstruction" in body:
        types.Content.model_validate(body["systemInstruction"])
    for tool in body.get("tools", []):
        types.Tool.model_validate(tool)
    if "toolConfig" in body:
        types.ToolConfig.model_validate(body["toolConfig"])
    if "generationConfig" in body:
        types.GenerationConfig.model_validate(body["generationConfig"])
    assert set(body) <= {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig"}
    return body


def sse_events(text: bytes) -> list[tuple[str | None, bytes]]:
    events = []
    for block in re.split(rb"\r?\n\r?\n", text):
        name, data = sse_event_fields(block)
        if data is not None:
            events.append((name, data))
    return events


def read_stream(text: bytes) -> list[StreamEvent]:
    reader = CODEC.answer_reader()
    return [event for name, data in sse_events(text) for event in reader.feed(name, data)]


def write_stream(
    events: list[StreamEvent], request: ChatRequest | None = None
) -> tuple[list[bytes], bytes]:
    """What the writer sends for each event, and what close() sends."""
    writer = CODEC.answer_writer(request or ChatRequest(model="m", stream=True))
    return [writer.feed(event) for event in events], writer.close()


def sse_chunks(pieces: list[bytes]) -> list[types.GenerateContentResponse]:
    text = b"".join(pieces)
    for piece in pieces:  # each piece holds whole events only
        assert piece == b"" or (piece.startswith(b"data: ") and piece.endswith(b"\n\n"))
    return [
        types.GenerateContentResponse.model_validate(json.loads(data))
        for _, data in sse_events(text)
    ]


# --- read_request ------------------------------------------------------------------------


def test_a_plain_chat_reads_with_its_settings_named_in_the_callers_spelling() -> None:
    request = read(
        {
            "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Hi"}]},
                {"role": "model", "parts": [{"text": "Salut"}]},
                {"role": "user", "parts": [{"text": "What is 2+2?"}]},
            ],
            "generationConfig": {
                "maxOutputTokens": 256,
                "temperature": 0.2,
                "topP": 0.9,
                "topK": 40,
                "stopSequences": ["END"],
                "presencePenalty": 0.5,
                "frequencyPenalty": 0.25,
                "seed": 7,
                "candidateCount": 1,
            },
        },
        Route.STREAM_GENERATE,
    )
    assert request.model == "claude-sonnet-4-5" and request.stream
    assert request.system == ["Be brief.", "Answer in French."]
    assert request.turns == [
        Turn("user", [Text("Hi")]),
        Turn("assistant", [Text("Salut")]),
        Turn("user", [Text("What is 2+2?")]),
    ]
    assert (request.max_tokens, request.temperature, request.top_p, request.top_k) == (
        256,
        0.2,
        0.9,
        40,
    )
    assert request.stop == ["END"]
    assert (request.presence_penalty, request.frequency_penalty, request.seed) == (0.5, 0.25, 7)
    assert request.param("max_tokens") == "generationConfig.maxOutputTokens"
    assert request.dropped == []


def test_snake_case_spellings_read_like_camel_case_and_are_named_as_sent() -> None:
    request = read(
        {
            "system_instruction": {"parts": [{"text": "sys"}]},
            "contents": [{"parts": [{"inline_data": {"mime_type": "image/png", "data": PNG}}]}],
            "generation_config": {
                "max_output_tokens": 64,
                "stop_sequences": ["x"],
                "thinking_config": {"thinking_budget": 512, "include_thoughts": True},
                "response_mime_type": "application/json",
            },
        }
    )
    assert request.system == ["sys"]
    assert request.turns == [
        Turn("user", [Image("image/png", PNG, param="contents[0].parts[0].inline_data")])
    ]
    assert request.max_tokens == 64 and request.stop == ["x"]
    assert request.reasoning_budget == 512 and request.show_reasoning
    assert request.response_format == ResponseFormat("json_object")
    assert request.param("max_tokens") == "generation_config.max_output_tokens"
    assert request.param("reasoning_budget") == "generation_config.thinking_config.thinking_budget"


def test_consecutive_same_role_turns_are_kept_for_the_writer_to_merge() -> None:
    request = read(
        {
            "contents": [
                {"role": "user", "parts": [{"text": "one"}]},
                {"role": "user", "parts": [{"text": "two"}, {"text": ""}]},
                {"role": "model", "parts": [{"text": "a"}]},
                {"role": "model", "parts": [{"text": "b"}]},
            ]
        }
    )
    assert [turn.role for turn in request.turns] == ["user", "user", "assistant", "assistant"]
    assert request.turns[1].parts == [Text("two")]  # an empty text part says nothing


def test_parallel_calls_without_ids_get_ids_and_results_pair_by_name_in_order() -> None:
    request = read(
        {
            "contents": [
                {"role": "user", "parts": [{"text": "Weather in Paris and London? Time?"}]},
                {
                    "role": "model",
                    "parts": [
                        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                        {"functionCall": {"name": "get_weather", "args": {"city": "London"}}},
                        {"functionCall": {"name": "get_time", "args": {}}},
                    ],
                },
                {
                    "role": "user",
                    "parts": [
                        {"functionResponse": {"name": "get_time", "response": {"output": "12:00"}}},
                        {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
                        {
                            "functionResponse": {
                                "name": "get_weather",
                                "response": {"error": "station offline"},
                            }
                        },
                    ],
                },
            ]
        }
    )
    calls = request.turns[1].parts
    assert calls == [
        ToolCall("call_1_0", "get_weather", {"city": "Paris"}),
        ToolCall("call_1_1", "get_weather", {"city": "London"}),
        ToolCall("call_1_2", "get_time", {}),
    ]
    assert request.turns[2].parts == [
        ToolResult("call_1_2", "get_time", [Text("12:00")]),
        ToolResult("call_1_0", "get_weather", [Text('{"temp":21}')]),
        ToolResult("call_1_1", "get_weather", [Text("station offline")], is_error=True),
    ]


def test_results_pair_by_the_ids_a_converter_answer_gave_the_calls() -> None:
    request = read(
        {
            "contents": [
                {"role": "user", "parts": [{"text": "go"}]},
                {
                    "role": "model",
                    "parts": [
                        {"functionCall": {"id": "toolu_a", "name": "f", "args": {"n": 1}}},
                        {"functionCall": {"id": "toolu_b", "name": "f", "args": {"n": 2}}},
                    ],
                },
                {
                    "role": "user",
                    "parts": [
                        {"functionResponse": {"id": "toolu_b", "name": "f", "response": {}}},
                        {"functionResponse": {"id": "toolu_a", "name": "f", "response": {}}},
                    ],
                },
            ]
        }
    )
    assert [part.call_id for part in request.turns[2].parts] == ["toolu_b", "toolu_a"]  # type: ignore[union-attr]


def test_consecutive_model_contents_are_one_turn_for_pairing() -> None:
    request = read(
        {
            "contents": [
                {"role": "user", "parts": [{"text": "go"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "a"}}]},
                {"role": "model", "parts": [{"functionCall": {"name": "b"}}]},
                {
                    "role": "user",
                    "parts": [
                        {"functionResponse": {"name": "a", "response": {"output": 1}}},
                        {"functionResponse": {"name": "b", "response": {"output": 2}}},
                    ],
                },
            ]
        }
    )
    assert request.turns[3].parts == [
        ToolResult("call_1_0", "a", [Text("1")]),
        ToolResult("call_2_0", "b", [Text("2")]),
    ]


def test_a_function_response_with_parts_carries_its_image() -> None:
    request = read(
        {
            "contents": [
                {"role": "user", "parts": [{"text": "screenshot please"}]},
                {"role": "model", "parts": [{"function_call": {"name": "shot"}}]},
                {
                    "role": "function",  # the older spelling of a tool-result turn
                    "parts": [
                        {
                            "function_response": {
                                "name": "shot",
                                "response": {"output": "done"},
                                "parts": [{"inlineData": {"mimeType": "image/png", "data": PNG}}],
                            }
                        }
                    ],
                },
            ]
        }
    )
    param = "contents[2].parts[0].function_response.parts[0].inlineData"
    assert request.turns[2] == Turn(
        "user",
        [ToolResult("call_1_0", "shot", [Text("done"), Image("image/png", PNG, param=param)])],
    )


def test_a_result_with_no_call_of_its_name_before_it_is_refused() -> None:
    err = refused(
        {
            "contents": [
                {"role": "model", "parts": [{"functionCall": {"name": "a", "args": {}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "b", "response": {}}}]},
            ]
        }
    )
    assert err.param == "contents[1].parts[0].functionResponse"


def test_thoughts_in_history_read_as_reasoning_and_signatures_are_dropped() -> None:
    request = read(
        {
            "contents": [
                {"role": "user", "parts": [{"text": "q"}]},
                {
                    "role": "model",
                    "parts": [
                        {"text": "Let me think.", "thought": True, "thoughtSignature": "c2ln"},
                        {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "c2ln"},
                    ],
                },
                {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]},
            ]
        }
    )
    assert request.turns[1].parts == [
        Reasoning("Let me think.", "c2ln"),
        ToolCall("call_1_1", "f", {}),
    ]
    assert request.param("reasoning") == "contents[].parts[].thought"
    assert request.dropped == ["contents[].parts[].thoughtSignature"]


def test_tools_become_lower_case_json_schema_and_choices_map() -> None:
    request = read(
        {
            "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "tools": [
                {
                    "functionDeclarations": [
                        {
                            "name": "find",
                            "description": "Find things",
                            "parameters": {
                                "type": "OBJECT",
                                "properties": {
                                    "query": {"type": "STRING", "nullable": True},
                                    "tags": {
                                        "type": "ARRAY",
                                        "items": {"type": "STRING", "enum": ["a", "b"]},
                                        "max_items": 3,
                                    },
                                },
                                "required": ["query"],
                                "propertyOrdering": ["query", "tags"],
                            },
                        },
                        {"name": "ping"},
                    ]
                },
                {
                    "function_declarations": [
                        {
                            "name": "raw",
                            "parametersJsonSchema": {
                                "type": "object",
                                "properties": {"x": {"type": "integer"}},
                                "additionalProperties": False,
                            },
                        }
                    ]
                },
            ],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
        }
    )
    assert request.tools == [
        ToolSpec(
            "find",
            "Find things",
            {
                "type": "object",
                "properties": {
                    "query": {"type": ["string", "null"]},
                    "tags": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["a", "b"]},
                        "maxItems": 3,
                    },
                },
                "required": ["query"],
            },
        ),
        ToolSpec("ping", None, {"type": "object", "properties": {}}),
        ToolSpec(
            "raw",
            None,
            {
                "type": "object",
                "properties": {"x": {"type": "integer"}},
                "additionalProperties": False,
            },
        ),
    ]
    assert request.tool_choice == "required"
    assert request.param("tool_choice") == "toolConfig.functionCallingConfig"


@pytest.mark.parametrize(
    ("config", "choice", "tool_names"),
    [
        ({"mode": "AUTO"}, "auto", ["a", "b", "c"]),
        ({"mode": "NONE"}, "none", ["a", "b", "c"]),
        ({"mode": "VALIDATED"}, "auto", ["a", "b", "c"]),
        ({"mode": "ANY", "allowedFunctionNames": ["b"]}, NamedTool("b"), ["a", "b", "c"]),
        ({"mode": "ANY", "allowed_function_names": ["a", "c"]}, "required", ["a", "c"]),
    ],
)
def test_function_calling_modes(config: dict[str, Any], choice: Any, tool_names: list[str]) -> None:
    request = read(
        {
            "contents": [{"parts": [{"text": "hi"}]}],
            "tools": [{"functionDeclarations": [{"name": n} for n in "abc"]}],
            "toolConfig": {"functionCallingConfig": config},
        }
    )
    assert request.tool_choice == choice
    assert [tool.name for tool in request.tools] == tool_names


def test_response_schemas_read_as_json_schema() -> None:
    openapi = read(
        {
            "contents": [{"parts": [{"text": "hi"}]}],
            "generationConfig": {
                "responseMimeType": "application/json",
                "responseSchema": {
                    "type": "OBJECT",
                    "properties": {"name": {"type": "STRING"}},
                    "propertyOrdering": ["name"],
                },
            },
        }
    )
    assert openapi.response_format == ResponseFormat(
        "json_schema", schema={"type": "object", "properties": {"name": {"type": "string"}}}
    )
    assert openapi.param("response_format") == "generationConfig.responseSchema"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    full = read(
        {
            "contents": [{"parts": [{"text": "hi"}]}],
            "generationConfig": {
                "responseMimeType": "application/json",
                "responseJsonSchema": schema,
            },
        }
    )
    assert full.response_format == ResponseFormat("json_schema", schema=schema)
    plain = read(
        {
            "contents": [{"parts": [{"text": "hi"}]}],
            "generationConfig": {"responseMimeType": "text/plain"},
        }
    )
    assert plain.response_format is None


@pytest.mark.parametrize(
    ("thinking", "budget", "dropped"),
    [
        ({"thinkingBudget": 0}, 0, []),
        ({"thinkingLevel": "HIGH"}, EFFORT_BUDGETS["high"], []),
        ({"thinkingLevel": "low"}, EFFORT_BUDGETS["low"], []),
        (
            {"thinkingBudget": -1},
            None,
            ["generationConfig.thinkingConfig.thinkingBudget"],
        ),
    ],
)
def test_thinking_settings(
    thinking: dict[str, Any], budget: int | None, dropped: list[str]
) -> None:
    request = read(
        {
            "contents": [{"parts": [{"text": "hi"}]}],
            "generationConfig": {"thinkingConfig": thinking},
        }
    )
    assert request.reasoning_budget == budget
    assert not request.show_reasoning
    assert request.dropped == dropped


def test_tuning_and_unknown_fields_are_dropped_and_named() -> None:
    request = read(
        {
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {
                            "inlineData": {"mimeType": "image/jpeg", "data": PNG},
                            "videoMetadata": {"fps": 1},
                            "mediaResolution": {"level": "MEDIA_RESOLUTION_HIGH"},
                        }
                    ],
                }
            ],
            "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
            "labels": {"team": "a"},
            "generationConfig": {
                "maxOutputTokens": 0,  # proto3: the same as unset
                "mediaResolution": "MEDIA_RESOLUTION_LOW",
                "speechConfig": {},
                "responseModalities": ["TEXT"],
            },
            "toolConfig": {"retrievalConfig": {"languageCode": "en"}},
        }
    )
    assert request.max_tokens is None
    assert sorted(request.dropped) == sorted(
        [
            "contents[].parts[].videoMetadata",
            "contents[].parts[].mediaResolution",
            "safetySettings",
            "labels",
            "generationConfig.mediaResolution",
            "generationConfig.speechConfig",
            "toolConfig.retrievalConfig",
        ]
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"generationConfig": {"candidateCount": 2}}, "generationConfig.candidateCount"),
        ({"generationConfig": {"responseLogprobs": True}}, "generationConfig.responseLogprobs"),
        ({"generation_config": {"logprobs": 3}}, "generation_config.logprobs"),
        (
            {"generationConfig": {"responseModalities": ["TEXT", "AUDIO"]}},
            "generationConfig.responseModalities",
        ),
        (
            {"generationConfig": {"responseMimeType": "text/x.enum"}},
            "generationConfig.responseMimeType",
        ),
        ({"cachedContent": "cachedContents/abc"}, "cachedContent"),
        ({"tools": [{"googleSearch": {}}]}, "tools[0].googleSearch"),
        ({"tools": [{"code_execution": {}}]}, "tools[0].code_execution"),
        (
            {
                "contents": [
                    {
                        "parts": [
                            {"text": "describe"},
                            {"fileData": {"mimeType": "image/png", "fileUri": "gs://b/x.png"}},
                        ]
                    }
                ]
            },
            "contents[0].parts[1].fileData",
        ),
        (
            {
                "contents": [
                    {"parts": [{"inlineData": {"mimeType": "application/pdf", "data": "JVBER"}}]}
                ]
            },
            "contents[0].parts[0].inlineData",
        ),
        (
            {
                "contents": [
                    {"parts": [{"text": "run"}]},
                    {
                        "role": "model",
                        "parts": [{"executableCode": {"language": "PYTHON", "code": "1"}}],
                    },
                ]
            },
            "contents[1].parts[0].executableCode",
        ),
        (
            {
                "systemInstruction": {
                    "parts": [{"inlineData": {"mimeType": "image/png", "data": PNG}}]
                }
            },
            "systemInstruction.parts[0]",
        ),
    ],
)
def test_fields_no_target_can_honour_are_refused(body: dict[str, Any], param: str) -> None:
    body.setdefault("contents", [{"parts": [{"text": "hi"}]}])
    err = refused(body)
    assert err.param == param
    assert err.reason == "invalid_request"
    assert param in err.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"contents": []}, "contents"),
        ({"contents": [{"role": "system", "parts": [{"text": "x"}]}]}, "contents[0].role"),
        ({"contents": [{"parts": [{"text": 3}]}]}, "contents[0].parts[0].text"),
        (
            {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"temperature": "hot"}},
            "generationConfig.temperature",
        ),
        (
            {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"topK": True}},
            "generationConfig.topK",
        ),
        ({"contents": "hello"}, "contents"),
    ],
)
def test_malformed_fields_are_400s_naming_them(body: dict[str, Any], param: str) -> None:
    assert refused(body).param == param


def test_a_body_that_is_not_an_object_is_invalid_json() -> None:
    for body in (b"[1]", b"{not json"):
        with pytest.raises(GatewayError) as caught:
            CODEC.read_request(body, Route.GENERATE, "m")
        assert caught.value.reason == "invalid_json"


# --- write_request -----------------------------------------------------------------------


def chat(**fields: Any) -> ChatRequest:
    return ChatRequest(model="gemini-2.5-flash", stream=False, **fields)


def test_a_request_from_another_protocol_is_written_as_gemini_contents() -> None:
    request = chat(
        system=["You are terse.", "Use metric units."],
        turns=[
            Turn("user", [Text("Weather in Paris and London?")]),
            Turn("user", [Image("image/png", PNG, param="messages[1].content[0]")]),
            Turn(
                "assistant",
                [
                    Reasoning("thinking…", "anthropic-signature"),
                    Text(""),
                    ToolCall("call_a", "get_weather", {"city": "Paris"}),
                    ToolCall("call_b", "get_weather", {"city": "London"}),
                ],
            ),
            Turn(
                "user",
                [
                    ToolResult("call_a", None, [Text('{"temp": 21}')]),
                    ToolResult("call_b", "get_weather", [Text("offline")], is_error=True),
                ],
            ),
            Turn("user", [Text("And tomorrow?")]),
            Turn("assistant", [Reasoning("only thoughts")]),
            Turn("assistant", [Text("Sunny.")]),
        ],
        params={"reasoning": "thinking"},
    )
    body = written(request)
    assert body["systemInstruction"] == {"parts": [{"text": "You are terse.\n\nUse metric units."}]}
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "Weather in Paris and London?"},
                {"inlineData": {"mimeType": "image/png", "data": PNG}},
            ],
        },
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": "skip_thought_signature_validator",
                },
                {"functionCall": {"name": "get_weather", "args": {"city": "London"}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {
                    "functionResponse": {
                        "name": "get_weather",
                        "response": {"output": '{"temp": 21}'},
                    }
                },
                {"functionResponse": {"name": "get_weather", "response": {"error": "offline"}}},
                {"text": "And tomorrow?"},
            ],
        },
        {"role": "model", "parts": [{"text": "Sunny."}]},
    ]
    assert "generationConfig" not in body  # no cap injected: Gemini needs none
    assert request.dropped == ["thinking"]


def test_settings_tools_and_json_mode_are_written_in_gemini_names() -> None:
    schema = {
        "type": "object",
        "properties": {"x": {"type": "integer"}},
        "additionalProperties": False,
    }
    request = chat(
        turns=[Turn("user", [Text("hi")])],
        max_tokens=300,
        temperature=0.7,
        top_p=0.95,
        top_k=20,
        stop=["STOP"],
        presence_penalty=0.1,
        frequency_penalty=0.2,
        seed=42,
        tools=[
            ToolSpec("lookup", "Look it up", schema),
            ToolSpec("noop", None, {"type": "object"}),
        ],
        tool_choice=NamedTool("lookup"),
        parallel_tool_calls=False,
        response_format=ResponseFormat("json_schema", schema=schema, name="out", strict=True),
        reasoning_budget=EFFORT_BUDGETS["low"],
        show_reasoning=True,
    )
    body = written(request)
    assert body["generationConfig"] == {
        "maxOutputTokens": 300,
        "temperature": 0.7,
        "topP": 0.95,
        "topK": 20,
        "stopSequences": ["STOP"],
        "presencePenalty": 0.1,
        "frequencyPenalty": 0.2,
        "seed": 42,
        "responseMimeType": "application/json",
        "responseJsonSchema": schema,
        "thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": True},
    }
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {"name": "lookup", "description": "Look it up", "parametersJsonSchema": schema},
                {"name": "noop", "parametersJsonSchema": {"type": "object"}},
            ]
        }
    ]
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["lookup"]}
    }
    assert request.dropped == ["parallel_tool_calls"]


@pytest.mark.parametrize(
    ("choice", "mode"), [("auto", "AUTO"), ("none", "NONE"), ("required", "ANY")]
)
def test_tool_choices_become_calling_modes(choice: Any, mode: str) -> None:
    body = written(
        chat(
            turns=[Turn("user", [Text("hi")])], tools=[ToolSpec("f", None, {})], tool_choice=choice
        )
    )
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": mode}}


def test_json_object_mode_and_a_choice_without_tools() -> None:
    request = chat(
        turns=[Turn("user", [Text("hi")])],
        response_format=ResponseFormat("json_object"),
        tool_choice="none",
        params={"tool_choice": "tool_choice"},
    )
    body = written(request)
    assert body["generationConfig"] == {"responseMimeType": "application/json"}
    assert "toolConfig" not in body
    assert request.dropped == ["tool_choice"]


def test_a_data_url_image_is_sent_inline_and_an_http_url_is_refused() -> None:
    body = written(chat(turns=[Turn("user", [Image(None, url=f"data:image/png;base64,{PNG}")])]))
    assert body["contents"][0]["parts"] == [{"inlineData": {"mimeType": "image/png", "data": PNG}}]
    remote = chat(
        turns=[
            Turn(
                "user",
                [Image(None, url="https://example.com/cat.png", param="messages[0].content[1]")],
            )
        ]
    )
    with pytest.raises(GatewayError) as caught:
        CODEC.write_request(remote, "gemini-2.5-flash", 4096)
    assert caught.value.status == 400 and caught.value.param == "messages[0].content[1]"


def test_a_result_whose_call_is_not_in_the_history_is_refused() -> None:
    request = chat(turns=[Turn("user", [ToolResult("call_missing", None, [Text("x")])])])
    with pytest.raises(GatewayError) as caught:
        CODEC.write_request(request, "gemini-2.5-flash", 4096)
    assert caught.value.status == 400


def test_a_tool_result_with_images_sends_them_after_its_response() -> None:
    request = chat(
        turns=[
            Turn("assistant", [ToolCall("t1", "shot", {})]),
            Turn("user", [ToolResult("t1", None, [Text("ok"), Image("image/png", PNG)])]),
        ]
    )
    assert written(request)["contents"][1]["parts"] == [
        {"functionResponse": {"name": "shot", "response": {"output": "ok"}}},
        {"inlineData": {"mimeType": "image/png", "data": PNG}},
    ]


def test_upstream_route_follows_the_stream_flag() -> None:
    assert CODEC.upstream_route(chat()) is Route.GENERATE
    assert CODEC.upstream_route(ChatRequest(model="m", stream=True)) is Route.STREAM_GENERATE


def test_a_gemini_request_survives_a_read_and_write() -> None:
    caller = {
        "systemInstruction": {"parts": [{"text": "sys"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "hi"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"a": 1}}}]},
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "f", "response": {"output": "r"}}}],
            },
        ],
        "generationConfig": {"maxOutputTokens": 10, "temperature": 0.5},
    }
    body = written(read(caller))
    caller["contents"][1]["parts"][0]["thoughtSignature"] = "skip_thought_signature_validator"  # type: ignore[index]
    assert body == caller


# --- read_answer -------------------------------------------------------------------------


def test_a_text_answer_reads_with_cache_thought_and_tool_prompt_usage() -> None:
    body = b"""{
      "candidates": [
        {
          "content": {
            "parts": [
              {"text": "**Considering the question**\\n\\nThe user asks...", "thought": true},
              {"text": "The capital of France is Paris.", "thoughtSignature": "CiIBVKhc7rS0"}
            ],
            "role": "model"
          },
          "finishReason": "STOP",
          "index": 0
        }
      ],
      "usageMetadata": {
        "promptTokenCount": 2110,
        "candidatesTokenCount": 8,
        "totalTokenCount": 2274,
        "cachedContentTokenCount": 2048,
        "toolUsePromptTokenCount": 10,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 2110}],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 2048}],
        "thoughtsTokenCount": 146
      },
      "modelVersion": "gemini-2.5-flash",
      "responseId": "Bx1NaKj9Nf2Oz7IP8pmzsQk"
    }"""
    answer = CODEC.read_answer(body)
    assert answer == ChatAnswer(
        id="Bx1NaKj9Nf2Oz7IP8pmzsQk",
        model="gemini-2.5-flash",
        parts=[
            Reasoning("**Considering the question**\n\nThe user asks..."),
            Text("The capital of France is Paris."),
        ],
        stop="stop",
        usage=Usage(2120, 154, cache_read_tokens=2048),
    )


def test_parallel_function_calls_read_as_tool_calls() -> None:
    body = b"""{
      "candidates": [
        {
          "content": {
            "parts": [
              {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
               "thoughtSignature": "CiQBVKhc7p8x"},
              {"functionCall": {"name": "get_weather", "args": {"city": "London"}}},
              {"functionCall": {"id": "fc-3", "name": "get_time"}}
            ],
            "role": "model"
          },
          "finishReason": "STOP",
          "index": 0,
          "finishMessage": "Model generated function call(s)."
        }
      ],
      "usageMetadata": {"promptTokenCount": 74, "candidatesTokenCount": 30, "totalTokenCount": 104},
      "modelVersion": "gemini-2.5-flash",
      "responseId": "kR9NaPqfLtKQz7IPkNDI-Qg"
    }"""
    answer = CODEC.read_answer(body)
    assert answer.stop == "tool_calls"
    calls = [part for part in answer.parts if isinstance(part, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "London"}),
        ("get_time", {}),
    ]
    assert calls[2].id == "fc-3"
    assert calls[0].id.startswith("call_") and len({c.id for c in calls}) == 3
    assert answer.usage == Usage(74, 30)


@pytest.mark.parametrize(
    ("reason", "stop"),
    [
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("OTHER", "stop"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
    ],
)
def test_finish_reasons(reason: str, stop: str) -> None:
    body = json.dumps(
        {
            "candidates": [{"finishReason": reason, "index": 0}],
            "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5},
            "modelVersion": "gemini-2.5-pro",
            "responseId": "r1",
        }
    ).encode()
    answer = CODEC.read_answer(body)
    assert answer.stop == stop and answer.parts == [] and answer.usage == Usage(5, 0)


def test_a_prompt_level_block_is_an_empty_filtered_answer_still_charged() -> None:
    body = b"""{
      "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
      "usageMetadata": {
        "promptTokenCount": 97,
        "totalTokenCount": 97,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 97}]
      },
      "modelVersion": "gemini-2.5-flash",
      "responseId": "xB5NaOGrE8WWz7IP6cbf-Q0"
    }"""
    answer = CODEC.read_answer(body)
    assert (answer.parts, answer.stop, answer.usage) == ([], "content_filter", Usage(97, 0))


# --- answer_reader -----------------------------------------------------------------------

TEXT_STREAM = (
    b'data: {"candidates": [{"content": {"parts": [{"text": "The sky"}],"role": "model"},'
    b'"index": 0}],"usageMetadata": {"promptTokenCount": 9,"totalTokenCount": 9,'
    b'"promptTokensDetails": [{"modality": "TEXT","tokenCount": 9}]},'
    b'"modelVersion": "gemini-2.0-flash","responseId": "mR9NaPGhNqeOz7IP"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"parts": [{"text": " is blue because of Rayleigh"}],'
    b'"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 9,'
    b'"totalTokenCount": 9},"modelVersion": "gemini-2.0-flash","responseId": "mR9NaPGhNqeOz7IP"}'
    b"\r\n\r\n"
    b'data: {"candidates": [{"content": {"parts": [{"text": " scattering."}],"role": "model"},'
    b'"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 9,'
    b'"candidatesTokenCount": 11,"totalTokenCount": 20,"cachedContentTokenCount": 4},'
    b'"modelVersion": "gemini-2.0-flash","responseId": "mR9NaPGhNqeOz7IP"}\r\n\r\n'
)


def test_a_text_stream_reads_event_by_event() -> None:
    assert read_stream(TEXT_STREAM) == [
        Started("mR9NaPGhNqeOz7IP", "gemini-2.0-flash", Usage(9, 0)),
        TextDelta("The sky"),
        TextDelta(" is blue because of Rayleigh"),
        TextDelta(" scattering."),
        Finished("stop"),
        UsageReport(Usage(9, 11, cache_read_tokens=4)),
    ]


def test_thoughts_and_parallel_calls_in_separate_chunks_read_with_indexes() -> None:
    stream = (
        b'data: {"candidates": [{"content": {"parts": [{"text": "**Planning**\\nI will call '
        b'both.","thought": true}],"role": "model"},"index": 0}],"usageMetadata": '
        b'{"promptTokenCount": 60,"totalTokenCount": 80,"thoughtsTokenCount": 20},'
        b'"modelVersion": "gemini-2.5-flash","responseId": "s1"}\r\n\r\n'
        b'data: {"candidates": [{"content": {"parts": [{"functionCall": {"name": "get_weather",'
        b'"args": {"city": "Paris"}},"thoughtSignature": "CiQBVKhc"}],"role": "model"},'
        b'"index": 0}],"usageMetadata": {"promptTokenCount": 60,"totalTokenCount": 95,'
        b'"thoughtsTokenCount": 20},"modelVersion": "gemini-2.5-flash","responseId": "s1"}\r\n\r\n'
        b'data: {"candidates": [{"content": {"parts": [{"functionCall": {"name": "get_weather",'
        b'"args": {"city": "London"}}}],"role": "model"},"finishReason": "STOP","index": 0}],'
        b'"usageMetadata": {"promptTokenCount": 60,"candidatesTokenCount": 30,'
        b'"totalTokenCount": 110,"thoughtsTokenCount": 20},"modelVersion": "gemini-2.5-flash",'
        b'"responseId": "s1"}\r\n\r\n'
    )
    events = read_stream(stream)
    assert events[0] == Started("s1", "gemini-2.5-flash", Usage(60, 20))
    assert events[1] == ReasoningDelta("**Planning**\nI will call both.")
    first, second = events[2], events[4]
    assert isinstance(first, ToolCallStarted) and isinstance(second, ToolCallStarted)
    assert (first.index, first.name, second.index, second.name) == (
        0,
        "get_weather",
        1,
        "get_weather",
    )
    assert first.id != second.id
    assert events[3] == ToolArgumentsDelta(0, '{"city":"Paris"}')
    assert events[5] == ToolArgumentsDelta(1, '{"city":"London"}')
    assert events[6:] == [Finished("tool_calls"), UsageReport(Usage(60, 50))]


def test_a_blocked_stream_finishes_filtered_with_its_usage() -> None:
    stream = (
        b'data: {"promptFeedback": {"blockReason": "SAFETY","safetyRatings": []},'
        b'"usageMetadata": {"promptTokenCount": 12,"totalTokenCount": 12},'
        b'"modelVersion": "gemini-2.5-flash","responseId": "b1"}\r\n\r\n'
    )
    assert read_stream(stream) == [
        Started("b1", "gemini-2.5-flash", Usage(12, 0)),
        Finished("content_filter"),
        UsageReport(Usage(12, 0)),
    ]


def test_a_max_tokens_stream_and_a_late_usage_chunk() -> None:
    reader = CODEC.answer_reader()
    events = reader.feed(
        None,
        b'{"candidates": [{"content": {"parts": [{"text": "Once"}],"role": "model"},'
        b'"finishReason": "MAX_TOKENS","index": 0}],"modelVersion": "m","responseId": "r"}',
    )
    assert events == [Started("r", "m", None), TextDelta("Once"), Finished("length")]
    late = (
        b'{"usageMetadata": {"promptTokenCount": 3,"candidatesTokenCount": 1,"totalTokenCount": 4}}'
    )
    assert reader.feed(None, late) == [UsageReport(Usage(3, 1))]
    assert reader.feed(None, b"not json") == []


def test_an_error_chunk_midway_is_raised_with_the_upstreams_status_and_message() -> None:
    reader = CODEC.answer_reader()
    assert reader.feed(None, b'{"candidates": [{"content": {"parts": [{"text": "Hi"}]}}]}') != []
    error = b'{"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}}'
    with pytest.raises(GatewayError) as raised:
        reader.feed(None, error)
    assert (raised.value.status, raised.value.reason) == (500, "upstream_error")
    assert "Internal error" in raised.value.message


# --- write_answer ------------------------------------------------------------------------


def answer_json(answer: ChatAnswer, request: ChatRequest | None = None) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(CODEC.write_answer(answer, request or chat()))
    types.GenerateContentResponse.model_validate(body)
    return body


def test_a_text_answer_is_a_generate_content_response_with_usage() -> None:
    body = answer_json(
        ChatAnswer(
            "msg_01", "claude-sonnet-4-5", [Text("Hello!")], "stop",
            Usage(1200, 30, cache_read_tokens=1000, cache_write_tokens=100),
        )
    )  # fmt: skip
    assert body == {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": "Hello!"}]},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 1200,
            "candidatesTokenCount": 30,
            "totalTokenCount": 1230,
            "cachedContentTokenCount": 1000,
        },
        "modelVersion": "claude-sonnet-4-5",
        "responseId": "msg_01",
    }
    response = types.GenerateContentResponse.model_validate(body)
    assert response.text == "Hello!"
    assert response.usage_metadata and response.usage_metadata.cached_content_token_count == 1000


def test_tool_calls_are_function_calls_with_their_ids_and_whole_args() -> None:
    answer = ChatAnswer(
        "chatcmpl-1",
        "gpt-4o",
        [
            Text("Checking."),
            ToolCall("call_x", "get_weather", {"city": "Paris"}),
            ToolCall("call_y", "get_weather", {"city": "London"}),
        ],
        "tool_calls",
        Usage(50, 20),
    )
    response = types.GenerateContentResponse.model_validate(answer_json(answer))
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.STOP
    calls = response.function_calls or []
    assert [(c.id, c.name, c.args) for c in calls] == [
        ("call_x", "get_weather", {"city": "Paris"}),
        ("call_y", "get_weather", {"city": "London"}),
    ]


def test_reasoning_is_shown_as_thought_parts_only_when_asked() -> None:
    answer = ChatAnswer("a", "m", [Reasoning("hmm", "sig"), Text("42")], "stop", None)
    hidden = answer_json(answer)
    assert hidden["candidates"][0]["content"]["parts"] == [{"text": "42"}]
    shown = answer_json(answer, chat(show_reasoning=True))
    assert shown["candidates"][0]["content"]["parts"] == [
        {"text": "hmm", "thought": True},
        {"text": "42"},
    ]
    assert "usageMetadata" not in shown


@pytest.mark.parametrize(
    ("stop", "reason"), [("length", "MAX_TOKENS"), ("content_filter", "SAFETY")]
)
def test_stop_reasons_are_written_back(stop: Any, reason: str) -> None:
    body = answer_json(ChatAnswer("a", "m", [], stop, Usage(10, 0)))
    candidate = body["candidates"][0]
    assert candidate["finishReason"] == reason
    # A filtered answer with nothing in it has no content, as Gemini sends it.
    assert ("content" in candidate) is (stop != "content_filter")


# --- answer_writer -----------------------------------------------------------------------


def test_a_text_stream_is_written_chunk_by_chunk_and_the_finish_waits_for_usage() -> None:
    pieces, tail = write_stream(
        [
            Started("msg_1", "claude-sonnet-4-5", Usage(25, 1)),
            TextDelta("Hello"),
            TextDelta(" there"),
            Finished("stop"),
            UsageReport(Usage(25, 12, cache_read_tokens=20)),
        ]
    )
    assert pieces[0] == b""
    assert pieces[1] and pieces[2]  # each delta leaves at once
    assert pieces[3] == b""  # the finish travels with the usage
    chunks = sse_chunks([*pieces, tail])
    assert "".join(c.text or "" for c in chunks) == "Hello there"
    assert tail == b""
    last = chunks[-1]
    assert last.candidates and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata == types.GenerateContentResponseUsageMetadata(
        prompt_token_count=25,
        candidates_token_count=12,
        total_token_count=37,
        cached_content_token_count=20,
    )
    assert all(c.response_id == "msg_1" and c.model_version == "claude-sonnet-4-5" for c in chunks)
    # Every chunk has content, so google-genai's chat keeps the turn in its history.
    assert all(
        c.candidates and c.candidates[0].content and c.candidates[0].content.parts for c in chunks
    )


def test_streamed_tool_calls_leave_whole_when_complete() -> None:
    pieces, tail = write_stream(
        [
            Started("chatcmpl-9", "gpt-4o"),
            ToolCallStarted(0, "call_a", "get_weather"),
            ToolArgumentsDelta(0, '{"ci'),
            ToolArgumentsDelta(0, 'ty": "Paris"}'),
            ToolCallStarted(1, "call_b", "get_time"),
            ToolArgumentsDelta(1, ""),
            Finished("tool_calls"),
        ]
    )
    assert pieces[1:4] == [b"", b"", b""]  # held until the call is whole
    assert pieces[4]  # the next call's start completes the first
    assert pieces[5] == b""
    assert pieces[6]  # the finish completes the last
    chunks = sse_chunks([*pieces, tail])
    calls = [call for c in chunks for call in c.function_calls or []]
    assert [(c.id, c.name, c.args) for c in calls] == [
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_time", {}),
    ]
    last = chunks[-1]
    assert last.candidates and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata is None  # close() without a usage report


def test_usage_reported_before_the_finish_still_ends_the_stream_with_it() -> None:
    pieces, tail = write_stream(
        [Started("m1", "m"), TextDelta("x"), UsageReport(Usage(4, 2)), Finished("length")]
    )
    assert pieces[2] == pieces[3] == b""
    last = sse_chunks([tail])[-1]
    assert last.candidates and last.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert last.usage_metadata and last.usage_metadata.total_token_count == 6


def test_reasoning_streams_as_thoughts_only_when_asked() -> None:
    events: list[StreamEvent] = [
        Started("r", "m"),
        ReasoningDelta("thinking", "sig"),
        TextDelta("ok"),
    ]
    hidden, _ = write_stream(events)
    assert hidden[1] == b""
    shown, tail = write_stream(events, ChatRequest(model="m", stream=True, show_reasoning=True))
    parts = [p for c in sse_chunks([*shown, tail]) for p in c.candidates[0].content.parts]  # type: ignore[index, union-attr]
    assert parts[0] == types.Part(text="thinking", thought=True)


def test_a_json_array_stream_is_one_array_of_responses() -> None:
    request = ChatRequest(model="m", stream=True, json_array_stream=True)
    pieces, tail = write_stream(
        [
            Started("a1", "claude-haiku-4-5"),
            TextDelta("Hi"),
            ToolCallStarted(0, "toolu_1", "f"),
            ToolArgumentsDelta(0, '{"a": [1, 2]}'),
            Finished("tool_calls"),
            UsageReport(Usage(3, 4)),
        ],
        request,
    )
    assert pieces[1].startswith(b"[{") and tail == b"]"
    elements = json.loads(b"".join([*pieces, tail]))
    responses = [types.GenerateContentResponse.model_validate(e) for e in elements]
    assert responses[0].text == "Hi"
    assert responses[1].function_calls == [
        types.FunctionCall(id="toolu_1", name="f", args={"a": [1, 2]})
    ]
    assert responses[-1].usage_metadata and responses[-1].usage_metadata.candidates_token_count == 4
    _, end = write_stream([], request)
    final = json.loads(end)
    assert len(final) == 1 and final[0]["candidates"][0]["finishReason"] == "STOP"


def test_a_gemini_stream_read_and_written_back_keeps_its_text_and_usage() -> None:
    pieces, tail = write_stream(read_stream(TEXT_STREAM))
    chunks = sse_chunks([*pieces, tail])
    assert (
        "".join(c.text or "" for c in chunks) == "The sky is blue because of Rayleigh scattering."
    )
    usage = chunks[-1].usage_metadata
    assert usage and (usage.prompt_token_count, usage.candidates_token_count) == (9, 11)


# --- error_message -----------------------------------------------------------------------


def test_error_message_reads_googles_status_body() -> None:
    body = (
        b'{"error": {"code": 400, "message": "* GenerateContentRequest.contents: contents is not '
        b'specified\\n", "status": "INVALID_ARGUMENT"}}'
    )
    assert (
        CODEC.error_message(body)
        == "* GenerateContentRequest.contents: contents is not specified\n"
    )
    array = (
        b'[{"error": {"code": 429, "message": "Resource has been exhausted",'
        b' "status": "RESOURCE_EXHAUSTED"}}]'
    )
    assert CODEC.error_message(array) == "Resource has been exhausted"
    assert CODEC.error_message(b"<html>502 Bad Gateway</html>") == "<html>502 Bad Gateway</html>"
    assert len(CODEC.error_message(b"x" * 5000)) == 500


# --- google-genai itself, against a server that speaks through the codec ------------------


async def test_google_genai_chat_streams_a_translated_tool_call_and_answers_it() -> None:
    """The SDK's chat reads the writer's stream (history kept), and its function response
    comes back through read_request paired with the call's id."""
    seen: list[ChatRequest] = []

    async def generate(http: web.Request) -> web.StreamResponse:
        request = CODEC.read_request(
            await http.read(), Route.STREAM_GENERATE, http.match_info["model"]
        )
        seen.append(request)
        writer = CODEC.answer_writer(request)
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(http)
        for event in (
            Started("msg_1", "claude-sonnet-4-5", Usage(10, 1)),
            TextDelta("Let me check."),
            ToolCallStarted(0, "toolu_1", "get_weather"),
            ToolArgumentsDelta(0, '{"city": "Paris"}'),
            Finished("tool_calls"),
            UsageReport(Usage(10, 5)),
        ):
            await stream.write(writer.feed(event))
        await stream.write(writer.close())
        return stream

    app = web.Application()
    app.router.add_post("/v1beta/models/{model}:streamGenerateContent", generate)
    config = types.GenerateContentConfig(
        system_instruction="Be brief.",
        tools=[
            types.Tool(
                function_declarations=[
                    types.FunctionDeclaration(
                        name="get_weather",
                        parameters=types.Schema(
                            type=types.Type.OBJECT,
                            properties={"city": types.Schema(type=types.Type.STRING)},
                        ),
                    )
                ]
            )
        ],
    )
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        options = types.HttpOptions(
            base_url=str(server.make_url("")), api_version="v1beta", aiohttp_client=session
        )
        client = genai.Client(api_key="rlgw-test", http_options=options)
        chat_session = client.aio.chats.create(model="claude-sonnet-4-5", config=config)
        chunks = [c async for c in await chat_session.send_message_stream("Paris weather?")]
        reply = types.Part.from_function_response(name="get_weather", response={"output": "sun"})
        async for _ in await chat_session.send_message_stream(reply):
            pass
        await client.aio.aclose()
        client.close()
    calls = [call for c in chunks for call in c.function_calls or []]
    assert calls == [types.FunctionCall(id="toolu_1", name="get_weather", args={"city": "Paris"})]
    assert chunks[-1].usage_metadata and chunks[-1].usage_metadata.total_token_count == 15
    first, second = seen
    assert first.system == ["Be brief."]
    assert first.tools[0].parameters == {
        "type": "object",
        "properties": {"city": {"type": "string"}},
    }
    answered = second.turns[-1].parts[-1]
    assert answered == ToolResult("toolu_1", "get_weather", [Text("sun")])
