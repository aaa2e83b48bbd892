"""Gemini protocol: `models/{model}:generateContent` and `:streamGenerateContent`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

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
from ratelimit_gw.protocols.model_lists import ModelListing, gemini_list, gemini_model
from ratelimit_gw.protocols.retry_hints import duration_ms


class _GenerationConfig(msgspec.Struct):
    max_output_tokens: MaxTokens | None = msgspec.field(default=None, name="maxOutputTokens")
    # Proto3 JSON parsers, Google's included, also accept the original snake_case name.
    max_output_tokens_snake: MaxTokens | None = msgspec.field(
        default=None, name="max_output_tokens"
    )
    candidate_count: Choices | None = msgspec.field(default=None, name="candidateCount")
    candidate_count_snake: Choices | None = msgspec.field(default=None, name="candidate_count")


class _GenerateRequest(msgspec.Struct):
    generation_config: _GenerationConfig | None = msgspec.field(
        default=None, name="generationConfig"
    )
    generation_config_snake: _GenerationConfig | None = msgspec.field(
        default=None, name="generation_config"
    )


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int | None = None
    candidates_token_count: int | None = None
    thoughts_token_count: int | None = None
    tool_use_prompt_token_count: int | None = None
    cached_content_token_count: int | None = None


class _Part(msgspec.Struct):
    text: str | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] | None = None


class _Candidate(msgspec.Struct):
    content: _Content | None = None


class _Response(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] | None = None
    usage_metadata: _UsageMetadata | None = None


_GENERATE_REQUEST = msgspec.json.Decoder(_GenerateRequest)
# One answer object, or the JSON array `:streamGenerateContent` sends without `?alt=sse`.
_ANSWER = msgspec.json.Decoder(_Response | list[_Response])
_RESPONSE = msgspec.json.Decoder(_Response)

_STATUS_BY_CODE = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "RESOURCE_EXHAUSTED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    408: "DEADLINE_EXCEEDED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
    529: "UNAVAILABLE",
}


def _rpc_status(code: int) -> str:
    """The google.rpc status of an HTTP status. One outside the table comes from an upstream's
    error rewritten by a converter route (a 422, 409, …): google.rpc's HTTP mapping puts
    UNKNOWN under 500, so a client error is INVALID_ARGUMENT, a server error INTERNAL."""
    if code in _STATUS_BY_CODE:
        return _STATUS_BY_CODE[code]
    return "INVALID_ARGUMENT" if 400 <= code < 500 else "INTERNAL"


_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def _usage(meta: _UsageMetadata) -> Usage:
    # Per the API, total = prompt + candidates + toolUsePrompt + thoughts: tool-use prompt
    # tokens are billed as input, thinking tokens as output.
    # promptTokenCount includes the cached tokens.
    return Usage(
        (meta.prompt_token_count or 0) + (meta.tool_use_prompt_token_count or 0),
        (meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0),
        cache_read_tokens=meta.cached_content_token_count or 0,
    )


def _first(camel: int | None, snake: int | None) -> int | None:
    return camel if camel is not None else snake


# Parts whose cost is not their bytes: media is priced per image, page, second or frame
# (258 tokens for an image of any size), and fileData/cachedContent name stored content.
# One msgspec pass with parts kept as zero-copy Raw slices; both JSON spellings are read,
# and a part is named in the caller's own. A body without the API's shape finds nothing.
_MEDIA_FIELDS = (
    ("inline_data", "inlineData"),
    ("inline_data_snake", "inline_data"),
    ("file_data", "fileData"),
    ("file_data_snake", "file_data"),
)
_FUNCTION_TOOLS = frozenset({"functionDeclarations", "function_declarations"})


class _FunctionResponse(msgspec.Struct):
    parts: msgspec.Raw = ABSENT  # a function response may carry media of its own


class _RequestPart(msgspec.Struct):
    inline_data: msgspec.Raw = msgspec.field(default=ABSENT, name="inlineData")
    inline_data_snake: msgspec.Raw = msgspec.field(default=ABSENT, name="inline_data")
    file_data: msgspec.Raw = msgspec.field(default=ABSENT, name="fileData")
    file_data_snake: msgspec.Raw = msgspec.field(default=ABSENT, name="file_data")
    function_response: _FunctionResponse | None = msgspec.field(
        default=None, name="functionResponse"
    )
    function_response_snake: _FunctionResponse | None = msgspec.field(
        default=None, name="function_response"
    )


class _RequestContent(msgspec.Struct):
    parts: msgspec.Raw = ABSENT


class _Refs(msgspec.Struct):
    cached_content: msgspec.Raw = msgspec.field(default=ABSENT, name="cachedContent")
    cached_content_snake: msgspec.Raw = msgspec.field(default=ABSENT, name="cached_content")
    contents: list[_RequestContent] | None = None
    system_instruction: _RequestContent | None = msgspec.field(
        default=None, name="systemInstruction"
    )
    system_instruction_snake: _RequestContent | None = msgspec.field(
        default=None, name="system_instruction"
    )
    tools: list[dict[str, msgspec.Raw]] | None = None


_REFS = msgspec.json.Decoder(_Refs)
_PARTS = msgspec.json.Decoder(list[_RequestPart])


def _unbounded(body: bytes) -> list[UnboundedInput]:
    found: list[UnboundedInput] = []
    refs = lenient(_REFS, body)
    if refs is None:
        return found
    for name, value in (
        ("cachedContent", refs.cached_content),
        ("cached_content", refs.cached_content_snake),
    ):
        if is_given(value):
            found.append(UnboundedInput(name, "cached content"))
    for i, tool in enumerate(refs.tools or ()):
        # Every tool but function declarations runs on Google's side (search, code…).
        found.extend(
            UnboundedInput(f"tools[{i}].{name}", f"tool {name!r}")
            for name in tool
            if name not in _FUNCTION_TOOLS
        )
    for name, instruction in (
        ("systemInstruction", refs.system_instruction),
        ("system_instruction", refs.system_instruction_snake),
    ):
        if instruction is not None:
            _walk_parts(instruction.parts, f"{name}.parts", found)
    for i, content in enumerate(refs.contents or ()):
        _walk_parts(content.parts, f"contents[{i}].parts", found)
    return found


def _walk_parts(raw: msgspec.Raw, path: str, found: list[UnboundedInput]) -> None:
    parts = lenient(_PARTS, raw) if is_array(raw) else None
    for i, part in enumerate(parts or ()):
        for attr, name in _MEDIA_FIELDS:
            if is_given(getattr(part, attr)):
                found.append(UnboundedInput(f"{path}[{i}].{name}", name))
        for name, response in (
            ("functionResponse", part.function_response),
            ("function_response", part.function_response_snake),
        ):
            if response is not None:
                _walk_parts(response.parts, f"{path}[{i}].{name}.parts", found)


def _text_chars(response: _Response) -> int:
    chars = 0
    for candidate in response.candidates or ():
        if candidate.content is not None:
            chars += sum(len(part.text or "") for part in candidate.content.parts or ())
    return chars


def _last_usage(responses: Sequence[_Response]) -> Usage | None:
    # usageMetadata repeats running totals; a chunk without it does not reset them.
    for response in reversed(responses):
        if response.usage_metadata is not None:
            return _usage(response.usage_metadata)
    return None


def retry_delay(retry_after_ms: int) -> str:
    """A protobuf Duration string: "12s", or "0.250s" when there are milliseconds."""
    seconds, millis = divmod(max(0, retry_after_ms), 1000)
    return f"{seconds}.{millis:03d}s" if millis else f"{seconds}s"


class _RpcDetail(msgspec.Struct):
    # Any JSON at all: one odd detail must not hide the RetryInfo beside it.
    type: object = msgspec.field(default=None, name="@type")
    retry_delay: object = msgspec.field(default=None, name="retryDelay")


class _RpcError(msgspec.Struct):
    details: list[_RpcDetail] | None = None


class _RpcStatus(msgspec.Struct):
    error: _RpcError | None = None


# The google.rpc Status an error answers with; `:streamGenerateContent` without `?alt=sse`
# wraps it in a JSON array.
_RPC_STATUS = msgspec.json.Decoder(_RpcStatus | list[_RpcStatus])
# A real 429 body is about 1 kB: a larger one is not worth decoding for a hint.
_MAX_ERROR_BODY = 64 * 1024


def _retry_info_ms(body: bytes) -> int | None:
    """The ``retryDelay`` of the body's ``google.rpc.RetryInfo`` detail, in ms (never raises)."""
    if len(body) > _MAX_ERROR_BODY:
        return None
    try:
        decoded = _RPC_STATUS.decode(body)
    except (msgspec.DecodeError, RecursionError):  # deep nesting is a RecursionError
        return None
    for status in decoded if isinstance(decoded, list) else (decoded,):
        for detail in (status.error and status.error.details) or ():
            if detail.type == _RETRY_INFO:
                return duration_ms(detail.retry_delay)
    return None


