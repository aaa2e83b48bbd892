"""Tool calls across the converter routes, driven by the official SDKs in all six directions:
a tool definition reaches the upstream in its protocol's shape, the mock's call(s) come back
in the caller's (plain and streamed, one call or two in parallel), the caller answers them in
its own shape, the upstream receives the results in its shape paired with the right call, and
the mock then answers with text.

The mock (ratelimit_gw/testing/mock_tools.py, mock_wire.py) answers a request that declares
tools with ``x-mock-tool-calls`` calls (default 1) cycling through the declared tools, each
argument derived from the schema (a string property ``p`` is ``"p-value"``, an enum its first
value), each call costing ``ceil(len(compact arguments JSON) / 4)`` output tokens, with ids
``call_``/``toolu_`` + the reply's sequence number (16 hex) + the call's index (8 hex); a
Gemini call has no id. Its latest input being a tool result, it answers text.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.genai import types as genai_types

from .conftest import Gateway
from .converter_callers import (
    CLAUDE,
    CLOCK,
    FULL_TEXT,
    GEMINI,
    GPT,
    PROTOCOL,
    WEATHER,
    caller,
    upstream_body,
    upstream_usage,
)
from .test_converter_e2e import DIRECTIONS, assert_charged, assert_reached

RESULT = "sunny, 21 degrees"
ARGS = {
    "get_weather": {"city": "city-value", "unit": "celsius"},
    "get_time": {"zone": "zone-value"},
}


def call_tokens(name: str) -> int:
    return -(-len(json.dumps(ARGS[name], separators=(",", ":"))) // 4)


def mock_call_id(target: str, seq: int, index: int) -> str | None:
    """The id the mock gave call ``index`` of its ``seq``-th reply (mock_wire.Reply.call_id)."""
    prefix = {"openai": "call_", "anthropic": "toolu_"}.get(target)
    return None if prefix is None else f"{prefix}{seq:016x}{index:08x}"


def declared_tools(body: dict[str, Any], target: str) -> dict[str, dict[str, Any]]:
    """The tools the upstream got, by name, with their argument schema."""
    if target == "openai":
        return {t["function"]["name"]: t["function"]["parameters"] for t in body["tools"]}
    if target == "anthropic":
        return {t["name"]: t["input_schema"] for t in body["tools"]}
    return {
        d["name"]: d.get("parametersJsonSchema", d.get("parameters"))
        for tool in body["tools"]
        for d in tool["functionDeclarations"]
    }


def text_of(content: Any) -> str:
    """A tool result's content as text, in whichever shape it came."""
    if isinstance(content, str):
        return content
    return json.dumps(content)


