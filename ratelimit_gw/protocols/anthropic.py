"""Anthropic protocol: `/v1/messages`."""

from __future__ import annotations

from collections.abc import Mapping

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
    header_value,
    rate_limit_body,
    require_model,
    sse_event_fields,
)


class _MessagesRequest(msgspec.Struct):
    model: str | None = None
    stream: bool | None = None
    max_tokens: MaxTokens | None = None


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(msgspec.Struct):
    usage: _Usage | None = None


class _Delta(msgspec.Struct):
    # One view for both delta shapes: content_block_delta (text/JSON/thinking) and
    # message_delta (stop_reason, not read here).
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None


class _Event(msgspec.Struct):
    type: str = ""
    message: _Message | None = None
    delta: _Delta | None = None
    usage: _Usage | None = None


_MESSAGES_REQUEST = msgspec.json.Decoder(_MessagesRequest)
_MESSAGE = msgspec.json.Decoder(_Message)
_EVENT = msgspec.json.Decoder(_Event)

# Events that carry usage or generated text; ping, block start/stop and message_stop
# are forwarded without decoding.
_READ_EVENTS = frozenset({"message_start", "message_delta", "content_block_delta"})


def _usage(usage: _Usage) -> Usage:
    # input_tokens excludes cached input; cache writes and reads are input too.
    return Usage(
        (usage.input_tokens or 0)
        + (usage.cache_creation_input_tokens or 0)
        + (usage.cache_read_input_tokens or 0),
        usage.output_tokens or 0,
    )


class MessagesStreamTap(SseStreamTap):
    """Input from ``message_start``; output from the last ``message_delta`` (cumulative)."""

    def __init__(self) -> None:
        super().__init__()
        # Kept per field: a message_delta may repeat some input fields and omit others,
        # and each repeated value is a cumulative total that replaces the earlier one.
        self._counts = _Usage()

    def on_event(self, event: bytes) -> bool:
        name, data = sse_event_fields(event)
        if data is None or (name is not None and name not in _READ_EVENTS):
            return True
        try:
            parsed = _EVENT.decode(data)
        except msgspec.DecodeError:
            return True
        if parsed.type == "content_block_delta" and parsed.delta is not None:
            delta = parsed.delta
            self.output_chars += (
                len(delta.text or "") + len(delta.partial_json or "") + len(delta.thinking or "")
            )
        elif parsed.type == "message_start" and parsed.message is not None:
            self._update(parsed.message.usage)
        elif parsed.type == "message_delta":
            self._update(parsed.usage)
        return True

    def _update(self, usage: _Usage | None) -> None:
        if usage is None:
            return
        counts = self._counts
        for field in _Usage.__struct_fields__:
            value = getattr(usage, field)
            if value is not None:
                setattr(counts, field, value)
        self.usage = _usage(counts)


class AnthropicAdapter(ProtocolAdapter):
    name = "anthropic"

    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return header_value(headers, "x-api-key") or bearer_token(headers)

    def parse_request(self, route: Route, body: bytes, path_model: str | None) -> RequestInfo:
        request = decode_view(_MESSAGES_REQUEST, body)
        return RequestInfo(
            model=require_model(request.model),
            stream=bool(request.stream),
            max_output_tokens=request.max_tokens,
            input_chars=len(body),
            wants_usage_chunk=False,
        )

    def usage_from_body(self, route: Route, body: bytes) -> Usage | None:
        try:
            usage = _MESSAGE.decode(body).usage
        except msgspec.DecodeError:
            return None
        return _usage(usage) if usage is not None else None

    def new_stream_tap(
        self, route: Route, strip_usage_chunk: bool, *, sse: bool = True
    ) -> StreamTap:
        return MessagesStreamTap()

    def error_body(self, err: GatewayError, request_id: str) -> bytes:
        error: dict[str, object] = {
            "type": err.type,
            "code": str(err.status),
            "reason": err.reason,
            "message": err.message,
        }
        if err.status == 429:
            error["rate_limit"] = rate_limit_body(err)
        return encode_json({"type": "error", "error": error, "request_id": request_id})