class GeminiSseTap(SseStreamTap):
    """`?alt=sse`: every event is a GenerateContentResponse."""

    def read_event(self, name: str | None, data: bytes) -> bool:
        try:
            response = _RESPONSE.decode(data)
        except msgspec.DecodeError:
            return True
        self.output_chars += _text_chars(response)
        if response.usage_metadata is not None:
            self.usage = _usage(response.usage_metadata)
        return True


class GeminiArrayTap(StreamTap):
    """Without `?alt=sse` the answer is one JSON array sent in pieces, with no event
    boundaries to read at: forward each piece at once and parse the whole at the end."""

    def __init__(self) -> None:
        super().__init__()
        self._received: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        self._received.append(data)
        return data

    def flush(self) -> bytes:
        text = b"".join(self._received).strip()
        self._received.clear()
        responses = _decode_array(text)
        if responses is None:
            # A stream cut between elements still holds whole elements: close the array.
            responses = _decode_array(text.rstrip(b",\r\n\t ") + b"]")
        if responses:
            self.output_chars = sum(_text_chars(response) for response in responses)
            self.usage = _last_usage(responses)
        return b""


def _decode_array(text: bytes) -> list[_Response] | None:
    try:
        answer = _ANSWER.decode(text)
    except msgspec.DecodeError:
        return None
    return [answer] if isinstance(answer, _Response) else answer