def received_results(body: dict[str, Any], target: str) -> list[tuple[str | None, str, str]]:
    """The tool results of the upstream's last turn: (call id, function name or "", text)."""
    if target == "openai":
        tools = []
        for message in reversed(body["messages"]):
            if message["role"] != "tool":
                break
            tools.insert(0, (message["tool_call_id"], "", text_of(message["content"])))
        return tools
    if target == "anthropic":
        last = body["messages"][-1]
        assert last["role"] == "user"
        return [
            (block["tool_use_id"], "", text_of(block["content"]))
            for block in last["content"]
            if block["type"] == "tool_result"
        ]
    last = body["contents"][-1]
    assert last["role"] == "user"
    return [
        (part["functionResponse"].get("id"), part["functionResponse"]["name"], text_of(part))
        for part in last["parts"]
        if "functionResponse" in part
    ]


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS)
@pytest.mark.parametrize(
    ("stream", "calls"),
    # One call answered whole, two parallel calls streamed (a streamed single call is the
    # first half of the latter; the named-choice test below has single plain calls too).
    [(False, 1), (True, 2)],
    ids=["plain", "streamed-parallel"],
)
async def test_tool_call_round_trip(
    gateway: Gateway, protocol: str, model: str, stream: bool, calls: int
) -> None:
    target = PROTOCOL[model]
    tools = [WEATHER, CLOCK] if calls == 2 else [WEATHER]
    names = [t.name for t in tools]
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        asked = await sdk.ask(
            model,
            tools=tools,
            stream=stream,
            headers={"x-mock-tool-calls": str(calls)},
        )
        # The definitions reached the upstream in its shape, schemas intact.
        declared = declared_tools(upstream_body(gateway), target)
        assert {name: schema["properties"] for name, schema in declared.items()} == {
            t.name: t.schema["properties"] for t in tools
        }
        # The calls came back in the caller's shape, stopped for tool use, usage as reported.
        assert [(c.name, c.args) for c in asked.calls] == [(n, ARGS[n]) for n in names]
        assert all(c.id for c in asked.calls) or protocol == "gemini"
        assert len({c.id for c in asked.calls}) == calls or protocol == "gemini"
        assert (asked.text, asked.stop) == ("", sdk.stops.tool)
        usage = upstream_usage(gateway, sum(call_tokens(n) for n in names))
        assert (asked.input_tokens, asked.output_tokens) == usage
        await assert_charged(gateway, model, usage)

        # The caller answers in its own shape; the upstream gets its own, paired right.
        history = sdk.user() + sdk.tool_results(asked, RESULT)
        answer = await sdk.ask(model, tools=tools, stream=stream, history=history)
    body = upstream_body(gateway)
    received = received_results(body, target)
    assert len(received) == calls
    for index, (call_id, name, text) in enumerate(received):
        assert RESULT in text
        if target == "gemini":
            assert name == names[index]  # Gemini pairs a functionResponse by name
        else:
            assert call_id == mock_call_id(target, 1, index)  # the upstream's own call id
    if target != "gemini":
        assert upstream_history_calls(body, target) == [
            (mock_call_id(target, 1, i), n) for i, n in enumerate(names)
        ]
    assert (answer.text, answer.stop) == (FULL_TEXT, sdk.stops.end)
    usage = upstream_usage(gateway, 20)
    assert (answer.input_tokens, answer.output_tokens) == usage
    assert_reached(gateway, model)
    await assert_charged(gateway, model, usage, count=2)


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
async def test_a_gemini_target_gets_function_responses_by_name_in_call_order(
    gateway: Gateway, protocol: str
) -> None:
    """Gemini calls carry no id: the codec makes the caller's ids and maps them back."""
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        asked = await sdk.ask(GEMINI, tools=[WEATHER, CLOCK], headers={"x-mock-tool-calls": "3"})
        assert [c.name for c in asked.calls] == ["get_weather", "get_time", "get_weather"]
        assert len({c.id for c in asked.calls}) == 3
        history = sdk.user() + sdk.tool_results(asked, RESULT)
        await sdk.ask(GEMINI, tools=[WEATHER, CLOCK], history=history)
    body = upstream_body(gateway)
    [model_turn] = [c for c in body["contents"] if c["role"] == "model"]
    assert [p["functionCall"]["name"] for p in model_turn["parts"]] == [
        "get_weather",
        "get_time",
        "get_weather",
    ]
    assert [name for _, name, _ in received_results(body, "gemini")] == [
        "get_weather",
        "get_time",
        "get_weather",
    ]


def upstream_history_calls(body: dict[str, Any], target: str) -> list[tuple[str, str]]:
    """The (id, name) of the calls in the assistant turn the upstream got back in history."""
    if target == "openai":
        [turn] = [m for m in body["messages"] if m["role"] == "assistant"]
        return [(c["id"], c["function"]["name"]) for c in turn["tool_calls"]]
    [turn] = [m for m in body["messages"] if m["role"] == "assistant"]
    return [(b["id"], b["name"]) for b in turn["content"] if b["type"] == "tool_use"]


