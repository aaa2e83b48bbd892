"""The three official SDKs as callers of the converter routes, behind one small interface.

Each :class:`Caller` asks a model a question in its own protocol (system prompts, an output
cap, tools, a conversation so far, extra headers, any other field), plainly or streamed, and
returns an :class:`Answer` in no protocol's words but with the caller's own stop reason, so a
test can be parametrized over the six directions (caller protocol x target model) and still
read like one. ``tool_results`` writes the caller's own answer to a turn's tool calls, to send
back on the next request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anthropic
import openai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from ratelimit_gw.testing.mock_wire import count_input_tokens

from .conftest import MODELS, Gateway
from .test_sdk_e2e import AttemptLog, anthropic_client, gemini_client, openai_client

CLAUDE, GEMINI, GPT = "claude-sonnet-4-6", "gemini-2.5-flash", "gpt-4o-mini"
PROTOCOL = {model: protocol for model, protocol, _, _ in MODELS}
USER = "Say something please."
FULL_TEXT = " ".join(f"tok{i}" for i in range(20))
MODEL_MAX_OUTPUT = 1000  # conftest.gateway_config's default_max_output
CONVERTER_BASE = {"openai": "/openai/v1", "anthropic": "/anthropic", "gemini": "/gemini"}
# The path an OpenAI or Anthropic target's upstream request goes to.
UPSTREAM_PATH = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    schema: dict[str, Any]  # JSON Schema of the arguments


WEATHER = Tool(
    "get_weather",
    "The weather in a city.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
)
CLOCK = Tool(
    "get_time",
    "The time in a time zone.",
    {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
)


@dataclass
class ToolUse:
    id: str | None
    name: str
    args: dict[str, Any]


@dataclass
class Answer:
    text: str
    stop: str  # in the caller's words
    input_tokens: int  # the usage shown to the caller
    output_tokens: int
    headers: Mapping[str, str]
    calls: list[ToolUse] = field(default_factory=list)
    events: int = 1  # chunks or events of a stream
    turn: Any = None  # the assistant's turn in the caller's shape, to send back in history
    cached: int = 0  # the input tokens shown as read from a prompt cache


@dataclass(frozen=True)
class Stops:
    end: str
    length: str
    tool: str


@dataclass
class CallerError:
    """An error the SDK raised, read out of the caller's envelope."""

    status: int
    type: str | None  # OpenAI/Anthropic error type, Gemini status
    reason: str | None
    message: str
    param: str | None
    exception: Exception


class Caller:
    protocol: str
    stops: Stops
    client: Any  # the SDK's async client

    def user(self, text: str = USER) -> list[Any]:
        raise NotImplementedError

    async def ask(
        self,
        model: str,
        *,
        systems: Sequence[str] = (),
        max_tokens: int | None = None,
        stream: bool = False,
        headers: dict[str, str] | None = None,
        tools: Sequence[Tool] = (),
        history: list[Any] | None = None,
        **extra: Any,
    ) -> Answer:
        raise NotImplementedError

    def tool_results(self, answer: Answer, result: str) -> list[Any]:
        """The assistant's tool-call turn and the caller's answer to each of its calls."""
        raise NotImplementedError

    async def error(self, model: str, **options: Any) -> CallerError:
        """Ask, expecting the SDK to raise: what it raised, read out of the envelope."""
        raise NotImplementedError


# --- OpenAI Chat Completions ------------------------------------------------------------------


