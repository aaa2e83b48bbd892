"""Wire-format builders for the mock upstream: OpenAI, Anthropic and Gemini bodies and frames.

Everything here is a pure function of a :class:`Reply` and returns ready-to-send bytes, so
:mod:`ratelimit_gw.testing.mock_upstream` only decides *when* to write them. Shapes follow
``/work/shared/reference/protocol-notes.md`` §1.3, §1.4, §2.3, §3.2 and §6, and for tool calls
``converter-notes.md`` ("Responses and streams").

A reply is either text or tool calls (:attr:`Reply.tool_calls`, chosen by
:mod:`ratelimit_gw.testing.mock_tools`), never both. Tool calls cost
``ceil(len(arguments JSON) / 4)`` output tokens each and carry ids made from the reply's
``seq``: OpenAI ``call_<24 hex>``, Anthropic ``toolu_<24 hex>``, Gemini none (as the real
``generateContent``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import msgspec

Protocol = Literal["openai", "anthropic", "gemini"]

_encode = msgspec.json.Encoder().encode

# Where prompt text lives in each protocol's request: top-level fields, then the keys that lead
# to text inside them (OpenAI messages/content, Responses input/instructions, Anthropic
# system/messages, Gemini contents/systemInstruction/parts). Roles, ids and tool schemas are
# deliberately not counted, so the formula stays simple to state and to check.
_TEXT_ROOTS = ("messages", "system", "input", "instructions", "contents", "systemInstruction")
_TEXT_KEYS = ("text", "content", "parts")

# Real providers answer with fixed creation stamps for models; any constant will do.
_MODEL_CREATED_S = 1_700_000_000


def _text_chars(node: object) -> int:
    if isinstance(node, str):
        return len(node)
    if isinstance(node, list):
        return sum(_text_chars(item) for item in node)
    if isinstance(node, dict):
        return sum(_text_chars(node[key]) for key in _TEXT_KEYS if key in node)
    return 0


def count_input_tokens(body: dict[str, Any]) -> int:
    """``max(1, ceil(chars / 4))`` over every text string in the request's prompt fields."""
    chars = sum(_text_chars(body[key]) for key in _TEXT_ROOTS if key in body)
    return max(1, -(-chars // 4))


@lru_cache(maxsize=512)
def _pieces(n_tokens: int, tokens_per_chunk: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    # One word is one token ("tok0 tok1 ..."); later words carry their leading space the way
    # BPE tokens do, so the concatenated pieces read as plain space-separated text.
    pieces: list[str] = []
    counts: list[int] = []
    for start in range(0, n_tokens, tokens_per_chunk):
        stop = min(start + tokens_per_chunk, n_tokens)
        pieces.append("".join(f" tok{j}" if j else "tok0" for j in range(start, stop)))
        counts.append(stop - start)
    return tuple(pieces), tuple(counts)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call of an answer: ``args`` and the same as compact JSON (``arguments``)."""

    name: str
    args: dict[str, Any]
    arguments: str  # what OpenAI carries as a string and Anthropic streams in fragments

    @classmethod
    def of(cls, name: str, args: dict[str, Any]) -> ToolCall:
        return cls(name, args, _encode(args).decode())

    @property
    def tokens(self) -> int:
        return -(-len(self.arguments) // 4)

    def fragments(self) -> tuple[str, ...]:
        """``arguments`` cut into at least two stream pieces of at most 16 characters."""
        size = min(16, -(-len(self.arguments) // 2))
        return tuple(self.arguments[i : i + size] for i in range(0, len(self.arguments), size))


@dataclass(frozen=True, slots=True)
class Reply:
    """One generated answer: its text split into stream pieces (or its tool calls) and its
    exact usage."""

    seq: int
    model: str
    created_s: int
    input_tokens: int
    pieces: tuple[str, ...]
    piece_tokens: tuple[int, ...]
    output_tokens: int
    truncated: bool  # stopped by the request's output-token cap
    # Parts of input_tokens reported as prompt-cache reads and writes.
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    tool_calls: tuple[ToolCall, ...] = ()  # when set, the answer has no text

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def call_id(self, prefix: str, index: int) -> str:
        return f"{prefix}{self.seq:016x}{index:08x}"


def plan_reply(
    *,
    seq: int,
    model: str,
    created_s: int,
    input_tokens: int,
    chunks: int,
    tokens_per_chunk: int,
    cap_tokens: int | None,
    ignore_cap: bool,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    tool_calls: tuple[ToolCall, ...] = (),
) -> Reply:
    """The answer: ``tool_calls`` when given, else ``chunks * tokens_per_chunk`` words.

    The output cap cuts both (unless ``ignore_cap``): tool calls are kept whole, as many as
    fit, and the reply is truncated when any was left out; when not even the first fits, the
    answer is the text cut at the cap instead.
    """
    cache_read = min(cache_read_tokens, input_tokens)
    cache_write = min(cache_write_tokens, input_tokens - cache_read)
    kept = _calls_within(tool_calls, None if ignore_cap else cap_tokens)
    if kept:
        return Reply(
            seq,
            model,
            created_s,
            input_tokens,
            (),
            (),
            sum(call.tokens for call in kept),
            len(kept) < len(tool_calls),
            cache_read,
            cache_write,
            kept,
        )
    full_tokens = chunks * tokens_per_chunk
    truncated = cap_tokens is not None and cap_tokens < full_tokens and not ignore_cap
    n_tokens = max(0, cap_tokens) if truncated and cap_tokens is not None else full_tokens
    pieces, counts = _pieces(n_tokens, tokens_per_chunk)
    return Reply(
        seq,
        model,
        created_s,
        input_tokens,
        pieces,
        counts,
        n_tokens,
        truncated,
        cache_read,
        cache_write,
    )


def _calls_within(calls: tuple[ToolCall, ...], cap_tokens: int | None) -> tuple[ToolCall, ...]:
    kept = 0
    spent = 0
    for call in calls:
        spent += call.tokens
        if cap_tokens is not None and spent > cap_tokens:
            break
        kept += 1
    return calls[:kept]


@dataclass(frozen=True, slots=True)
class StreamFrames:
    """A stream as three parts: ``head`` and ``tail`` frames around ``chunks``, one frame per
    text piece, or for tool calls one per event of the calls (start, argument fragment, stop)."""

    head: bytes
    chunks: tuple[bytes, ...]
    tail: bytes


def _sse_data(obj: object) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def _sse_event(name: str, obj: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(obj) + b"\n\n"


# Frames a broken or hostile upstream might send mid-stream (``x-mock-malformed-sse``): cut
# JSON, bytes that are not UTF-8, JSON of the wrong shape, and each protocol's usage event
# with values of the wrong type. A tap must relay them and read nothing from them.
MALFORMED_SSE_FRAMES = b"".join(
    (
        b'data: {"choices": [{"delta": {"content": "cut sho\n\n',
        b"data: \xff\xfe\x00 not UTF-8 \xc3\x28\n\n",
        b"data: null\n\n",
        b"data: 123456789012345678901234567890\n\n",
        b'data: {"choices": 7, "usage": "lots", "usageMetadata": [], "delta": 1}\n\n',
        b'data: {"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": -1}}\n\n',
        b"event: response.completed\n"
        b'data: {"type": "response.completed", "response": {"usage": {"input_tokens": "x"}}}\n\n',
        b"event: message_delta\n"
        b'data: {"type": "message_delta", "usage": {"output_tokens": []}}\n\n',
        b'data: {"usageMetadata": {"promptTokenCount": "many", "candidatesTokenCount": {}}}\n\n',
        b"event: message_delta\n\n",
        b": a comment and nothing else\n\n",
        b"retry: soon\nid\ndata\n\n",
    )
)


# --- OpenAI chat completions (§1.3) -----------------------------------------------------------


def _chat_usage(r: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": r.input_tokens,
        "completion_tokens": r.output_tokens,
        "total_tokens": r.input_tokens + r.output_tokens,
        "prompt_tokens_details": {"cached_tokens": r.cache_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _chat_finish(r: Reply) -> str:
    return "length" if r.truncated else "tool_calls" if r.tool_calls else "stop"


def chat_completion(r: Reply) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": r.text, "refusal": None}
    if r.tool_calls:
        message["content"] = None
        message["tool_calls"] = [
            {
                "id": r.call_id("call_", i),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for i, call in enumerate(r.tool_calls)
        ]
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": _chat_finish(r),
    }
    return _encode(
        {
            "id": f"chatcmpl-mock{r.seq}",
            "object": "chat.completion",
            "created": r.created_s,
            "model": r.model,
            "system_fingerprint": "fp_mock",
            "choices": [choice],
            "usage": _chat_usage(r),
        }
    )


def chat_stream(r: Reply, include_usage: bool) -> StreamFrames:
    base: dict[str, Any] = {
        "id": f"chatcmpl-mock{r.seq}",
        "object": "chat.completion.chunk",
        "created": r.created_s,
        "model": r.model,
        "system_fingerprint": "fp_mock",
    }
    # With include_usage every chunk but the extra last one carries "usage": null.
    null_usage = {"usage": None} if include_usage else {}

    def frame(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse_data({**base, "choices": [choice], **null_usage})

    if r.tool_calls:
        head = frame({"role": "assistant", "content": None}, None)
        chunks = tuple(frame({"tool_calls": [d]}, None) for d in _chat_tool_deltas(r))
    else:
        head = frame({"role": "assistant", "content": ""}, None)
        chunks = tuple(frame({"content": piece}, None) for piece in r.pieces)
    tail = frame({}, _chat_finish(r))
    if include_usage:
        tail += _sse_data({**base, "choices": [], "usage": _chat_usage(r)})
    return StreamFrames(head, chunks, tail + b"data: [DONE]\n\n")


def _chat_tool_deltas(r: Reply) -> list[dict[str, Any]]:
    # Per call: its index, id and name with empty arguments, then the argument fragments.
    deltas: list[dict[str, Any]] = []
    for i, call in enumerate(r.tool_calls):
        function = {"name": call.name, "arguments": ""}
        deltas.append(
            {"index": i, "id": r.call_id("call_", i), "type": "function", "function": function}
        )
        deltas += ({"index": i, "function": {"arguments": f}} for f in call.fragments())
    return deltas


# --- OpenAI responses (§1.4) ------------------------------------------------------------------


def _response_message(r: Reply, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "type": "message",
        "id": f"msg_mock{r.seq}",
        "status": status,
        "role": "assistant",
        "content": [part] if status != "in_progress" else [],
    }


def _response(r: Reply, status: str) -> dict[str, Any]:
    done = status != "in_progress"
    usage = {
        "input_tokens": r.input_tokens,
        "input_tokens_details": {"cached_tokens": r.cache_read_tokens},
        "output_tokens": r.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": r.input_tokens + r.output_tokens,
    }
    return {
        "id": f"resp_mock{r.seq}",
        "object": "response",
        "created_at": r.created_s,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if r.truncated else None,
        "instructions": None,
        "metadata": {},
        "model": r.model,
        "output": [_response_message(r, r.text, status)] if done else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage if done else None,
    }


def _final_status(r: Reply) -> str:
    # A cap-truncated answer is "incomplete" in the Responses API, and its stream ends with
    # response.incomplete (still carrying usage) instead of response.completed.
    return "incomplete" if r.truncated else "completed"


def response(r: Reply) -> bytes:
    return _encode(_response(r, _final_status(r)))


def response_stream(r: Reply) -> StreamFrames:
    seq = 0

    def event(name: str, **fields: Any) -> bytes:
        nonlocal seq
        frame = _sse_event(name, {"type": name, "sequence_number": seq, **fields})
        seq += 1
        return frame

    item_id = f"msg_mock{r.seq}"
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}
    status = _final_status(r)
    empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    head = b"".join(
        (
            event("response.created", response=_response(r, "in_progress")),
            event("response.in_progress", response=_response(r, "in_progress")),
            event(
                "response.output_item.added",
                output_index=0,
                item=_response_message(r, "", "in_progress"),
            ),
            event("response.content_part.added", **at, part=empty_part),
        )
    )
    chunks = tuple(
        event("response.output_text.delta", **at, delta=piece, logprobs=[]) for piece in r.pieces
    )
    message = _response_message(r, r.text, status)
    tail = b"".join(
        (
            event("response.output_text.done", **at, text=r.text, logprobs=[]),
            event("response.content_part.done", **at, part=message["content"][0]),
            event("response.output_item.done", output_index=0, item=message),
            event(f"response.{status}", response=_response(r, status)),
        )
    )
    return StreamFrames(head, chunks, tail)


# --- Anthropic messages (§2.3) ----------------------------------------------------------------


def _anthropic_message(r: Reply, content: list[Any], stop: str | None, out: int) -> dict[str, Any]:
    return {
        "id": f"msg_mock{r.seq}",
        "type": "message",
        "role": "assistant",
        "model": r.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        # Anthropic's input_tokens leaves out the cached ones, reported beside it.
        "usage": {
            "input_tokens": r.input_tokens - r.cache_read_tokens - r.cache_write_tokens,
            "output_tokens": out,
            "cache_creation_input_tokens": r.cache_write_tokens,
            "cache_read_input_tokens": r.cache_read_tokens,
        },
    }


def _stop_reason(r: Reply) -> str:
    return "max_tokens" if r.truncated else "tool_use" if r.tool_calls else "end_turn"


def _tool_use(r: Reply, i: int, call: ToolCall, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": r.call_id("toolu_", i), "name": call.name, "input": args}


def anthropic_message(r: Reply) -> bytes:
    content = (
        [_tool_use(r, i, call, call.args) for i, call in enumerate(r.tool_calls)]
        if r.tool_calls
        else [{"type": "text", "text": r.text}]
    )
    return _encode(_anthropic_message(r, content, _stop_reason(r), r.output_tokens))


def anthropic_stream(r: Reply) -> StreamFrames:
    # message_start reports a placeholder output_tokens of 1, as the real API does; the true
    # cumulative count only arrives in message_delta.
    start = {"type": "message_start", "message": _anthropic_message(r, [], None, 1)}
    head = _sse_event("message_start", start) + _sse_event("ping", {"type": "ping"})
    if r.tool_calls:
        # Each call is a block of its own: start, input_json_delta fragments, stop.
        chunks = tuple(_sse_event(e["type"], e) for e in _anthropic_tool_events(r))
        block_stop = b""
    else:
        block_start = {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }
        head += _sse_event("content_block_start", block_start)
        chunks = tuple(
            _sse_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
            for piece in r.pieces
        )
        block_stop = _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": _stop_reason(r), "stop_sequence": None},
        "usage": {"output_tokens": r.output_tokens},
    }
    tail = b"".join(
        (
            block_stop,
            _sse_event("message_delta", delta),
            _sse_event("message_stop", {"type": "message_stop"}),
        )
    )
    return StreamFrames(head, chunks, tail)


def _anthropic_tool_events(r: Reply) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for i, call in enumerate(r.tool_calls):
        block = _tool_use(r, i, call, {})
        events.append({"type": "content_block_start", "index": i, "content_block": block})
        events += (
            {
                "type": "content_block_delta",
                "index": i,
                "delta": {"type": "input_json_delta", "partial_json": fragment},
            }
            for fragment in call.fragments()
        )
        events.append({"type": "content_block_stop", "index": i})
    return events


# --- Gemini generateContent (§3.2) ------------------------------------------------------------


def _gemini_chunk(
    r: Reply, parts: list[dict[str, Any]], candidates_tokens: int, last: bool
) -> dict[str, Any]:
    candidate: dict[str, Any] = {
        "content": {"role": "model", "parts": parts},
        "index": 0,
    }
    if last:
        candidate["finishReason"] = "MAX_TOKENS" if r.truncated else "STOP"
    return {
        "candidates": [candidate],
        "usageMetadata": {
            "promptTokenCount": r.input_tokens,  # cached tokens included
            "candidatesTokenCount": candidates_tokens,
            "totalTokenCount": r.input_tokens + candidates_tokens,
            **({"cachedContentTokenCount": r.cache_read_tokens} if r.cache_read_tokens else {}),
        },
        "modelVersion": r.model,
        "responseId": f"mock{r.seq}",
    }


def _function_call(call: ToolCall) -> dict[str, Any]:
    # No id: the Gemini API's generateContent does not give its calls one.
    return {"functionCall": {"name": call.name, "args": call.args}}


def gemini_response(r: Reply) -> bytes:
    parts = [_function_call(c) for c in r.tool_calls] if r.tool_calls else [{"text": r.text}]
    return _encode(_gemini_chunk(r, parts, r.output_tokens, last=True))


def _gemini_chunks(r: Reply) -> list[dict[str, Any]]:
    # usageMetadata carries running totals, so the last chunk holds the final counts. An empty
    # answer still needs one chunk to deliver the finish reason and usage. Tool calls come
    # whole, one call a chunk.
    parts = (
        [_function_call(c) for c in r.tool_calls]
        if r.tool_calls
        else [{"text": piece} for piece in r.pieces or ("",)]
    )
    counts = [c.tokens for c in r.tool_calls] if r.tool_calls else r.piece_tokens or (0,)
    out: list[dict[str, Any]] = []
    so_far = 0
    for i, (part, count) in enumerate(zip(parts, counts, strict=True)):
        so_far += count
        out.append(_gemini_chunk(r, [part], so_far, last=i == len(parts) - 1))
    return out


def gemini_sse_stream(r: Reply) -> StreamFrames:
    return StreamFrames(b"", tuple(_sse_data(c) for c in _gemini_chunks(r)), b"")


def gemini_array_stream(r: Reply) -> StreamFrames:
    # Without alt=sse Gemini streams one JSON array, element by element.
    encoded = [_encode(c) for c in _gemini_chunks(r)]
    chunks = (encoded[0], *(b",\r\n" + e for e in encoded[1:]))
    return StreamFrames(b"[", chunks, b"]")


# --- Model lists (§3.3, §6) -------------------------------------------------------------------


def openai_models(models: tuple[str, ...]) -> bytes:
    data = [
        {"id": m, "object": "model", "created": _MODEL_CREATED_S, "owned_by": "mock-upstream"}
        for m in models
    ]
    return _encode({"object": "list", "data": data})


def anthropic_models(models: tuple[str, ...]) -> bytes:
    data = [
        {"type": "model", "id": m, "display_name": m, "created_at": "2023-11-14T22:13:20Z"}
        for m in models
    ]
    return _encode(
        {
            "data": data,
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }
    )


def gemini_models(models: tuple[str, ...]) -> bytes:
    data = [
        {
            "name": f"models/{m}",
            "version": "001",
            "displayName": m,
            "description": "mock upstream model",
            "inputTokenLimit": 1_048_576,
            "outputTokenLimit": 65_536,
            "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
        }
        for m in models
    ]
    return _encode({"models": data})


# --- Error bodies (§1.1, §2.1, §3.1) ----------------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_GEMINI_ERRORS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "RESOURCE_EXHAUSTED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"


def _protobuf_duration(ms: int) -> str:
    """A protobuf Duration's JSON form: "2s", "1.500s".

    Written here rather than shared with the gateway's Gemini adapter: the mock stands for
    the real API, so the gateway's reader is tested against an independent writer.
    """
    seconds, millis = divmod(ms, 1000)
    return f"{seconds}.{millis:03d}s" if millis else f"{seconds}s"


def _gemini_details(status: int, retry_delay_ms: int | None) -> list[dict[str, Any]]:
    """A real Gemini 429's details (§3.1): the quota that failed, then when to retry."""
    if status != 429 or retry_delay_ms is None:
        return []
    violation = {
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
        "quotaValue": "5",
    }
    return [
        {"@type": _QUOTA_FAILURE, "violations": [violation]},
        {"@type": _RETRY_INFO, "retryDelay": _protobuf_duration(retry_delay_ms)},
    ]


@lru_cache(maxsize=256)
def error_body(
    protocol: Protocol, status: int, message: str, retry_delay_ms: int | None = None
) -> bytes:
    """An error in ``protocol``'s shape; ``retry_delay_ms`` adds the RetryInfo detail to a
    Gemini 429 (the other protocols give their hint in headers only)."""
    server = status >= 500
    if protocol == "openai":
        default = ("server_error", None) if server else ("invalid_request_error", None)
        kind, code = _OPENAI_ERRORS.get(status, default)
        return _encode({"error": {"message": message, "type": kind, "param": None, "code": code}})
    if protocol == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(status, "api_error" if server else "invalid_request_error")
        return _encode(
            {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": "req_mock",
            }
        )
    rpc_status = _GEMINI_ERRORS.get(status, "INTERNAL" if server else "FAILED_PRECONDITION")
    error: dict[str, Any] = {"code": status, "message": message, "status": rpc_status}
    details = _gemini_details(status, retry_delay_ms)
    if details:
        error["details"] = details
    return _encode({"error": error})
