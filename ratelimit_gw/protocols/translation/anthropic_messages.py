"""Anthropic Messages (``/v1/messages``) as a converter codec: the caller's request, answer and
stream, and the upstream's, read from and written to :mod:`.ir` (docs/converters.md,
"Anthropic Messages", which holds the field-by-field table).

What needs care on this protocol, and why:

- Usage: Anthropic's ``input_tokens`` excludes ``cache_read_input_tokens`` and
  ``cache_creation_input_tokens``; the IR's includes them. Converted at each edge.
- Requests sent upstream always carry ``max_tokens`` (the API requires it), strictly
  alternate user/assistant (same-role turns merged, turns with nothing to send left out), put
  ``tool_result`` blocks first in their user turn, and never carry reasoning from another
  vendor (its signatures would be refused). A history that starts with the assistant is sent
  as it is: the API no longer requires a user turn first (the SDK's ``messages`` docs dropped
  that rule), and a made-up user turn would put words in the caller's mouth. A history with
  tool calls but no tool definitions declares the tools it used with ``tool_choice: none``
  (the API refuses tool blocks in a request without tools).
- Thinking: a budget is at least 1024 and below ``max_tokens``; it is left out (and named as
  dropped) where the API would refuse it: a budget that does not fit under ``max_tokens``, a
  forced tool choice, or a last assistant turn that calls tools (which must then begin with
  a signed thinking block the IR cannot carry across vendors).
- Streams: the final ``message_delta`` carries both the stop reason and the real usage, so the
  writer holds ``Finished`` until the next ``UsageReport`` (or ``close()``).
- An ``error`` event mid-stream is raised as a :class:`GatewayError` (the IR has no stream
  event for it; turning it into an ordinary end would pass a failed answer off as whole).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from ratelimit_gw.errors import GatewayError

# The adapter's view of Anthropic's usage, its conversion to the IR's meaning (cache reads
# and writes added to input) and how a stream's reports add up: one definition for the
# native tap and this codec.
from ratelimit_gw.protocols.anthropic import WireUsage, running_usage, usage_of
from ratelimit_gw.protocols.base import Route, Usage, decode_any_json, encode_json, require_model
from ratelimit_gw.protocols.translation.ir import (
    ChatAnswer,
    ChatRequest,
    Codec,
    Finished,
    Image,
    NamedTool,
    Part,
    Reasoning,
    ReasoningDelta,
    ResponseFormat,
    Started,
    StopReason,
    StreamEvent,
    StreamReader,
    StreamWriter,
    Text,
    TextDelta,
    ToolArgumentsDelta,
    ToolCall,
    ToolCallStarted,
    ToolResult,
    ToolSpec,
    Turn,
    UsageReport,
    refusal,
)

Json = dict[str, Any]

# The IR field names an Anthropic caller's fields go by where they differ. "reasoning" is the
# name writers drop reasoning parts (thinking blocks in the history) under.
_CALLER_PARAMS = {
    "stop": "stop_sequences",
    "reasoning_budget": "thinking",
    "show_reasoning": "thinking",
    "reasoning": "thinking",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
    "response_format": "output_config.format",
}

# Anthropic's floor for thinking.budget_tokens.
_MIN_THINKING_BUDGET = 1024
# Inline image types the API takes (Base64ImageSourceParam.media_type).
_IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# A tool_use id must match ^[a-zA-Z0-9_-]+$; other vendors' ids are made to fit.
_TOOL_ID_CHARS = frozenset(string.ascii_letters + string.digits + "_-")
_ERROR_EXCERPT_CHARS = 512

_STOP_FROM_ANTHROPIC: dict[str, StopReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_STOP_TO_ANTHROPIC: dict[StopReason, str] = {
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
# A mid-stream error event's type → the status it has outside a stream (protocol-notes §2.1).
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


# --- usage and stop reasons ------------------------------------------------------------


def _anthropic_usage(usage: Usage | None) -> Json:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    cached = usage.cache_read_tokens + usage.cache_write_tokens
    return {
        "input_tokens": max(0, usage.input_tokens - cached),
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
    }


def _ir_stop(stop_reason: str | None) -> StopReason:
    return _STOP_FROM_ANTHROPIC.get(stop_reason or "", "stop")


def _anthropic_stop(stop: StopReason, stop_sequence: str | None) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for an IR stop."""
    if stop == "stop":
        return ("stop_sequence", stop_sequence) if stop_sequence else ("end_turn", None)
    return _STOP_TO_ANTHROPIC[stop], None


# --- the caller's request --------------------------------------------------------------


