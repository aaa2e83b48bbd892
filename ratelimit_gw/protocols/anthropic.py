"""Anthropic protocol: `/v1/messages`."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import msgspec

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.base import (
    ABSENT,
    MaxTokens,
    ProtocolAdapter,
    RequestInfo,
    Route,
    SseStreamTap,
    StreamTap,
    UnboundedInput,
    UpstreamEdits,
    Usage,
    bearer_token,
    decode_any_json,
    decode_view,
    encode_json,
    header_value,
    is_array,
    is_given,
    lenient,
    rate_limit_body,
    require_model,
)
from ratelimit_gw.protocols.model_lists import ModelListing, openai_anthropic_list

if TYPE_CHECKING:  # see base.py: the limiter is not imported at run time
    from ratelimit_gw.limiter import Decision


class _MessagesRequest(msgspec.Struct):
    model: str | None = None
    stream: bool | None = None
    max_tokens: MaxTokens | None = None


class WireUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(msgspec.Struct):
    usage: WireUsage | None = None


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
    usage: WireUsage | None = None


_MESSAGES_REQUEST = msgspec.json.Decoder(_MessagesRequest)
_MESSAGE = msgspec.json.Decoder(_Message)
_EVENT = msgspec.json.Decoder(_Event)

# Events that carry usage or generated text; ping, block start/stop and message_stop
# are forwarded without decoding.
_READ_EVENTS = frozenset({"message_start", "message_delta", "content_block_delta"})


def usage_of(usage: WireUsage) -> Usage:
    # input_tokens excludes cached input; cache writes and reads are input too.
    cache_write = usage.cache_creation_input_tokens or 0
    cache_read = usage.cache_read_input_tokens or 0
    return Usage(
        (usage.input_tokens or 0) + cache_write + cache_read,
        usage.output_tokens or 0,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


def running_usage(counts: WireUsage, report: WireUsage) -> Usage:
    """A stream's usage after one more report: each figure a report gives is a cumulative
    total that replaces the one in ``counts``; a figure it leaves out stands."""
    if report.input_tokens is not None:
        counts.input_tokens = report.input_tokens
    if report.output_tokens is not None:
        counts.output_tokens = report.output_tokens
    if report.cache_creation_input_tokens is not None:
        counts.cache_creation_input_tokens = report.cache_creation_input_tokens
    if report.cache_read_input_tokens is not None:
        counts.cache_read_input_tokens = report.cache_read_input_tokens
    return usage_of(counts)


# Content blocks whose cost is not their bytes: images are priced by their pixels, PDFs by
# their pages (text plus an image each), uploads by what the container makes of them. A
# document whose source is plain text (or text blocks) is bounded like any text.
_MEDIA_BLOCKS = frozenset({"image", "document", "container_upload"})
_TEXT_SOURCES = frozenset({"text", "content"})


# One msgspec pass with blocks kept as zero-copy Raw slices; a body without the API's shape
# finds nothing (the upstream refuses it, so it can bill nothing).
class _Source(msgspec.Struct):
    type: str | None = None
    content: msgspec.Raw = ABSENT


class _Block(msgspec.Struct):
    type: str | None = None
    source: msgspec.Raw = ABSENT
    content: msgspec.Raw = ABSENT  # tool_result and search_result nest blocks here


class _RequestMessage(msgspec.Struct):
    content: msgspec.Raw = ABSENT


class _Tool(msgspec.Struct):
    type: str | None = None


class _Refs(msgspec.Struct):
    system: msgspec.Raw = ABSENT
    messages: list[_RequestMessage] | None = None
    tools: list[_Tool] | None = None
    # Content brought in from elsewhere: remote MCP servers, a container's files.
    mcp_servers: msgspec.Raw = ABSENT
    container: msgspec.Raw = ABSENT


_REFS = msgspec.json.Decoder(_Refs)
_BLOCKS = msgspec.json.Decoder(list[_Block])
_SOURCE = msgspec.json.Decoder(_Source)


def _unbounded(body: bytes) -> list[UnboundedInput]:
    found: list[UnboundedInput] = []
    refs = lenient(_REFS, body)
    if refs is None:
        return found
    for name in ("mcp_servers", "container"):
        if is_given(getattr(refs, name)):
            found.append(UnboundedInput(name, name))
    for i, tool in enumerate(refs.tools or ()):
        # Server tools (web search, code execution…) run on Anthropic's side; the versioned
        # client tools (bash, computer…) bring a system prompt of Anthropic's own.
        if tool.type not in (None, "custom"):
            found.append(UnboundedInput(f"tools[{i}]", f"tool type {tool.type!r}"))
    _walk_blocks(refs.system, "system", found)
    for i, message in enumerate(refs.messages or ()):
        _walk_blocks(message.content, f"messages[{i}].content", found)
    return found


def _walk_blocks(raw: msgspec.Raw, path: str, found: list[UnboundedInput]) -> None:
    blocks = lenient(_BLOCKS, raw) if is_array(raw) else None
    for i, block in enumerate(blocks or ()):
        source = None
        if block.type == "document":
            source = lenient(_SOURCE, block.source)
        if source is not None and source.type in _TEXT_SOURCES:
            _walk_blocks(source.content, f"{path}[{i}].source.content", found)
        elif block.type in _MEDIA_BLOCKS:
            found.append(UnboundedInput(f"{path}[{i}]", f"{block.type} block"))
        else:
            _walk_blocks(block.content, f"{path}[{i}].content", found)


class MessagesStreamTap(SseStreamTap):
    """Input from ``message_start``; output from the last ``message_delta`` (cumulative)."""

    def __init__(self) -> None:
        super().__init__()
        # Kept per field: a message_delta may repeat some input fields and omit others,
        # and each repeated value is a cumulative total that replaces the earlier one.
        self._counts = WireUsage()

    def read_event(self, name: str | None, data: bytes) -> bool:
        if name is not None and name not in _READ_EVENTS:
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

    def _update(self, usage: WireUsage | None) -> None:
        if usage is not None:
            self.usage = running_usage(self._counts, usage)


# The Anthropic forms of the rate-limit headers, per bucket kind: (limit, remaining, reset).
_RATE_LIMIT_HEADERS = {
    kind: (
        f"anthropic-ratelimit-{kind}-limit",
        f"anthropic-ratelimit-{kind}-remaining",
        f"anthropic-ratelimit-{kind}-reset",
    )
    for kind in ("requests", "tokens")
}


def rfc3339_in(ms: int) -> str:
    moment = datetime.fromtimestamp(time.time() + ms / 1000, UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


class AnthropicAdapter(ProtocolAdapter):
    name = "anthropic"
    credential_headers = frozenset({"x-api-key", "authorization"})
    converter_route = "/anthropic/v1/messages"
    family_header_prefixes = ("anthropic-", "x-stainless-")
    # The API version the gateway's Anthropic views and the codec are written against.
    upstream_required_headers: Mapping[str, str] = MappingProxyType(
        {"anthropic-version": "2023-06-01"}
    )
    own_header_names = frozenset({"request-id"})
    own_header_prefixes = ("anthropic-ratelimit-",)

    def is_called_on(self, path: str, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        return path.startswith(("/v1/messages", "/anthropic/"))

    def add_own_headers(
        self, request_id: str, decision: Decision | None, headers: dict[str, str]
    ) -> None:
        headers["request-id"] = request_id  # the Anthropic SDK reads its request id here
        if decision is None:
            return
        for kind, bucket in (("requests", decision.requests), ("tokens", decision.tokens)):
            if bucket is not None:
                limit, remaining, reset = _RATE_LIMIT_HEADERS[kind]
                headers[limit] = str(bucket.limit)
                headers[remaining] = str(bucket.remaining)
                headers[reset] = rfc3339_in(bucket.reset_ms)

    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return header_value(headers, "x-api-key") or bearer_token(headers)

    def stream_error_event(self, err: GatewayError, request_id: str) -> bytes:
        return b"event: error\ndata: " + self.error_body(err, request_id) + b"\n\n"

    def model_list(self, models: Sequence[ModelListing]) -> dict[str, Any]:
        return openai_anthropic_list(models)

    def parse_request(self, route: Route, body: bytes, path_model: str | None) -> RequestInfo:
        request = decode_view(_MESSAGES_REQUEST, body)
        return RequestInfo(
            model=require_model(request.model),
            stream=bool(request.stream),
            max_output_tokens=request.max_tokens,
            input_chars=len(body),
            wants_usage_chunk=False,
            cap_fields=frozenset() if request.max_tokens is None else frozenset({"max_tokens"}),
        )

    def prepare_upstream_body(
        self, route: Route, body: bytes, info: RequestInfo, edits: UpstreamEdits
    ) -> bytes:
        cap = edits.output_cap if info.max_output_tokens is None else None
        if cap is None and edits.model is None:
            return body
        doc: dict[str, Any] = decode_any_json(body)
        if cap is not None:
            doc["max_tokens"] = cap
        if edits.model is not None:
            doc["model"] = edits.model
        return encode_json(doc)

    def unbounded_inputs(self, route: Route, body: bytes) -> list[UnboundedInput]:
        return _unbounded(body)

    def usage_from_body(self, route: Route, body: bytes) -> Usage | None:
        try:
            usage = _MESSAGE.decode(body).usage
        except msgspec.DecodeError:
            return None
        return usage_of(usage) if usage is not None else None

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

    def upstream_url(
        self,
        base_url: str,
        route: Route,
        upstream_model: str,
        path: str,
        query: Iterable[tuple[str, str]],
    ) -> str:
        return base_url + "/v1/messages"

    def upstream_credential(self, api_key: str) -> tuple[str, str]:
        return "x-api-key", api_key

    def models_url(self, base_url: str) -> str:
        return base_url + "/v1/models"
