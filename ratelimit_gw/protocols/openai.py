"""OpenAI protocol: `/v1/chat/completions` and `/v1/responses`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import msgspec

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.base import (
    ABSENT,
    Choices,
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

# --- request views ------------------------------------------------------------------


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _ChatRequest(msgspec.Struct):
    model: str | None = None
    stream: bool | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stream_options: _StreamOptions | None = None
    n: Choices | None = None


class _ResponsesRequest(msgspec.Struct):
    model: str | None = None
    stream: bool | None = None
    max_output_tokens: MaxTokens | None = None


# --- answer views -------------------------------------------------------------------


class _InputDetails(msgspec.Struct):
    cached_tokens: int | None = None


class ChatUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _InputDetails | None = None


class _ChatBody(msgspec.Struct):
    usage: ChatUsage | None = None


class _ResponsesUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    input_tokens_details: _InputDetails | None = None


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
    usage: ChatUsage | None = None


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

# Generated text arrives in these events (tool-call arguments count: they are output too).
_RESPONSES_TEXT_EVENTS = frozenset(
    {"response.output_text.delta", "response.function_call_arguments.delta"}
)
_RESPONSES_USAGE_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)


def _cached(details: _InputDetails | None) -> int:
    return (details.cached_tokens or 0) if details is not None else 0


def chat_usage(usage: ChatUsage) -> Usage:
    # prompt_tokens counts the cached tokens too; OpenAI reports no cache writes.
    return Usage(
        usage.prompt_tokens or 0,
        usage.completion_tokens or 0,
        cache_read_tokens=_cached(usage.prompt_tokens_details),
    )


def _responses_usage(usage: _ResponsesUsage) -> Usage:
    return Usage(
        usage.input_tokens or 0,
        usage.output_tokens or 0,
        cache_read_tokens=_cached(usage.input_tokens_details),
    )


# --- input the bytes do not bound -----------------------------------------------------
# One msgspec pass over the body, parts kept as zero-copy Raw slices (cheaper than a single
# byte search for a marker), then a second look only at arrays of parts. A body without the
# API's shape finds nothing: the upstream refuses it, so it can bill nothing.


class _Typed(msgspec.Struct):
    type: str | None = None


class _ChatMessage(msgspec.Struct):
    content: msgspec.Raw = ABSENT


class _ChatRefs(msgspec.Struct):
    messages: list[_ChatMessage] | None = None
    web_search_options: msgspec.Raw = ABSENT


class _ResponsesItem(msgspec.Struct):
    type: str | None = None
    content: msgspec.Raw = ABSENT
    output: msgspec.Raw = ABSENT  # a function_call_output's parts


class _ResponsesRefs(msgspec.Struct):
    input: msgspec.Raw = ABSENT
    tools: list[_Typed] | None = None
    previous_response_id: msgspec.Raw = ABSENT
    conversation: msgspec.Raw = ABSENT
    prompt: msgspec.Raw = ABSENT


_CHAT_REFS = msgspec.json.Decoder(_ChatRefs)
_RESPONSES_REFS = msgspec.json.Decoder(_ResponsesRefs)
_RESPONSES_ITEMS = msgspec.json.Decoder(list[_ResponsesItem])
_TYPED_LIST = msgspec.json.Decoder(list[_Typed])

# Chat content parts whose cost is not their bytes: images are priced by their pixels
# (gpt-4o-mini: 2,833 tokens for any low-detail image), files (PDF) by their pages, audio by
# its duration; video_url/audio_url are the spellings of OpenAI-compatible servers (vLLM).
_CHAT_MEDIA_PARTS = frozenset({"image_url", "input_audio", "file", "video_url", "audio_url"})
# Responses: media parts (the same pricing) and items that stand for stored content.
_RESPONSES_MEDIA_PARTS = frozenset({"input_image", "input_file", "input_audio"})
_RESPONSES_STORED_ITEMS = frozenset({"item_reference", "computer_call_output"})
# Tools the caller runs itself; any other type runs (and bills) on the provider's side.
_CLIENT_TOOLS = frozenset({"function", "custom"})


def _media_parts(
    raw: msgspec.Raw, path: str, kinds: frozenset[str], found: list[UnboundedInput]
) -> None:
    parts = lenient(_TYPED_LIST, raw) if is_array(raw) else None
    for j, part in enumerate(parts or ()):
        if part.type in kinds:
            found.append(UnboundedInput(f"{path}[{j}]", f"{part.type} part"))


def _chat_unbounded(body: bytes) -> list[UnboundedInput]:
    found: list[UnboundedInput] = []
    refs = lenient(_CHAT_REFS, body)
    if refs is None:
        return found
    if is_given(refs.web_search_options):
        found.append(UnboundedInput("web_search_options", "web search"))
    for i, message in enumerate(refs.messages or ()):
        _media_parts(message.content, f"messages[{i}].content", _CHAT_MEDIA_PARTS, found)
    return found


def _responses_unbounded(body: bytes) -> list[UnboundedInput]:
    found: list[UnboundedInput] = []
    refs = lenient(_RESPONSES_REFS, body)
    if refs is None:
        return found
    for name in ("previous_response_id", "conversation", "prompt"):
        if is_given(getattr(refs, name)):
            found.append(UnboundedInput(name, f"stored content ({name})"))
    for i, tool in enumerate(refs.tools or ()):
        if tool.type not in _CLIENT_TOOLS:
            found.append(UnboundedInput(f"tools[{i}]", f"built-in tool {tool.type!r}"))
    items = lenient(_RESPONSES_ITEMS, refs.input) if is_array(refs.input) else None
    for i, item in enumerate(items or ()):
        if item.type in _RESPONSES_STORED_ITEMS:
            found.append(UnboundedInput(f"input[{i}]", f"{item.type} item"))
        for field in ("content", "output"):
            raw = getattr(item, field)
            _media_parts(raw, f"input[{i}].{field}", _RESPONSES_MEDIA_PARTS, found)
    return found


class ChatStreamTap(SseStreamTap):
    """Chat SSE: ``data:`` frames only; usage rides in a final ``choices: []`` chunk."""

    def __init__(self, strip_usage_chunk: bool) -> None:
        super().__init__()
        self._strip_usage_chunk = strip_usage_chunk

    def read_event(self, name: str | None, data: bytes) -> bool:
        if data.startswith(b"["):  # the `[DONE]` sentinel
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
        self.usage = chat_usage(usage)
        # Only the chunk the gateway itself asked for (docs/relay.md) is hidden from the client.
        return not (self._strip_usage_chunk and chunk.choices == [])


class ResponsesStreamTap(SseStreamTap):
    """Responses SSE: named events; usage in the terminal ``response.*`` event."""

    def read_event(self, name: str | None, data: bytes) -> bool:
        if (
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


_UPSTREAM_PATH = {Route.CHAT: "/v1/chat/completions", Route.RESPONSES: "/v1/responses"}


class OpenAIAdapter(ProtocolAdapter):
    name = "openai"
    credential_headers = frozenset({"authorization", "api-key"})  # api-key: Azure OpenAI's
    converter_route = "/openai/v1/chat/completions"
    family_header_prefixes = ("openai-", "x-stainless-")
    has_chat_cap_field = True

    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return bearer_token(headers)

    def model_list_credential(
        self, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> str | None:
        # GET /v1/models is shared by the OpenAI SDK (Bearer) and the Anthropic SDK
        # (x-api-key): both are read there (README.md Routes, docs/admin.md).
        return bearer_token(headers) or header_value(headers, "x-api-key")

    def model_list(self, models: Sequence[ModelListing]) -> dict[str, Any]:
        return openai_anthropic_list(models)

    def parse_request(self, route: Route, body: bytes, path_model: str | None) -> RequestInfo:
        if route is Route.CHAT:
            chat = decode_view(_CHAT_REQUEST, body)
            options = chat.stream_options
            caps = {
                name: value
                for name, value in (
                    ("max_completion_tokens", chat.max_completion_tokens),
                    ("max_tokens", chat.max_tokens),
                )
                if value is not None
            }
            return RequestInfo(
                model=require_model(chat.model),
                stream=bool(chat.stream),
                # Both spellings given: which one an upstream obeys varies, so hold the larger.
                max_output_tokens=max(caps.values()) if caps else None,
                input_chars=len(body),
                wants_usage_chunk=options is not None and options.include_usage is True,
                choices=max(chat.n or 1, 1),
                cap_fields=frozenset(caps),
            )
        responses = decode_view(_RESPONSES_REQUEST, body)
        cap = responses.max_output_tokens
        return RequestInfo(
            model=require_model(responses.model),
            stream=bool(responses.stream),
            max_output_tokens=cap,
            input_chars=len(body),
            wants_usage_chunk=False,
            cap_fields=frozenset() if cap is None else frozenset({"max_output_tokens"}),
        )

    def prepare_upstream_body(
        self, route: Route, body: bytes, info: RequestInfo, edits: UpstreamEdits
    ) -> bytes:
        # A chat stream reports usage only when asked (docs/relay.md).
        ask_usage = route is Route.CHAT and info.stream and not info.wants_usage_chunk
        if route is Route.CHAT:
            cap_field = edits.chat_cap_field
            # OpenAI itself obeys either spelling; an upstream configured for max_tokens
            # ignores the newer one, so a cap given only there is no cap to it.
            obeyed = {cap_field} if cap_field == "max_tokens" else {cap_field, "max_tokens"}
        else:
            cap_field, obeyed = "max_output_tokens", {"max_output_tokens"}
        cap = edits.output_cap if not obeyed & info.cap_fields else None
        if not ask_usage and cap is None and edits.model is None:
            return body
        doc: dict[str, Any] = decode_any_json(body)
        if ask_usage:
            doc["stream_options"] = {**(doc.get("stream_options") or {}), "include_usage": True}
        if cap is not None:
            doc[cap_field] = cap
        if edits.model is not None:
            doc["model"] = edits.model
        return encode_json(doc)

    def unbounded_inputs(self, route: Route, body: bytes) -> list[UnboundedInput]:
        if route is Route.CHAT:
            return _chat_unbounded(body)
        return _responses_unbounded(body)

    def usage_from_body(self, route: Route, body: bytes) -> Usage | None:
        try:
            if route is Route.CHAT:
                chat = _CHAT_BODY.decode(body).usage
                return chat_usage(chat) if chat is not None else None
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

    def answer_tap(
        self, route: Route, info: RequestInfo, query: Mapping[str, str]
    ) -> Callable[[], StreamTap] | None:
        if not info.stream:
            return None
        # The usage chunk the gateway asked for, and the caller did not, is not relayed.
        strip_usage = route is Route.CHAT and not info.wants_usage_chunk
        return lambda: self.new_stream_tap(route, strip_usage)

    def upstream_url(
        self,
        base_url: str,
        route: Route,
        upstream_model: str,
        path: str,
        query: Iterable[tuple[str, str]],
    ) -> str:
        return base_url + _UPSTREAM_PATH[route]

    def upstream_credential(self, api_key: str) -> tuple[str, str]:
        return "Authorization", f"Bearer {api_key}"

    def models_url(self, base_url: str) -> str:
        return base_url + "/v1/models"

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
