"""OpenAI → Anthropic → OpenAI request translation keeps every mapped field (issue 19).

Hypothesis builds OpenAI chat requests out of the fields both protocols have (system
messages anywhere, user and assistant turns, text, images as data URLs, tool definitions,
tool calls and their results, tool choice, parallel tool use, the cap, temperature, top_p,
stop sequences). Each goes through the OpenAI codec's reader, the Anthropic codec's writer
and reader, and the OpenAI codec's writer and reader; what comes back must equal what went
in, once both are normalised for what the trip merges by design: every system message into
one, consecutive turns of one role into one, a turn's tool results before its other parts,
and adjacent assistant texts into one text.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratelimit_gw.protocols import Route
from ratelimit_gw.protocols.translation import CODECS
from ratelimit_gw.protocols.translation.ir import ChatRequest, Image, Text, ToolResult, Turn

OPENAI, ANTHROPIC = CODECS["openai"], CODECS["anthropic"]
MODEL = "claude-sonnet-4-6"
TOOL_NAMES = ("get_weather", "lookup", "send_mail")
PNG = "iVBORw0KGgo="  # base64 of a PNG signature: the bytes are never decoded

words = st.text(alphabet="abcdefghij XYZ.,", min_size=1, max_size=12).filter(str.strip)
arguments = st.dictionaries(
    st.sampled_from(("city", "q", "n", "flag")),
    st.one_of(words, st.integers(-5, 5), st.booleans()),
    max_size=3,
)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Messages in a valid order: each assistant's tool calls are answered right after."""
    messages: list[dict[str, Any]] = []
    call_number = 0
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            messages.append(
                {"role": draw(st.sampled_from(("system", "developer"))), "content": draw(words)}
            )
        user: Any = draw(words)
        if draw(st.booleans()):
            user = [{"type": "text", "text": draw(words)}]
            if draw(st.booleans()):
                user.append(
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
                )
        messages.append({"role": "user", "content": user})
        if draw(st.booleans()):
            continue  # two user turns in a row: the trip merges them
        calls = []
        for _ in range(draw(st.integers(0, 2))):
            call_number += 1
            calls.append(
                {
                    "id": f"call_{call_number}",
                    "type": "function",
                    "function": {
                        "name": draw(st.sampled_from(TOOL_NAMES)),
                        "arguments": json.dumps(draw(arguments)),
                    },
                }
            )
        assistant: dict[str, Any] = {"role": "assistant", "content": draw(words)}
        if calls:
            assistant["tool_calls"] = calls
            if draw(st.booleans()):
                assistant["content"] = None
        messages.append(assistant)
        for call in calls:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": draw(words)})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": draw(words)})
    return messages


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": draw(conversations())}
    if draw(st.booleans()):
        body["max_completion_tokens"] = draw(st.integers(1, 4000))
    if draw(st.booleans()):
        body["temperature"] = draw(st.sampled_from((0.0, 0.5, 1.0)))
    if draw(st.booleans()):
        body["top_p"] = draw(st.sampled_from((0.5, 0.9, 1.0)))
    if draw(st.booleans()):
        body["stop"] = draw(st.lists(words, min_size=1, max_size=3, unique=True))
    # Tool calls in the history come with their tools (without them, the Anthropic writer
    # declares placeholders with tool use off: a documented change, not a loss).
    has_calls = any("tool_calls" in m for m in body["messages"])
    if has_calls or draw(st.booleans()):
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": f"{name} tool",
                    "parameters": {
                        "type": "object",
                        "properties": {"q": {"type": "string"}},
                        "required": ["q"],
                    },
                },
            }
            for name in TOOL_NAMES
        ]
        choice = draw(st.sampled_from(("auto", "required", "none", "named", None)))
        if choice == "named":
            body["tool_choice"] = {"type": "function", "function": {"name": TOOL_NAMES[1]}}
        elif choice is not None:
            body["tool_choice"] = choice
        if draw(st.booleans()):
            body["parallel_tool_calls"] = False
    return body


def normalised(request: ChatRequest) -> dict[str, Any]:
    """The request's meaning, with what the trip merges by design merged."""
    turns: list[Turn] = []
    for turn in request.turns:
        if turns and turns[-1].role == turn.role:
            turns[-1].parts.extend(turn.parts)
        else:
            turns.append(Turn(turn.role, list(turn.parts)))
    shaped = []
    for turn in turns:
        results = [p for p in turn.parts if isinstance(p, ToolResult)]
        others = [p for p in turn.parts if not isinstance(p, ToolResult)]
        parts: list[Any] = []
        for part in [*results, *others]:
            if (
                turn.role == "assistant"
                and isinstance(part, Text)
                and parts
                and isinstance(parts[-1], Text)
            ):
                parts[-1] = Text(parts[-1].text + part.text)
            else:
                parts.append(part)
        shaped.append((turn.role, [_part(p) for p in parts]))
    return {
        "system": "\n\n".join(request.system),
        "turns": shaped,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop": request.stop,
        "tools": [(t.name, t.description, t.parameters) for t in request.tools],
        # with tools, no choice means "auto" in both protocols
        "tool_choice": request.tool_choice or ("auto" if request.tools else None),
        # with tool use off there is nothing to run in parallel (Anthropic's "none" choice
        # has no such flag)
        "parallel_tool_calls": request.parallel_tool_calls is not False
        or request.tool_choice == "none",
    }


def _part(part: Any) -> Any:
    if isinstance(part, Image):  # its param names where the caller put it: not the content
        return ("image", part.media_type, part.data, part.url)
    if isinstance(part, ToolResult):
        # the name is paired from the history on each side; the content's shape is the point
        return ("tool_result", part.call_id, [_part(p) for p in part.content], part.is_error)
    return part


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_openai_to_anthropic_to_openai_keeps_every_mapped_field(body: dict[str, Any]) -> None:
    sent = OPENAI.read_request(json.dumps(body).encode(), Route.CHAT, None)
    anthropic_body = ANTHROPIC.write_request(sent, MODEL, 4096)
    via_anthropic = ANTHROPIC.read_request(anthropic_body, Route.MESSAGES, None)
    openai_body = OPENAI.write_request(via_anthropic, MODEL, 4096)
    back = OPENAI.read_request(openai_body, Route.CHAT, None)

    expected = normalised(sent)
    if expected["max_tokens"] is None:
        expected["max_tokens"] = 4096  # Anthropic requires a cap: the default is sent
    assert normalised(back) == expected