class OpenAICaller(Caller):
    protocol = "openai"
    stops = Stops("stop", "length", "tool_calls")

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self.client = client

    def user(self, text: str = USER) -> list[Any]:
        return [{"role": "user", "content": text}]

    def _kwargs(
        self,
        model: str,
        systems: Sequence[str],
        max_tokens: int | None,
        headers: dict[str, str] | None,
        tools: Sequence[Tool],
        history: list[Any] | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        messages = [{"role": "system", "content": s} for s in systems]
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": messages + (history or self.user()),
            **extra,
        }
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if headers:
            kwargs["extra_headers"] = headers
        if tools:
            kwargs["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.schema,
                    },
                }
                for t in tools
            ]
        return kwargs

    async def ask(
        self,
        model: str,
        *,
        systems: Sequence[str] = (),
        max_tokens: int | None = None,
        stream: bool = False,
        headers: dict[str, str] | None = None,
        tools: Sequence[Tool] = (),
        history: list[Any] | None = None,
        **extra: Any,
    ) -> Answer:
        kwargs = self._kwargs(model, systems, max_tokens, headers, tools, history, extra)
        completions = self.client.chat.completions.with_raw_response
        if not stream:
            raw = await completions.create(**kwargs)
            resp = raw.parse()
            choice = resp.choices[0]
            assert resp.usage is not None and choice.finish_reason is not None
            cached = _openai_cached(resp.usage)
            calls = [
                ToolUse(c.id, c.function.name, json.loads(c.function.arguments))
                for c in choice.message.tool_calls or []
                if c.type == "function"
            ]
            return self._answer(
                choice.message.content or "",
                choice.finish_reason,
                (resp.usage.prompt_tokens, resp.usage.completion_tokens),
                raw.headers,
                calls,
                1,
                cached,
            )
        raw = await completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
        chunks = [chunk async for chunk in raw.parse()]
        text, stop, usage, cached = "", "", (0, 0), 0
        pending: dict[int, dict[str, str]] = {}
        for chunk in chunks:
            if chunk.usage is not None:
                usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                cached = _openai_cached(chunk.usage)
            for choice in chunk.choices:
                text += choice.delta.content or ""
                stop = choice.finish_reason or stop
                for delta in choice.delta.tool_calls or []:
                    call = pending.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    if delta.id:
                        call["id"] = delta.id
                    if delta.function is not None:
                        call["name"] += delta.function.name or ""
                        call["arguments"] += delta.function.arguments or ""
        calls = [
            ToolUse(c["id"], c["name"], json.loads(c["arguments"]))
            for _, c in sorted(pending.items())
        ]
        return self._answer(text, stop, usage, raw.headers, calls, len(chunks), cached)

    @staticmethod
    def _answer(
        text: str,
        stop: str,
        usage: tuple[int, int],
        headers: Mapping[str, str],
        calls: list[ToolUse],
        events: int,
        cached: int,
    ) -> Answer:
        turn: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            turn["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.args)},
                }
                for c in calls
            ]
        return Answer(text, stop, *usage, headers, calls, events, turn, cached)

    def tool_results(self, answer: Answer, result: str) -> list[Any]:
        replies = [{"role": "tool", "tool_call_id": c.id, "content": result} for c in answer.calls]
        return [answer.turn, *replies]

    async def error(self, model: str, **options: Any) -> CallerError:
        try:
            await self.ask(model, **options)
        except openai.APIStatusError as err:
            assert isinstance(err.body, dict)  # the SDK unwraps {"error": {...}}
            return CallerError(
                err.status_code,
                err.body.get("type"),
                err.body.get("reason"),
                err.body["message"],
                err.body.get("param"),
                err,
            )
        raise AssertionError("the call succeeded")


def _openai_cached(usage: Any) -> int:
    details = usage.prompt_tokens_details
    return (details.cached_tokens or 0) if details is not None else 0


# --- Anthropic Messages -----------------------------------------------------------------------


class AnthropicCaller(Caller):
    protocol = "anthropic"
    stops = Stops("end_turn", "max_tokens", "tool_use")
    default_max_tokens = 500  # the SDK requires one

    def __init__(self, client: anthropic.AsyncAnthropic) -> None:
        self.client = client

    def user(self, text: str = USER) -> list[Any]:
        return [{"role": "user", "content": text}]

    async def ask(
        self,
        model: str,
        *,
        systems: Sequence[str] = (),
        max_tokens: int | None = None,
        stream: bool = False,
        headers: dict[str, str] | None = None,
        tools: Sequence[Tool] = (),
        history: list[Any] | None = None,
        **extra: Any,
    ) -> Answer:
        kwargs: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens or self.default_max_tokens,
            "messages": history or self.user(),
        }
        if extra:  # this SDK version takes no sampling fields as arguments
            kwargs["extra_body"] = extra
        if len(systems) == 1:
            kwargs["system"] = systems[0]
        elif systems:
            kwargs["system"] = [{"type": "text", "text": s} for s in systems]
        if headers:
            kwargs["extra_headers"] = headers
        if tools:
            kwargs["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.schema}
                for t in tools
            ]
        if not stream:
            raw = await self.client.messages.with_raw_response.create(**kwargs)
            return self._answer(await raw.parse(), raw.headers, 1)
        async with self.client.messages.stream(**kwargs) as events:
            count = len([event async for event in events])
            message = await events.get_final_message()
            return self._answer(message, events.response.headers, count)

    def _answer(self, msg: Any, headers: Mapping[str, str], events: int) -> Answer:
        text = "".join(b.text for b in msg.content if b.type == "text")
        calls = [ToolUse(b.id, b.name, b.input) for b in msg.content if b.type == "tool_use"]
        turn_content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        turn_content += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": c.args} for c in calls
        ]
        usage = (msg.usage.input_tokens, msg.usage.output_tokens)
        turn = {"role": "assistant", "content": turn_content}
        cached = msg.usage.cache_read_input_tokens or 0
        return Answer(text, msg.stop_reason, *usage, headers, calls, events, turn, cached)

    def tool_results(self, answer: Answer, result: str) -> list[Any]:
        results = [
            {"type": "tool_result", "tool_use_id": c.id, "content": result} for c in answer.calls
        ]
        return [answer.turn, {"role": "user", "content": results}]

    async def error(self, model: str, **options: Any) -> CallerError:
        try:
            await self.ask(model, **options)
        except anthropic.APIStatusError as err:
            assert isinstance(err.body, dict) and err.body["type"] == "error"
            inner = err.body["error"]
            return CallerError(
                err.status_code,
                inner.get("type"),
                inner.get("reason"),
                inner["message"],
                inner.get("param"),
                err,
            )
        raise AssertionError("the call succeeded")