class GeminiAdapter(ProtocolAdapter):
    name = "gemini"
    credential_headers = frozenset({"x-goog-api-key", "authorization"})
    converter_route = "/gemini/v1beta/models/{model}:generateContent"
    family_header_prefixes = ("x-goog-",)

    def is_called_on(self, path: str, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        if path.startswith(("/v1beta/", "/gemini/")) or (
            path.startswith("/v1/models/") and ":" in path
        ):
            return True
        # GET /v1/models is shared with OpenAI and Anthropic callers: a Gemini key says who.
        return path == "/v1/models" and ("x-goog-api-key" in headers or "key" in query)

    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return (
            header_value(headers, "x-goog-api-key")
            or header_value(query, "key")
            or bearer_token(headers)
        )

    def parse_request(self, route: Route, body: bytes, path_model: str | None) -> RequestInfo:
        request = decode_view(_GENERATE_REQUEST, body)
        config = request.generation_config or request.generation_config_snake
        max_output_tokens = candidates = None
        if config is not None:
            max_output_tokens = _first(config.max_output_tokens, config.max_output_tokens_snake)
            candidates = _first(config.candidate_count, config.candidate_count_snake)
        return RequestInfo(
            model=require_model(path_model),
            stream=route is Route.STREAM_GENERATE,
            # Protobuf cannot tell 0 from unset: Gemini answers a 0 with the model's maximum.
            max_output_tokens=max_output_tokens or None,
            input_chars=len(body),
            wants_usage_chunk=False,
            choices=max(candidates or 1, 1),
        )

    def prepare_upstream_body(
        self, route: Route, body: bytes, info: RequestInfo, edits: UpstreamEdits
    ) -> bytes:
        # The model is named in the URL, never in the body: only the cap can change here.
        if edits.output_cap is None or info.max_output_tokens is not None:
            return body
        doc: dict[str, Any] = decode_any_json(body)
        # The config object parse_request read (camelCase first), else a new one.
        name = "generation_config" if doc.get("generationConfig") is None else "generationConfig"
        if doc.get(name) is None:
            name = "generationConfig"
        config = doc[name] = doc.get(name) or {}
        spellings = [field for field in ("maxOutputTokens", "max_output_tokens") if field in config]
        for field in spellings or ["maxOutputTokens"]:
            config[field] = edits.output_cap
        return encode_json(doc)

    def unbounded_inputs(self, route: Route, body: bytes) -> list[UnboundedInput]:
        return _unbounded(body)

    def usage_from_body(self, route: Route, body: bytes) -> Usage | None:
        responses = _decode_array(body)
        return _last_usage(responses) if responses else None

    def new_stream_tap(
        self, route: Route, strip_usage_chunk: bool, *, sse: bool = True
    ) -> StreamTap:
        return GeminiSseTap() if sse else GeminiArrayTap()

    def answer_tap(
        self, route: Route, info: RequestInfo, query: Mapping[str, str]
    ) -> Callable[[], StreamTap] | None:
        if not info.stream:
            return None
        # Without ?alt=sse, Gemini streams one JSON array.
        sse = query.get("alt") == "sse"
        return lambda: self.new_stream_tap(route, False, sse=sse)

    def model_list(self, models: Sequence[ModelListing]) -> dict[str, Any]:
        return gemini_list(models)

    def model_entry(self, model: ModelListing) -> dict[str, Any] | None:
        return gemini_model(model)

    def upstream_url(
        self,
        base_url: str,
        route: Route,
        upstream_model: str,
        path: str,
        query: Iterable[tuple[str, str]],
    ) -> str:
        # "v1beta" or "v1", as the client called it (after /gemini on a converter route).
        segments = path.split("/", 3)
        version = segments[2] if segments[1] == "gemini" and len(segments) > 2 else segments[1]
        action = "streamGenerateContent" if route is Route.STREAM_GENERATE else "generateContent"
        url = f"{base_url}/{version}/models/{upstream_model}:{action}"
        # `key` is the gateway key here (docs/admin.md), never the upstream's.
        kept = [(k, v) for k, v in query if k != "key"]
        if kept:
            url += "?" + urlencode(kept, quote_via=quote)  # re-encode what aiohttp decoded
        return url

    def upstream_credential(self, api_key: str) -> tuple[str, str]:
        return "x-goog-api-key", api_key

    def retry_hint_ms(self, headers: Mapping[str, str], body: bytes) -> int | None:
        # Gemini itself sends no retry headers (protocol notes §3.1), but a proxy or a
        # compatible server in front of it may: they come first, then the body's RetryInfo.
        hint = super().retry_hint_ms(headers, body)
        return hint if hint is not None else _retry_info_ms(body)

    def models_url(self, base_url: str) -> str:
        return base_url + "/v1beta/models"

    def error_body(self, err: GatewayError, request_id: str) -> bytes:
        details: list[dict[str, str]] = [
            {"@type": _ERROR_INFO, "reason": err.reason, "domain": "ratelimit-gw"}
        ]
        if err.status == 429 and err.retry_after_ms is not None:
            details.append({"@type": _RETRY_INFO, "retryDelay": retry_delay(err.retry_after_ms)})
        error: dict[str, object] = {
            "code": err.status,
            "status": _rpc_status(err.status),
            "message": err.message,
            "type": err.type,
            "reason": err.reason,
        }
        if err.status == 429:
            error["rate_limit"] = rate_limit_body(err)
        error["details"] = details
        return encode_json({"error": error})
