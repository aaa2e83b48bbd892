"""OpenAI protocol: `/v1/chat/completions` and `/v1/responses`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.base import (
    MaxTokens,
    ProtocolAdapter,
    RequestInfo,
    Route,
    SseStreamTap,
    StreamTap,
    Usage,
    bearer_token,
    decode_view,
    encode_json,
    rate_limit_body,
    require_model,
    sse_event_fields,
)

# --- request views ------------------------------------------------------------------


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _ChatRequest(msgspec.Struct):
    model: str | None = None
    stream: bool | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stream_options: _StreamOptions | None = None


class _ResponsesRequest(msgspec.Struct):
    model: str | None = None
    stream: bool | None = None
    max_output_tokens: MaxTokens | None = None


# --- answer views -------------------------------------------------------------------


class _ChatUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _ChatBody(msgspec.Struct):
    usage: _ChatUsage | None = None


class _ResponsesUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None


class _ResponsesBody(msgspec.Struct):
    usage: _ResponsesUsage | None = None


class _Function(msgspec.Struct):
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _ChatChunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _ChatUsage | None = None


class _ResponsesEvent(msgspec.Struct):
    type: str = ""
    delta: str | None = None
    response: _ResponsesBody | None = None


_CHAT_REQUEST = msgspec.json.Decoder(_ChatRequest)
_RESPONSES_REQUEST = msgspec.json.Decoder(_ResponsesRequest)
_CHAT_BODY = msgspec.json.Decoder(_ChatBody)
_RESPONSES_BODY = msgspec.json.Decoder(_ResponsesBody)
_CHAT_CHUNK = msgspec.json.Decoder(_ChatChunk)
_RESPONSES_EVENT = msgspec.json.Decoder(_ResponsesEvent)
_ANY_JSON = msgspec.json.Decoder()

# Generated text arrives in these events (tool-call arguments count: they are output too).
_RESPONSES_TEXT_EVENTS = frozenset(
    {"response.output_text.delta", "response.function_call_arguments.delta"}
)
_RESPONSES_USAGE_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)


def _chat_usage(usage: _ChatUsage) -> Usage:
    return Usage(usage.prompt_tokens or 0, usage.completion_tokens or 0)


def _responses_usage(usage: _ResponsesUsage) -> Usage:
    return Usage(usage.input_tokens or 0, usage.output_tokens or 0)


class ChatStreamTap(SseStreamTap):
    """Chat SSE: ``data:`` frames only; usage rides in a final ``choices: []`` chunk."""

    def __init__(self, strip_usage_chunk: bool) -> None:
        super().__init__()
        self._strip_usage_chunk = strip_usage_chunk

    def on_event(self, event: bytes) -> bool:
        _, data = sse_event_fields(event)
        if data is None or data.startswith(b"["):  # no payload, or the `[DONE]` sentinel
            return True
        try:
            chunk = _CHAT_CHUNK.decode(data)
        except msgspec.DecodeError:
            return True
        for choice in chunk.choices or ():
            delta = choice.delta
            if delta is None:
                continue
            self.output_chars += len(delta.content or "")
            for call in delta.tool_calls or ():
                if call.function is not None:
                    self.output_chars += len(call.function.arguments or "")
        usage = chunk.usage
        if usage is None or (usage.prompt_tokens is None and usage.completion_tokens is None):
            return True  # no usage, or a usage object with no count in it: nothing reported
        self.usage = _chat_usage(usage)
        # Only the chunk the gateway itself asked for (§8) is hidden from the client.
        return not (self._strip_usage_chunk and chunk.choices == [])


class ResponsesStreamTap(SseStreamTap):
    """Responses SSE: named events; usage in the terminal ``response.*`` event."""

    def on_event(self, event: bytes) -> bool:
        name, data = sse_event_fields(event)
        if data is None or (
            name is not None
            and name not in _RESPONSES_TEXT_EVENTS
            and name not in _RESPONSES_USAGE_EVENTS
        ):
            return True
        try:
            parsed = _RESPONSES_EVENT.decode(data)
        except msgspec.DecodeError:
            return True
        if parsed.type in _RESPONSES_TEXT_EVENTS:
            self.output_chars += len(parsed.delta or "")
        elif parsed.response is not None and parsed.response.usage is not None:
            self.usage = _responses_usage(parsed.response.usage)
        return True


class OpenAIAdapter(ProtocolAdapter):
    name = "openai"

    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return bearer_token(headers)

    def parse_request(self, route: Route, body: bytes, path_model: str | None) -> RequestInfo:
        if route is Route.CHAT:
            chat = decode_view(_CHAT_REQUEST, body)
            options = chat.stream_options
            return RequestInfo(
                model=require_model(chat.model),
                stream=bool(chat.stream),
                # max_tokens is the deprecated spelling; the newer field wins when both exist.
                max_output_tokens=(
                    chat.max_completion_tokens
                    if chat.max_completion_tokens is not None
                    else chat.max_tokens
                ),
                input_chars=len(body),
                wants_usage_chunk=options is not None and options.include_usage is True,
            )
        responses = decode_view(_RESPONSES_REQUEST, body)
        return RequestInfo(
            model=require_model(responses.model),
            stream=bool(responses.stream),
            max_output_tokens=responses.max_output_tokens,
            input_chars=len(body),
            wants_usage_chunk=False,
        )

    def prepare_upstream_body(self, route: Route, body: bytes, info: RequestInfo) -> bytes:
        # A chat stream reports usage only when asked (§8); the one case the body changes.
        if route is not Route.CHAT or not info.stream or info.wants_usage_chunk:
            return body
        doc: dict[str, Any] = _ANY_JSON.decode(body)
        doc["stream_options"] = {**(doc.get("stream_options") or {}), "include_usage": True}
        return encode_json(doc)

    def usage_from_body(self, route: Route, body: bytes) -> Usage | None:
        try:
            if route is Route.CHAT:
                chat = _CHAT_BODY.decode(body).usage
                return _chat_usage(chat) if chat is not None else None
            responses = _RESPONSES_BODY.decode(body).usage
            return _responses_usage(responses) if responses is not None else None
        except msgspec.DecodeError:
            return None

    def new_stream_tap(
        self, route: Route, strip_usage_chunk: bool, *, sse: bool = True
    ) -> StreamTap:
        if route is Route.CHAT:
            return ChatStreamTap(strip_usage_chunk)
        return ResponsesStreamTap()

    def error_body(self, err: GatewayError, request_id: str) -> bytes:
        error: dict[str, object] = {
            "type": err.type,
            "code": str(err.status),
            "reason": err.reason,
            "message": err.message,
            "param": err.param,
        }
        if err.status == 429:
            error["rate_limit"] = rate_limit_body(err)
        return encode_json({"error": error})