def _invalid(path: str, expected: str) -> GatewayError:
    return GatewayError(
        400, "invalid_request", f"Invalid value for '{path}': expected {expected}", param=path
    )


def _object(value: object, path: str) -> Json:
    if not isinstance(value, dict):
        raise _invalid(path, "an object")
    return value


def _array(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise _invalid(path, "an array")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _invalid(path, "a string")
    return value


def _integer(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise _invalid(path, "a non-negative integer")
    return value


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(path, "a number")
    return float(value)


def _flag(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(path, "a boolean")
    return value


# Each block's fields that are read; any other (cache_control, citations, caller, …) is
# dropped and named by its key.
_TEXT_FIELDS = frozenset({"type", "text"})
_IMAGE_FIELDS = frozenset({"type", "source"})
_TOOL_USE_FIELDS = frozenset({"type", "id", "name", "input"})
_TOOL_RESULT_FIELDS = frozenset({"type", "tool_use_id", "content", "is_error"})
_THINKING_FIELDS = frozenset({"type", "thinking", "signature"})
_TOOL_FIELDS = frozenset({"type", "name", "description", "input_schema"})
_MESSAGE_FIELDS = frozenset({"role", "content"})
# Top-level fields whose meaning no other vendor can honour.
_REFUSED_FIELDS = {"mcp_servers": "remote MCP servers are reached by Anthropic's API only"}


class _RequestReader:
    """Reads one caller's Messages request into a :class:`ChatRequest`."""

    def __init__(self, request: ChatRequest) -> None:
        self.request = request
        self._tool_names: dict[str, str] = {}  # call id → tool name, to name tool results

    def read(self, doc: Json) -> ChatRequest:
        if doc.get("messages") is None:
            raise GatewayError(
                400, "invalid_request", "The request must have 'messages'", param="messages"
            )
        for key, value in doc.items():
            if value is None:
                continue  # null is absent: nothing to map, nothing lost
            read = _TOP_LEVEL.get(key)
            if read is not None:
                read(self, value)
            elif key in _REFUSED_FIELDS:
                raise refusal(key, _REFUSED_FIELDS[key])
            else:  # tuning (metadata, service_tier, cache_control, …) or unknown
                self.request.drop(key)
        return self.request

    def _drop_extra(self, doc: Json, known: frozenset[str]) -> None:
        for key, value in doc.items():
            if key not in known and value is not None:
                self.request.drop(key)

    # --- top-level fields

    def _ignore(self, value: object) -> None:
        """A field read before the walk (model, stream)."""

    def _max_tokens(self, value: object) -> None:
        self.request.max_tokens = _integer(value, "max_tokens")

    def _temperature(self, value: object) -> None:
        self.request.temperature = _number(value, "temperature")

    def _top_p(self, value: object) -> None:
        self.request.top_p = _number(value, "top_p")

    def _top_k(self, value: object) -> None:
        self.request.top_k = _integer(value, "top_k")

    def _stop_sequences(self, value: object) -> None:
        sequences = _array(value, "stop_sequences")
        self.request.stop = [_string(s, f"stop_sequences[{i}]") for i, s in enumerate(sequences)]

    def _system(self, value: object) -> None:
        self.request.system.extend(self._system_texts(value, "system"))

    def _system_texts(self, value: object, path: str) -> list[str]:
        if isinstance(value, str):
            return [value] if value else []
        texts = []
        for j, block in enumerate(_array(value, path)):
            block = _object(block, f"{path}[{j}]")
            if block.get("type") != "text":
                raise _invalid(f"{path}[{j}].type", "'text'")
            self._drop_extra(block, _TEXT_FIELDS)
            if text := _string(block.get("text"), f"{path}[{j}].text"):
                texts.append(text)
        return texts

    def _messages(self, value: object) -> None:
        for i, message in enumerate(_array(value, "messages")):
            path = f"messages[{i}]"
            message = _object(message, path)
            self._drop_extra(message, _MESSAGE_FIELDS)
            role, content = message.get("role"), message.get("content")
            if role == "system":  # newer API versions take system turns: merged in order
                self.request.system.extend(self._system_texts(content, f"{path}.content"))
            elif role == "user" or role == "assistant":
                self.request.turns.append(Turn(role, self._content(content, f"{path}.content")))
            else:
                raise _invalid(f"{path}.role", "'user', 'assistant' or 'system'")

    def _content(self, content: object, path: str) -> list[Part]:
        if isinstance(content, str):
            return [Text(content)] if content else []
        parts: list[Part] = []
        for j, block in enumerate(_array(content, path)):
            part = self._block(_object(block, f"{path}[{j}]"), f"{path}[{j}]")
            if part is not None:
                parts.append(part)
        return parts

    def _block(self, block: Json, path: str) -> Part | None:
        kind = block.get("type")
        if kind == "text":
            self._drop_extra(block, _TEXT_FIELDS)
            return Text(_string(block.get("text"), f"{path}.text"))
        if kind == "image":
            return self._image(block, path)
        if kind == "tool_use":
            self._drop_extra(block, _TOOL_USE_FIELDS)
            call_id = _string(block.get("id"), f"{path}.id")
            name = _string(block.get("name"), f"{path}.name")
            self._tool_names[call_id] = name
            return ToolCall(call_id, name, _object(block.get("input", {}), f"{path}.input"))
        if kind == "tool_result":
            return self._tool_result(block, path)
        if kind == "thinking":
            self._drop_extra(block, _THINKING_FIELDS)
            signature = block.get("signature")
            return Reasoning(
                _string(block.get("thinking"), f"{path}.thinking"),
                signature if isinstance(signature, str) and signature else None,
            )
        if kind == "redacted_thinking":
            # Opaque and sealed for Anthropic: no other vendor can read it.
            self.request.drop("redacted_thinking")
            return None
        # document, search_result, server tool blocks, container uploads: content only
        # Anthropic's API can read or produce.
        raise refusal(path, f"a '{kind}' block has no equivalent in the other protocols")

    def _image(self, block: Json, path: str) -> Image:
        self._drop_extra(block, _IMAGE_FIELDS)
        source = _object(block.get("source"), f"{path}.source")
        kind = source.get("type")
        if kind == "base64":
            return Image(
                media_type=_string(source.get("media_type"), f"{path}.source.media_type"),
                data=_string(source.get("data"), f"{path}.source.data"),
                param=path,
            )
        if kind == "url":
            return Image(None, url=_string(source.get("url"), f"{path}.source.url"), param=path)
        raise refusal(f"{path}.source", f"an image source of type '{kind}' cannot be translated")

    def _tool_result(self, block: Json, path: str) -> ToolResult:
        self._drop_extra(block, _TOOL_RESULT_FIELDS)
        call_id = _string(block.get("tool_use_id"), f"{path}.tool_use_id")
        content = block.get("content")
        parts: list[Text | Image] = []
        if isinstance(content, str):
            parts = [Text(content)] if content else []
        elif content is not None:
            for k, item in enumerate(_array(content, f"{path}.content")):
                item_path = f"{path}.content[{k}]"
                item = _object(item, item_path)
                if item.get("type") == "text":
                    self._drop_extra(item, _TEXT_FIELDS)
                    parts.append(Text(_string(item.get("text"), f"{item_path}.text")))
                elif item.get("type") == "image":
                    parts.append(self._image(item, item_path))
                else:
                    raise refusal(item_path, f"a '{item.get('type')}' block cannot be translated")
        is_error = block.get("is_error")
        return ToolResult(
            call_id,
            self._tool_names.get(call_id),
            parts,
            is_error=is_error is not None and _flag(is_error, f"{path}.is_error"),
        )

    def _tools(self, value: object) -> None:
        for i, tool in enumerate(_array(value, "tools")):
            path = f"tools[{i}]"
            tool = _object(tool, path)
            if tool.get("type") not in (None, "custom"):
                raise refusal(path, f"the tool type '{tool['type']}' runs on Anthropic's side only")
            self._drop_extra(tool, _TOOL_FIELDS)
            description = tool.get("description")
            self.request.tools.append(
                ToolSpec(
                    _string(tool.get("name"), f"{path}.name"),
                    None if description is None else _string(description, f"{path}.description"),
                    _object(tool.get("input_schema"), f"{path}.input_schema"),
                )
            )

    def _tool_choice(self, value: object) -> None:
        choice = _object(value, "tool_choice")
        kind = choice.get("type")
        if kind == "auto" or kind == "none":
            self.request.tool_choice = kind
        elif kind == "any":
            self.request.tool_choice = "required"
        elif kind == "tool":
            self.request.tool_choice = NamedTool(_string(choice.get("name"), "tool_choice.name"))
        else:
            raise _invalid("tool_choice.type", "'auto', 'any', 'tool' or 'none'")
        disable = choice.get("disable_parallel_tool_use")
        if disable is not None:
            path = "tool_choice.disable_parallel_tool_use"
            self.request.parallel_tool_calls = not _flag(disable, path)
        self._drop_extra(choice, frozenset({"type", "name", "disable_parallel_tool_use"}))

    def _thinking(self, value: object) -> None:
        config = _object(value, "thinking")
        kind = config.get("type")
        if kind == "enabled":
            budget = _integer(config.get("budget_tokens"), "thinking.budget_tokens")
            self.request.reasoning_budget = budget
        elif kind == "disabled":
            self.request.reasoning_budget = 0
            return
        elif kind not in ("adaptive", "between_tools"):
            raise _invalid("thinking.type", "'enabled', 'adaptive' or 'disabled'")
        # Adaptive thinking has no budget: the target's own default decides how much.
        # "omitted" asks for signatures without the text: nothing a translation can show.
        self.request.show_reasoning = config.get("display") != "omitted"

    def _output_config(self, value: object) -> None:
        config = _object(value, "output_config")
        for key, item in config.items():
            if key == "format" and item is not None:
                self._output_format(item, "output_config.format")
            elif item is not None:  # effort: Anthropic's own dial, not a thinking budget
                self.request.drop(f"output_config.{key}")

    def _beta_output_format(self, value: object) -> None:
        self._output_format(value, "output_format")

    def _output_format(self, value: object, path: str) -> None:
        fmt = _object(value, path)
        if fmt.get("type") != "json_schema":
            raise _invalid(f"{path}.type", "'json_schema'")
        schema = _object(fmt.get("schema"), f"{path}.schema")
        self.request.response_format = ResponseFormat("json_schema", schema=schema)
        self.request.params["response_format"] = path


_TOP_LEVEL: dict[str, Callable[[_RequestReader, object], None]] = {
    "model": _RequestReader._ignore,
    "stream": _RequestReader._ignore,
    "messages": _RequestReader._messages,
    "system": _RequestReader._system,
    "max_tokens": _RequestReader._max_tokens,
    "temperature": _RequestReader._temperature,
    "top_p": _RequestReader._top_p,
    "top_k": _RequestReader._top_k,
    "stop_sequences": _RequestReader._stop_sequences,
    "tools": _RequestReader._tools,
    "tool_choice": _RequestReader._tool_choice,
    "thinking": _RequestReader._thinking,
    "output_config": _RequestReader._output_config,
    "output_format": _RequestReader._beta_output_format,
}


def _read_request(body: bytes, path_model: str | None) -> ChatRequest:
    try:
        doc = decode_any_json(body)
    except msgspec.DecodeError as exc:
        raise GatewayError(400, "invalid_json", f"Request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise GatewayError(400, "invalid_json", "Request body must be a JSON object")
    model = doc.get("model") or path_model
    stream = doc.get("stream")
    request = ChatRequest(
        model=require_model(_string(model, "model") if model is not None else None),
        stream=stream is not None and _flag(stream, "stream"),
        params=dict(_CALLER_PARAMS),
    )
    return _RequestReader(request).read(doc)


# --- the caller's answer ---------------------------------------------------------------


def _answer_block(part: Text | ToolCall | Reasoning) -> Json:
    if isinstance(part, Text):
        return {"type": "text", "text": part.text}
    if isinstance(part, ToolCall):
        return {"type": "tool_use", "id": part.id, "name": part.name, "input": part.arguments}
    # The API requires a signature string; another vendor's seal (or none) is passed as is,
    # so the caller can send it back and the same codec pair can restore it.
    return {"type": "thinking", "thinking": part.text, "signature": part.signature or ""}


def _write_answer(answer: ChatAnswer, request: ChatRequest) -> bytes:
    stop_reason, stop_sequence = _anthropic_stop(answer.stop, answer.stop_sequence)
    content = [
        _answer_block(part)
        for part in answer.parts
        if not isinstance(part, Reasoning)
        or (request.show_reasoning and (part.text or part.signature))
    ]
    return encode_json(
        {
            "id": answer.id,
            "type": "message",
            "role": "assistant",
            "model": answer.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": _anthropic_usage(answer.usage),
        }
    )


def _sse(event: Json) -> bytes:
    name: str = event["type"]
    return b"event: " + name.encode() + b"\ndata: " + encode_json(event) + b"\n\n"


# Most of a stream is content_block_delta events: their bytes around the block's index and
# the one string each carries, per delta type, so that only the string is encoded.
_DELTA_EVENT_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_DELTA_OPENINGS = {
    kind: f',"delta":{{"type":"{kind}","{field}":'.encode()
    for kind, field in (
        ("text_delta", "text"),
        ("thinking_delta", "thinking"),
        ("signature_delta", "signature"),
        ("input_json_delta", "partial_json"),
    )
}


def _delta_event(index: int | None, kind: str, value: str) -> bytes:
    """A content_block_delta event (the bytes ``_sse`` would write for it)."""
    return (
        _DELTA_EVENT_HEAD
        + encode_json(index)
        + _DELTA_OPENINGS[kind]
        + encode_json(value)
        + b"}}\n\n"
    )


BlockKind = Literal["text", "thinking", "tool_use"]


class _MessagesStreamWriter(StreamWriter):
    """Writes one answer as Anthropic's event stream: ``message_start``, one
    ``content_block_start``/``_delta``/``_stop`` run per block, ``message_delta`` (stop reason
    and usage together), ``message_stop``."""

    def __init__(self, request: ChatRequest) -> None:
        self._request = request
        self._started = False
        self._open_index: int | None = None  # the content block now open
        self._open_kind: BlockKind | None = None
        self._signed = False  # the open thinking block has its signature: it is complete
        self._blocks = 0
        self._tool_blocks: dict[int, int] = {}  # IR tool-call index → block index
        self._finished: Finished | None = None
        self._usage: Usage | None = None
        self._done = False

    def feed(self, event: StreamEvent) -> bytes:
        if self._done:
            return b""
        out: list[bytes] = []
        if isinstance(event, Started):
            if not self._started:
                self._start(event, out)
            return b"".join(out)
        if not self._started:
            self._start(Started("", self._request.model), out)
        if isinstance(event, UsageReport):
            self._usage = event.usage
            if self._finished is not None:
                self._end(out)
        elif self._finished is not None:
            pass  # content after the stop reason has no place in the stream
        elif isinstance(event, TextDelta):
            self._text(event, out)
        elif isinstance(event, ReasoningDelta):
            self._reasoning(event, out)
        elif isinstance(event, ToolCallStarted):
            block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
            self._tool_blocks[event.index] = self._open("tool_use", block, out)
        elif isinstance(event, ToolArgumentsDelta):
            self._arguments(event, out)
        else:  # Finished: held until the usage that goes out with it
            self._close_block(out)
            self._finished = event
        return b"".join(out)

    def close(self) -> bytes:
        if self._done:
            return b""
        out: list[bytes] = []
        if not self._started:
            self._start(Started("", self._request.model), out)
        self._close_block(out)
        self._end(out)
        return b"".join(out)

    def _start(self, event: Started, out: list[bytes]) -> None:
        self._started = True
        message: Json = {
            "id": event.id,
            "type": "message",
            "role": "assistant",
            "model": event.model or self._request.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _anthropic_usage(event.usage),  # input may be 0: known only at the end
        }
        out.append(_sse({"type": "message_start", "message": message}))

    def _text(self, event: TextDelta, out: list[bytes]) -> None:
        if not event.text:
            return
        if self._open_kind != "text":
            self._open("text", {"type": "text", "text": ""}, out)
        out.append(_delta_event(self._open_index, "text_delta", event.text))

    def _reasoning(self, event: ReasoningDelta, out: list[bytes]) -> None:
        if not self._request.show_reasoning or not (event.text or event.signature):
            return
        if self._open_kind != "thinking" or self._signed:
            self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
        if event.text:
            out.append(_delta_event(self._open_index, "thinking_delta", event.text))
        if event.signature:
            out.append(_delta_event(self._open_index, "signature_delta", event.signature))
            self._signed = True

    def _arguments(self, event: ToolArgumentsDelta, out: list[bytes]) -> None:
        index = self._tool_blocks.get(event.index)
        if index is None or not event.fragment:
            return
        # A fragment for a call whose block another block has closed (arguments interleaved
        # across calls) still goes to that call's index: the SDK's accumulator reads by index.
        out.append(_delta_event(index, "input_json_delta", event.fragment))

    def _open(self, kind: BlockKind, block: Json, out: list[bytes]) -> int:
        self._close_block(out)
        index, self._blocks = self._blocks, self._blocks + 1
        self._open_index, self._open_kind, self._signed = index, kind, False
        out.append(_sse({"type": "content_block_start", "index": index, "content_block": block}))
        return index

    def _close_block(self, out: list[bytes]) -> None:
        if self._open_index is not None:
            out.append(_sse({"type": "content_block_stop", "index": self._open_index}))
            self._open_index = self._open_kind = None

    def _end(self, out: list[bytes]) -> None:
        finished = self._finished or Finished("stop")
        stop_reason, stop_sequence = _anthropic_stop(finished.stop, finished.stop_sequence)
        # output_tokens is required here; without a report, nothing better is known.
        usage = _anthropic_usage(self._usage) if self._usage else {"output_tokens": 0}
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        out.append(_sse({"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(_sse({"type": "message_stop"}))
        self._done = True


# --- the upstream's request ------------------------------------------------------------


def _tool_id(call_id: str) -> str:
    if call_id and all(c in _TOOL_ID_CHARS for c in call_id):
        return call_id
    return "".join(c if c in _TOOL_ID_CHARS else "_" for c in call_id) or "toolu_"


def _image_block(image: Image) -> Json:
    if image.data is not None:
        if image.media_type not in _IMAGE_MEDIA_TYPES:
            raise refusal(
                image.param,
                f"Anthropic takes JPEG, PNG, GIF or WebP images inline, not {image.media_type}",
            )
        source = {"type": "base64", "media_type": image.media_type, "data": image.data}
        return {"type": "image", "source": source}
    if image.url and image.url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": image.url}}
    raise refusal(image.param, "Anthropic takes an image by http(s) URL or inline base64 only")


def _result_block(result: ToolResult) -> Json:
    block: Json = {"type": "tool_result", "tool_use_id": _tool_id(result.call_id)}
    content = [
        _image_block(part) if isinstance(part, Image) else {"type": "text", "text": part.text}
        for part in result.content
        if not isinstance(part, Text) or part.text.strip()
    ]
    if content:
        block["content"] = content
    if result.is_error:
        block["is_error"] = True
    return block


def _request_block(part: Part, request: ChatRequest) -> Json | None:
    if isinstance(part, Text):
        # The API refuses text blocks without a visible character.
        return {"type": "text", "text": part.text} if part.text.strip() else None
    if isinstance(part, ToolCall):
        return {
            "type": "tool_use",
            "id": _tool_id(part.id),
            "name": part.name,
            "input": part.arguments,
        }
    if isinstance(part, ToolResult):
        return _result_block(part)
    if isinstance(part, Image):
        return _image_block(part)
    # Reasoning: another vendor's (an Anthropic caller never gets here); its seal would be
    # refused and its text is not Claude's own.
    request.drop("reasoning")
    return None


def _messages(request: ChatRequest) -> list[Json]:
    """The turns as alternating messages: empty turns left out, same-role turns merged."""
    messages: list[Json] = []
    for turn in request.turns:
        blocks = [b for part in turn.parts if (b := _request_block(part, request)) is not None]
        if not blocks:
            continue
        if messages and messages[-1]["role"] == turn.role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": turn.role, "content": blocks})
    for message in messages:
        if message["role"] == "user":
            # The API wants a user turn's tool_result blocks before anything else in it.
            message["content"].sort(key=lambda block: block["type"] != "tool_result")
    _trim_prefill(messages)
    return messages


def _trim_prefill(messages: list[Json]) -> None:
    """A final assistant turn (a prefill) may not end in whitespace: the API refuses it."""
    if not messages or messages[-1]["role"] != "assistant":
        return
    content = messages[-1]["content"]
    while content and content[-1]["type"] == "text":
        text = content[-1]["text"].rstrip()
        if text:
            content[-1]["text"] = text
            return
        content.pop()
    if not content:
        messages.pop()


def _input_schema(parameters: Json) -> Json:
    # The API requires input_schema.type; a function without parameters often has none.
    return parameters if "type" in parameters else {"type": "object", **parameters}


def _tool_choice(request: ChatRequest) -> Json | None:
    choice = request.tool_choice
    if choice == "none":
        return {"type": "none"}
    if choice is None or choice == "auto":
        written: Json = {"type": "auto"}
    elif choice == "required":
        written = {"type": "any"}
    else:
        written = {"type": "tool", "name": choice.name}
    if request.parallel_tool_calls is False:
        written["disable_parallel_tool_use"] = True
    elif choice is None:
        return None
    return written


def _write_tools(request: ChatRequest, body: Json) -> None:
    if request.tools:
        body["tools"] = [
            {"name": spec.name, "input_schema": _input_schema(spec.parameters)}
            | ({"description": spec.description} if spec.description else {})
            for spec in request.tools
        ]
        if (choice := _tool_choice(request)) is not None:
            body["tool_choice"] = choice
        return
    # The API refuses tool_use/tool_result blocks in a request that defines no tools: the
    # tools the history used are declared, and none may be called (as without tools).
    used = sorted(
        {part.name for turn in request.turns for part in turn.parts if isinstance(part, ToolCall)}
    )
    if used:
        body["tools"] = [{"name": name, "input_schema": {"type": "object"}} for name in used]
        body["tool_choice"] = {"type": "none"}
    if request.tool_choice == "required" or isinstance(request.tool_choice, NamedTool):
        request.drop("tool_choice")  # nothing to call


def _calls_tools_last(request: ChatRequest) -> bool:
    """Whether the last assistant turn calls tools (then, with thinking on, the API wants it
    to begin with the signed thinking block that came with it)."""
    for turn in reversed(request.turns):
        if turn.role == "assistant" and any(not isinstance(p, Reasoning) for p in turn.parts):
            return any(isinstance(part, ToolCall) for part in turn.parts)
    return False


def _thinking(request: ChatRequest, max_tokens: int) -> Json | None:
    budget = request.reasoning_budget
    if budget is None:
        if request.show_reasoning:
            request.drop("show_reasoning")  # no budget asked for: thinking stays off
        return None
    if budget <= 0:
        return {"type": "disabled"}
    budget = min(max(budget, _MIN_THINKING_BUDGET), max_tokens - 1)
    forced = request.tools and (
        request.tool_choice == "required" or isinstance(request.tool_choice, NamedTool)
    )
    if budget < _MIN_THINKING_BUDGET or forced or _calls_tools_last(request):
        request.drop("reasoning_budget")
        return None
    return {"type": "enabled", "budget_tokens": budget}


def _write_sampling(request: ChatRequest, body: Json, thinking: bool) -> None:
    # With thinking on, the API takes temperature 1 only, top_p from 0.95, and no top_k.
    if request.temperature is not None:
        if thinking and request.temperature != 1:
            request.drop("temperature")
        else:
            body["temperature"] = request.temperature
    if request.top_p is not None:
        if thinking and request.top_p < 0.95:
            request.drop("top_p")
        else:
            body["top_p"] = request.top_p
    if request.top_k is not None:
        if thinking:
            request.drop("top_k")
        else:
            body["top_k"] = request.top_k
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    for name in ("presence_penalty", "frequency_penalty", "seed"):
        if getattr(request, name) is not None:
            request.drop(name)


def _write_request(request: ChatRequest, model: str, default_max_tokens: int) -> bytes:
    if request.response_format is not None:
        raise request.refuse(
            "response_format", "Anthropic Messages has no JSON mode this route can use"
        )
    max_tokens = default_max_tokens if request.max_tokens is None else request.max_tokens
    body: Json = {"model": model, "max_tokens": max_tokens}
    if system := "\n\n".join(text for text in request.system if text.strip()):
        body["system"] = system
    body["messages"] = _messages(request)
    _write_tools(request, body)
    thinking = _thinking(request, max_tokens)
    if thinking is not None:
        body["thinking"] = thinking
    _write_sampling(request, body, thinking is not None and thinking["type"] == "enabled")
    if request.stream:
        body["stream"] = True
    return encode_json(body)


# --- the upstream's answer -------------------------------------------------------------


class _Block(msgspec.Struct):
    type: str = ""
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    thinking: str | None = None
    signature: str | None = None


class _Message(msgspec.Struct):
    id: str = ""
    model: str = ""
    content: list[_Block] = []
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: WireUsage | None = None


class _Delta(msgspec.Struct):
    # Both delta shapes: a content block's (text, JSON, thinking, signature) and the
    # message's (stop reason).
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    signature: str | None = None
    stop_reason: str | None = None
    stop_sequence: str | None = None


class _Error(msgspec.Struct):
    type: str = ""
    message: str = ""


class _Event(msgspec.Struct):
    type: str = ""
    message: _Message | None = None
    index: int = 0
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: WireUsage | None = None
    error: _Error | None = None


class _ErrorBody(msgspec.Struct):
    error: _Error | None = None


_MESSAGE = msgspec.json.Decoder(_Message)
_EVENT = msgspec.json.Decoder(_Event)
_ERROR_BODY = msgspec.json.Decoder(_ErrorBody)


def _answer_part(block: _Block) -> Text | ToolCall | Reasoning | None:
    if block.type == "text":
        return Text(block.text or "")
    if block.type == "tool_use":
        return ToolCall(block.id or "", block.name or "", block.input or {})
    if block.type == "thinking":
        return Reasoning(block.thinking or "", block.signature or None)
    return None  # redacted thinking (sealed), server tool blocks (never asked for)


def _read_answer(body: bytes) -> ChatAnswer:
    message = _MESSAGE.decode(body)
    return ChatAnswer(
        id=message.id,
        model=message.model,
        parts=[part for block in message.content if (part := _answer_part(block)) is not None],
        stop=_ir_stop(message.stop_reason),
        usage=usage_of(message.usage) if message.usage is not None else None,
        stop_sequence=message.stop_sequence,
    )


def _stream_error(error: _Error | None) -> GatewayError:
    kind, message = (error.type, error.message) if error is not None else ("", "")
    return GatewayError(
        _ERROR_STATUS.get(kind, 502),
        "upstream_error",
        f"The upstream's stream failed: {kind or 'error'}: {message or 'no message'}",
    )


# Events that say nothing a caller's stream needs: a block's end is written when the next
# begins or the message ends, and the stream's end by close().
_UNREAD_EVENTS = frozenset({"ping", "content_block_stop", "message_stop"})


class _MessagesStreamReader(StreamReader):
    """Reads Anthropic's event stream; usage figures are cumulative, field by field."""

    def __init__(self) -> None:
        self._counts = WireUsage()
        self._tool_calls: dict[int, int] = {}  # block index → IR tool-call index

    def feed(self, name: str | None, data: bytes) -> list[StreamEvent]:
        if name in _UNREAD_EVENTS:
            return []  # known by its name, as the adapter's tap knows it: not decoded
        event = _EVENT.decode(data)
        kind = event.type or name
        if kind == "content_block_delta" and event.delta is not None:
            return self._delta(event.index, event.delta)
        if kind == "content_block_start" and event.content_block is not None:
            return self._block_start(event.index, event.content_block)
        if kind == "message_start" and event.message is not None:
            message = event.message
            usage = self._count(message.usage) if message.usage is not None else None
            return [Started(message.id, message.model, usage)]
        if kind == "message_delta":
            return self._message_delta(event)
        if kind == "error":
            raise _stream_error(event.error)
        return []  # ping, content_block_stop, message_stop

    def _delta(self, index: int, delta: _Delta) -> list[StreamEvent]:
        if delta.type == "text_delta" and delta.text:
            return [TextDelta(delta.text)]
        if delta.type == "input_json_delta" and delta.partial_json:
            call = self._tool_calls.get(index)
            return [] if call is None else [ToolArgumentsDelta(call, delta.partial_json)]
        if delta.type == "thinking_delta" and delta.thinking:
            return [ReasoningDelta(delta.thinking)]
        if delta.type == "signature_delta" and delta.signature:
            return [ReasoningDelta("", signature=delta.signature)]
        return []  # citations_delta, empty fragments

    def _block_start(self, index: int, block: _Block) -> list[StreamEvent]:
        if block.type == "tool_use":
            call = self._tool_calls[index] = len(self._tool_calls)
            events: list[StreamEvent] = [ToolCallStarted(call, block.id or "", block.name or "")]
            if block.input:  # streams start with {} and send the input as fragments
                events.append(ToolArgumentsDelta(call, encode_json(block.input).decode()))
            return events
        part = _answer_part(block)
        if isinstance(part, Text) and part.text:
            return [TextDelta(part.text)]
        if isinstance(part, Reasoning) and (part.text or part.signature):
            return [ReasoningDelta(part.text, part.signature)]
        return []

    def _message_delta(self, event: _Event) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        delta = event.delta
        if delta is not None and delta.stop_reason is not None:
            events.append(Finished(_ir_stop(delta.stop_reason), delta.stop_sequence))
        if event.usage is not None:
            events.append(UsageReport(self._count(event.usage)))
        return events

    def _count(self, usage: WireUsage) -> Usage:
        return running_usage(self._counts, usage)


def _error_message(body: bytes) -> str:
    try:
        error = _ERROR_BODY.decode(body).error
    except msgspec.DecodeError:
        error = None
    if error is not None and error.message:
        return error.message
    return body.decode("utf-8", "replace").strip()[:_ERROR_EXCERPT_CHARS]


# --- the codec -------------------------------------------------------------------------


class AnthropicMessagesCodec(Codec):
    name = "anthropic"

    def read_request(self, body: bytes, route: Route, path_model: str | None) -> ChatRequest:
        return _read_request(body, path_model)

    def write_answer(self, answer: ChatAnswer, request: ChatRequest) -> bytes:
        return _write_answer(answer, request)

    def answer_writer(self, request: ChatRequest) -> StreamWriter:
        return _MessagesStreamWriter(request)

    def upstream_route(self, request: ChatRequest) -> Route:
        return Route.MESSAGES

    def write_request(self, request: ChatRequest, model: str, default_max_tokens: int) -> bytes:
        return _write_request(request, model, default_max_tokens)

    def read_answer(self, body: bytes) -> ChatAnswer:
        return _read_answer(body)

    def answer_reader(self) -> StreamReader:
        return _MessagesStreamReader()

    def error_message(self, body: bytes) -> str:
        return _error_message(body)