# --- Gemini generateContent -------------------------------------------------------------------


class GeminiCaller(Caller):
    protocol = "gemini"
    stops = Stops("STOP", "MAX_TOKENS", "STOP")  # Gemini has no stop reason of its own for calls

    def __init__(self, client: Any) -> None:
        self.client = client  # genai.client.AsyncClient

    def user(self, text: str = USER) -> list[Any]:
        return [genai_types.Content(role="user", parts=[genai_types.Part(text=text)])]

    async def ask(
        self,
        model: str,
        *,
        systems: Sequence[str] = (),
        max_tokens: int | None = None,
        stream: bool = False,
        headers: dict[str, str] | None = None,
        tools: Sequence[Tool] = (),
        history: list[Any] | None = None,
        **extra: Any,
    ) -> Answer:
        config = genai_types.GenerateContentConfig(
            system_instruction=(
                genai_types.Content(parts=[genai_types.Part(text=s) for s in systems])
                if systems
                else None
            ),
            max_output_tokens=max_tokens,
            http_options=genai_types.HttpOptions(headers=headers) if headers else None,
            tools=(
                [
                    genai_types.Tool(
                        function_declarations=[
                            genai_types.FunctionDeclaration(
                                name=t.name,
                                description=t.description,
                                parameters_json_schema=t.schema,
                            )
                            for t in tools
                        ]
                    )
                ]
                if tools
                else None
            ),
            automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(disable=True),
            **extra,
        )
        contents = history or self.user()
        models = self.client.models
        if not stream:
            resp = await models.generate_content(model=model, contents=contents, config=config)
            return self._answer([resp])
        chunks = [
            c
            async for c in await models.generate_content_stream(
                model=model, contents=contents, config=config
            )
        ]
        return self._answer(chunks)

    @staticmethod
    def _answer(chunks: list[genai_types.GenerateContentResponse]) -> Answer:
        text, stop, usage, cached = "", "", (0, 0), 0
        calls: list[ToolUse] = []
        parts: list[genai_types.Part] = []
        for chunk in chunks:
            if chunk.usage_metadata is not None:
                meta = chunk.usage_metadata
                usage = (meta.prompt_token_count or 0, meta.candidates_token_count or 0)
                cached = meta.cached_content_token_count or 0
            for candidate in chunk.candidates or []:
                if candidate.finish_reason is not None:
                    stop = candidate.finish_reason.value
                for part in (candidate.content.parts if candidate.content else None) or []:
                    parts.append(part)
                    text += part.text or ""
                    if part.function_call is not None:
                        fc = part.function_call
                        calls.append(ToolUse(fc.id, fc.name or "", dict(fc.args or {})))
        http = chunks[0].sdk_http_response
        headers = dict(http.headers or {}) if http is not None else {}
        turn = genai_types.Content(role="model", parts=parts)
        return Answer(text, stop, *usage, headers, calls, len(chunks), turn, cached)

    def tool_results(self, answer: Answer, result: str) -> list[Any]:
        responses = [
            genai_types.Part(
                function_response=genai_types.FunctionResponse(
                    id=c.id, name=c.name, response={"result": result}
                )
            )
            for c in answer.calls
        ]
        return [answer.turn, genai_types.Content(role="user", parts=responses)]

    async def error(self, model: str, **options: Any) -> CallerError:
        try:
            await self.ask(model, **options)
        except genai_errors.APIError as err:
            inner = err.details["error"]
            return CallerError(
                err.code, err.status, inner.get("reason"), inner["message"], None, err
            )
        raise AssertionError("the call succeeded")


@asynccontextmanager
async def caller(
    gw: Gateway,
    protocol: str,
    key: str,
    *,
    base_path: str | None = None,
    log: AttemptLog | None = None,
    trace_configs: list[aiohttp.TraceConfig] | None = None,
) -> AsyncIterator[Caller]:
    """The protocol's SDK pointed at its converter base URL (or ``base_path``), no retries."""
    path = CONVERTER_BASE[protocol] if base_path is None else base_path
    if protocol == "openai":
        async with openai_client(gw, key, log=log, base_path=path) as oai:
            yield OpenAICaller(oai)
    elif protocol == "anthropic":
        async with anthropic_client(gw, key, log=log, base_path=path) as claude:
            yield AnthropicCaller(claude)
    else:
        async with gemini_client(gw, key, base_path=path, trace_configs=trace_configs) as gem:
            yield GeminiCaller(gem)


def upstream_body(gw: Gateway) -> dict[str, Any]:
    body = gw.upstream.state.requests[-1].json()
    assert isinstance(body, dict)
    return body


def upstream_usage(gw: Gateway, output_tokens: int) -> tuple[int, int]:
    """What the mock reported for the last request: input counted from the body it got."""
    return count_input_tokens(upstream_body(gw)), output_tokens