@pytest.mark.parametrize("model", [GPT, CLAUDE])
async def test_a_gemini_caller_may_answer_calls_without_their_ids(
    gateway: Gateway, model: str
) -> None:
    """A Gemini caller may send its history without call ids (pairing a functionResponse with
    its call by name, as the real API allows): the upstream then gets ids the codec made,
    each result under its own call's id."""
    target = PROTOCOL[model]
    key = await gateway.new_key()
    async with caller(gateway, "gemini", key) as sdk:
        asked = await sdk.ask(model, tools=[WEATHER, CLOCK], headers={"x-mock-tool-calls": "2"})
        for call in asked.calls:
            call.id = None
        for part in asked.turn.parts:
            part.function_call.id = None
        history = sdk.user() + sdk.tool_results(asked, RESULT)
        answer = await sdk.ask(model, tools=[WEATHER, CLOCK], history=history)
    assert answer.text == FULL_TEXT
    body = upstream_body(gateway)
    calls = upstream_history_calls(body, target)
    assert [name for _, name in calls] == ["get_weather", "get_time"]
    assert len({call_id for call_id, _ in calls}) == 2
    received = received_results(body, target)
    assert [call_id for call_id, _, _ in received] == [call_id for call_id, _ in calls]


def tool_choice(protocol: str, choice: str) -> dict[str, Any]:
    """The caller's own words for: call ``get_time`` ("get_time"), call nothing ("none")."""
    if protocol == "openai":
        named = {"type": "function", "function": {"name": choice}}
        return {"tool_choice": "none" if choice == "none" else named}
    if protocol == "anthropic":
        named = {"type": "tool", "name": choice}
        return {"tool_choice": {"type": "none"} if choice == "none" else named}
    config = (
        genai_types.FunctionCallingConfig(mode=genai_types.FunctionCallingConfigMode.NONE)
        if choice == "none"
        else genai_types.FunctionCallingConfig(
            mode=genai_types.FunctionCallingConfigMode.ANY, allowed_function_names=[choice]
        )
    )
    return {"tool_config": genai_types.ToolConfig(function_calling_config=config)}


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS)
async def test_a_named_tool_choice_is_the_tool_called(
    gateway: Gateway, protocol: str, model: str
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        answer = await sdk.ask(model, tools=[WEATHER, CLOCK], **tool_choice(protocol, "get_time"))
    assert [(c.name, c.args) for c in answer.calls] == [("get_time", ARGS["get_time"])]
    assert answer.stop == sdk.stops.tool


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS)
async def test_tool_choice_none_is_answered_with_text(
    gateway: Gateway, protocol: str, model: str
) -> None:
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        answer = await sdk.ask(model, tools=[WEATHER], stream=True, **tool_choice(protocol, "none"))
    assert (answer.text, answer.calls, answer.stop) == (FULL_TEXT, [], sdk.stops.end)


@pytest.mark.parametrize(("protocol", "model"), DIRECTIONS[:4])  # Gemini callers: no such option
async def test_parallel_calls_turned_off_by_the_caller(
    gateway: Gateway, protocol: str, model: str
) -> None:
    """Mapped toward OpenAI and Anthropic (one call); Gemini has no switch for it, so toward
    Gemini it is dropped and named (docs/converters.md), and the upstream's calls all come."""
    name = (
        "parallel_tool_calls" if protocol == "openai" else "tool_choice.disable_parallel_tool_use"
    )
    off: dict[str, Any] = (
        {"parallel_tool_calls": False}
        if protocol == "openai"
        else {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    )
    key = await gateway.new_key()
    async with caller(gateway, protocol, key) as sdk:
        answer = await sdk.ask(
            model, tools=[WEATHER, CLOCK], headers={"x-mock-tool-calls": "2"}, **off
        )
    headers = {k.lower(): v for k, v in answer.headers.items()}
    dropped = {n.strip() for n in headers.get("x-rlgw-dropped-params", "").split(",")}
    if PROTOCOL[model] == "gemini":
        assert name in dropped
        assert [c.name for c in answer.calls] == ["get_weather", "get_time"]
    else:
        assert name not in dropped
        assert [c.name for c in answer.calls] == ["get_weather"]
