"""OpenAI Chat Completions (``/v1/chat/completions``) as a converter codec (docs/converters.md).

Caller side: a chat request read into :class:`~.ir.ChatRequest` (``system``/``developer``
messages merged in order, ``tool`` messages folded into user turns, data-URL images inline,
``reasoning_effort`` as a thinking budget), and the answer written back as a
``chat.completion`` or a stream of ``chat.completion.chunk`` events ending ``data: [DONE]``.
Upstream side: the intermediate shape written as a chat request (always asking a stream for
its usage chunk), and the upstream's completion or chunks read back.

Reasoning has no standard slot in OpenAI chat: the ``reasoning_content`` (or ``reasoning``)
text some OpenAI-compatible upstreams send is read as reasoning, and reasoning written
toward an OpenAI caller is left out. docs/converters.md has the field-by-field table.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Final, get_args

import msgspec

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.base import (
    MaxTokens,
    Route,
    Usage,
    decode_any_json,
    encode_json,
    require_model,
)

# The adapter's view of chat usage and its conversion (cached input inside prompt_tokens):
# one definition for the native tap, settlement and this codec.
from ratelimit_gw.protocols.openai import ChatUsage, chat_usage
from ratelimit_gw.protocols.translation.ir import (
    EFFORT_BUDGETS,
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
    ToolChoice,
    ToolResult,
    ToolSpec,
    Turn,
    UsageReport,
    effort_for_budget,
    refusal,
)

# --- the caller's request ----------------------------------------------------------------


class _ImageUrl(msgspec.Struct):
    url: str
    detail: str | None = None


class _ContentPart(msgspec.Struct):
    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant's refusal part
    image_url: _ImageUrl | None = None


class _FunctionCall(msgspec.Struct):
    name: str
    arguments: str = ""


class _MessageToolCall(msgspec.Struct):
    id: str
    type: str = "function"
    function: _FunctionCall | None = None


class _Message(msgspec.Struct):
    role: str
    content: str | list[_ContentPart] | None = None
    tool_calls: list[_MessageToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None  # what reasoning upstreams send, echoed back
    audio: Any = None
    function_call: Any = None


class _FunctionDefinition(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(msgspec.Struct):
    type: str = "function"
    function: _FunctionDefinition | None = None


class _NamedFunction(msgspec.Struct):
    name: str


class _AllowedTools(msgspec.Struct):
    mode: str
    tools: list[_Tool]


class _ToolChoiceObject(msgspec.Struct):
    type: str
    function: _NamedFunction | None = None
    allowed_tools: _AllowedTools | None = None


class _JsonSchema(msgspec.Struct):
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class _ResponseFormat(msgspec.Struct):
    type: str
    json_schema: _JsonSchema | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class _Request(msgspec.Struct):
    messages: list[_Message]
    model: str | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's: the extension OpenAI-compatible servers take
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | _ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    response_format: _ResponseFormat | None = None
    reasoning_effort: str | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    modalities: list[str] | None = None
    audio: Any = None
    functions: Any = None
    function_call: Any = None
    web_search_options: Any = None


# Fields that only tune how an answer is made or kept: not sent on, and named.
_TUNING_FIELDS: Final = frozenset(
    {
        "user",
        "metadata",
        "service_tier",
        "store",
        "prediction",
        "logit_bias",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "verbosity",
        "moderation",
    }
)
_REQUEST_FIELDS: Final = frozenset(_Request.__struct_fields__)
_MESSAGE_FIELDS: Final = frozenset(_Message.__struct_fields__)
# input_audio and file are refused, not dropped: they are what the message says.
_PART_FIELDS: Final = frozenset({*_ContentPart.__struct_fields__, "input_audio", "file"})
_FUNCTION_FIELDS: Final = frozenset(_FunctionDefinition.__struct_fields__)
# OpenAI's efforts above "high" get the largest budget there is.
_EFFORT_BUDGETS: Final = {
    "none": 0,
    **EFFORT_BUDGETS,
    "xhigh": max(EFFORT_BUDGETS.values()),
    "max": max(EFFORT_BUDGETS.values()),
}
_TOOL_CHOICE_MODES: Final[dict[str, ToolChoice]] = {
    "auto": "auto",
    "none": "none",
    "required": "required",
}
# A function with no parameters still needs an object schema on the targets.
_NO_PARAMETERS: Final = {"type": "object", "properties": {}}


def _validated(doc: Any) -> _Request:
    if not isinstance(doc, dict):
        raise GatewayError(400, "invalid_json", "Request body must be a JSON object")
    try:
        return msgspec.convert(doc, _Request)
    except msgspec.ValidationError as exc:
        detail, at, path = str(exc).rpartition(" - at `$.")
        param = path.rstrip("`") if at else "messages"
        message = detail if at else str(exc)
        raise GatewayError(
            400, "invalid_request", f"Invalid value for '{param}': {message}", param=param
        ) from None


def _is_given(value: Any) -> bool:
    """Whether a field is present with a value (not null, nor an empty string or list)."""
    return value is not None and value != "" and value != []


def _refuse_unanswerable(view: _Request) -> None:
    """Fields whose loss would change what the answer is: a 400 naming each."""
    if view.n is not None and view.n > 1:
        raise refusal("n", "one answer per request (n must be 1)")
    if view.logprobs or (view.top_logprobs or 0) > 0:
        raise refusal("logprobs" if view.logprobs else "top_logprobs", "no log probabilities")
    if "audio" in (view.modalities or ()):
        raise refusal("modalities", "text output only")
    if _is_given(view.audio):
        raise refusal("audio", "text output only")
    if _is_given(view.functions) or _is_given(view.function_call):
        name = "functions" if _is_given(view.functions) else "function_call"
        raise refusal(name, "the deprecated functions API: use tools and tool_choice")
    if _is_given(view.web_search_options):
        raise refusal("web_search_options", "no web search on the target model")


def _reasoning_budget(effort: str | None) -> int | None:
    if effort is None:
        return None
    if effort not in _EFFORT_BUDGETS:
        raise refusal("reasoning_effort", f"unknown effort {effort!r}")
    return _EFFORT_BUDGETS[effort]


def _read_settings(view: _Request, request: ChatRequest) -> None:
    caps = {
        name: cap
        for name, cap in (
            ("max_completion_tokens", view.max_completion_tokens),
            ("max_tokens", view.max_tokens),
        )
        if cap is not None
    }
    if caps:
        # Both spellings given: the adapter holds the larger, so the larger is sent.
        request.max_tokens = max(caps.values())
        request.params["max_tokens"] = next(iter(caps))
    request.temperature = view.temperature
    request.top_p = view.top_p
    request.top_k = view.top_k
    request.stop = [view.stop] if isinstance(view.stop, str) else list(view.stop or ())
    request.presence_penalty = view.presence_penalty
    request.frequency_penalty = view.frequency_penalty
    request.seed = view.seed
    request.reasoning_budget = _reasoning_budget(view.reasoning_effort)
    request.params["reasoning_budget"] = "reasoning_effort"
    options = view.stream_options
    if request.stream and options is not None:
        request.include_usage = bool(options.include_usage)
        if options.include_obfuscation:
            request.drop("stream_options.include_obfuscation")
    request.response_format = _response_format(view.response_format, request)


def _response_format(given: _ResponseFormat | None, request: ChatRequest) -> ResponseFormat | None:
    if given is None or given.type == "text":
        return None
    if given.type == "json_object":
        return ResponseFormat("json_object")
    if given.type != "json_schema" or given.json_schema is None:
        raise refusal("response_format", f"unknown response format {given.type!r}")
    spec = given.json_schema
    if spec.description is not None:
        request.drop("response_format.json_schema.description")
    return ResponseFormat("json_schema", schema=spec.schema, name=spec.name, strict=spec.strict)


def _tool_spec(tool: _Tool, index: int) -> ToolSpec:
    if tool.type != "function" or tool.function is None:
        raise refusal(f"tools[{index}]", f"only function tools (not {tool.type!r})")
    function = tool.function
    return ToolSpec(function.name, function.description, function.parameters or _NO_PARAMETERS)


def _read_tools(view: _Request, request: ChatRequest) -> None:
    request.tools = [_tool_spec(tool, i) for i, tool in enumerate(view.tools or ())]
    request.parallel_tool_calls = view.parallel_tool_calls
    choice = view.tool_choice
    if choice is None or isinstance(choice, str):
        request.tool_choice = _tool_choice_mode(choice)
    elif choice.type == "function" and choice.function is not None:
        request.tool_choice = NamedTool(choice.function.name)
    elif choice.type == "allowed_tools" and choice.allowed_tools is not None:
        # Offering only the allowed tools means the same to the model as allowing them.
        allowed = {t.function.name for t in choice.allowed_tools.tools if t.function is not None}
        request.tools = [tool for tool in request.tools if tool.name in allowed]
        request.tool_choice = _tool_choice_mode(choice.allowed_tools.mode)
    else:
        raise refusal("tool_choice", f"only function tools (not {choice.type!r})")


def _tool_choice_mode(mode: str | None) -> ToolChoice | None:
    if mode is None:
        return None
    if mode not in _TOOL_CHOICE_MODES:
        raise refusal("tool_choice", f"unknown tool_choice {mode!r}")
    return _TOOL_CHOICE_MODES[mode]


# --- the caller's messages ---------------------------------------------------------------


def _image(url: str, param: str) -> Image:
    """An ``image_url``: a base64 data URL inline, anything else by reference."""
    if not url.startswith("data:"):
        return Image(None, url=url, param=param)
    header, comma, data = url[5:].partition(",")
    if not comma or not header.endswith(";base64"):
        raise refusal(param, "an image data URL must be base64")
    media_type = header.split(";", 1)[0]
    return Image(media_type or None, data=data, param=param)


def _content_parts(message: _Message, path: str) -> list[Text | Image]:
    """A user or tool message's content as text and image parts."""
    if isinstance(message.content, str):
        return [Text(message.content)]
    parts: list[Text | Image] = []
    for j, part in enumerate(message.content or ()):
        param = f"{path}.content[{j}]"
        if part.type == "text":
            parts.append(Text(part.text or ""))
        elif part.type == "image_url" and part.image_url is not None:
            parts.append(_image(part.image_url.url, param))
        else:
            raise refusal(param, f"a {part.type!r} part has no equivalent on the target")
    return parts


def _system_text(message: _Message, path: str) -> str:
    texts: list[str] = []
    for part in _content_parts(message, path):
        if not isinstance(part, Text):
            raise refusal(part.param, "a system message carries text only")
        texts.append(part.text)
    return "\n".join(texts)


def _arguments(text: str, param: str) -> dict[str, Any]:
    if not text.strip():
        return {}  # a call of a function without parameters
    try:
        arguments = decode_any_json(text)
    except msgspec.DecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise refusal(param, "tool-call arguments must be a JSON object")
    return arguments


def _assistant_parts(message: _Message, path: str, request: ChatRequest) -> list[Part]:
    if _is_given(message.audio) or _is_given(message.function_call):
        field = "audio" if _is_given(message.audio) else "function_call"
        raise refusal(f"{path}.{field}", "no equivalent on the target")
    parts: list[Part] = []
    if message.reasoning_content:
        request.params["reasoning"] = "messages[].reasoning_content"
        parts.append(Reasoning(message.reasoning_content))
    if isinstance(message.content, str):
        parts.append(Text(message.content))
    for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
        if part.type not in ("text", "refusal"):
            raise refusal(f"{path}.content[{j}]", f"an assistant {part.type!r} part")
        parts.append(Text(part.text or part.refusal or ""))
    if message.refusal:
        parts.append(Text(message.refusal))
    for j, call in enumerate(message.tool_calls or ()):
        if call.type != "function" or call.function is None:
            raise refusal(f"{path}.tool_calls[{j}]", f"only function calls (not {call.type!r})")
        param = f"{path}.tool_calls[{j}].function.arguments"
        arguments = _arguments(call.function.arguments, param)
        parts.append(ToolCall(call.id, call.function.name, arguments))
    # An empty text beside tool calls is how OpenAI writes "no text".
    return [part for part in parts if not (isinstance(part, Text) and not part.text)]


def _tool_result(message: _Message, path: str, call_names: dict[str, str]) -> ToolResult:
    if message.tool_call_id is None:
        raise GatewayError(
            400,
            "invalid_request",
            f"'{path}.tool_call_id' is required in a tool message",
            param=f"{path}.tool_call_id",
        )
    content = _content_parts(message, path)
    return ToolResult(message.tool_call_id, call_names.get(message.tool_call_id), content)


def _add_tool_result(turns: list[Turn], result: ToolResult) -> None:
    """Consecutive tool messages answer one assistant turn: one user turn holds them."""
    last = turns[-1].parts if turns and turns[-1].role == "user" else []
    if last and all(isinstance(part, ToolResult) for part in last):
        last.append(result)
    else:
        turns.append(Turn("user", [result]))


def _read_messages(messages: list[_Message], request: ChatRequest) -> None:
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        path = f"messages[{i}]"
        role = message.role
        if role in ("system", "developer"):
            request.system.append(_system_text(message, path))
        elif role == "user":
            request.turns.append(Turn("user", [*_content_parts(message, path)]))
        elif role == "assistant":
            parts = _assistant_parts(message, path, request)
            call_names.update((p.id, p.name) for p in parts if isinstance(p, ToolCall))
            if parts:  # an assistant message that said nothing is nothing to send
                request.turns.append(Turn("assistant", parts))
        elif role == "tool":
            _add_tool_result(request.turns, _tool_result(message, path, call_names))
        else:
            raise refusal(f"{path}.role", f"role {role!r} has no equivalent on the target")


def _drop_unread_fields(doc: dict[str, Any], request: ChatRequest) -> None:
    """Name every given field that is not sent on: tuning fields and ones unknown here."""
    for key, value in doc.items():
        if value is not None and (key in _TUNING_FIELDS or key not in _REQUEST_FIELDS):
            request.drop(key)
    for message in doc["messages"]:
        for key in message:
            if key == "name" or key not in _MESSAGE_FIELDS:
                request.drop(f"messages[].{key}")
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            for key in part:
                if key not in _PART_FIELDS:
                    request.drop(f"messages[].content[].{key}")
            if isinstance(part.get("image_url"), dict) and "detail" in part["image_url"]:
                request.drop("messages[].content[].image_url.detail")
    for tool in doc.get("tools") or ():
        for key in tool.get("function") or ():
            if key not in _FUNCTION_FIELDS:
                request.drop(f"tools[].function.{key}")


# --- the upstream's request --------------------------------------------------------------


def _image_url(image: Image) -> dict[str, Any]:
    if image.data is None:
        return {"type": "image_url", "image_url": {"url": image.url}}
    # Every reader knows its image's type; image/png stands in for one that did not say.
    url = f"data:{image.media_type or 'image/png'};base64,{image.data}"
    return {"type": "image_url", "image_url": {"url": url}}


def _content(parts: list[Text | Image]) -> str | list[dict[str, Any]]:
    """A string for one text (what every OpenAI-compatible server takes), else parts."""
    if len(parts) == 1 and isinstance(parts[0], Text):
        return parts[0].text
    return [
        {"type": "text", "text": part.text} if isinstance(part, Text) else _image_url(part)
        for part in parts
    ]


def _tool_message(result: ToolResult, request: ChatRequest) -> dict[str, Any]:
    if result.is_error:
        request.drop("is_error")  # OpenAI has no error flag: the text says it
    texts: list[Text | Image] = [part for part in result.content if isinstance(part, Text)]
    content = _content(texts) if texts else ""
    return {"role": "tool", "tool_call_id": result.call_id, "content": content}


def _user_messages(turn: Turn, request: ChatRequest) -> list[dict[str, Any]]:
    """Tool results first, as ``tool`` messages (OpenAI wants them right after the calls),
    then the turn's own text and images, with any image a tool returned (a tool message
    carries text only)."""
    tool_messages: list[dict[str, Any]] = []
    content: list[Text | Image] = []
    for part in turn.parts:
        if isinstance(part, ToolResult):
            tool_messages.append(_tool_message(part, request))
            content.extend(p for p in part.content if isinstance(p, Image))
        elif isinstance(part, Text | Image):
            content.append(part)
        elif isinstance(part, Reasoning):
            request.drop("reasoning")
    if content:
        tool_messages.append({"role": "user", "content": _content(content)})
    return tool_messages


def _tool_call_json(call: ToolCall) -> dict[str, Any]:
    """A call as OpenAI writes it: its arguments a JSON string."""
    arguments = encode_json(call.arguments).decode()
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def _assistant_message(turn: Turn, request: ChatRequest) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in turn.parts:
        if isinstance(part, Text):
            texts.append(part.text)
        elif isinstance(part, ToolCall):
            calls.append(_tool_call_json(part))
        elif isinstance(part, Reasoning):
            request.drop("reasoning")  # never sent to another vendor
        elif isinstance(part, Image):
            raise refusal(part.param, "an OpenAI assistant message cannot carry an image")
    # Text parts are pieces of one reply (Gemini splits a streamed reply into many).
    text = "".join(texts)
    if not text and not calls:
        return []  # it held only reasoning
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return [message]


def _upstream_messages(request: ChatRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": "\n\n".join(request.system)})
    for turn in request.turns:
        if turn.role == "user":
            messages.extend(_user_messages(turn, request))
        else:
            messages.extend(_assistant_message(turn, request))
    return messages


def _upstream_tools(request: ChatRequest, body: dict[str, Any]) -> None:
    if not request.tools:
        # OpenAI refuses a tool_choice or parallel_tool_calls that has no tools to go with.
        if request.tool_choice not in (None, "none"):
            request.drop("tool_choice")
        if request.parallel_tool_calls is not None:
            request.drop("parallel_tool_calls")
        return
    body["tools"] = [_function_tool(tool) for tool in request.tools]
    choice = request.tool_choice
    if isinstance(choice, NamedTool):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    if request.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = request.parallel_tool_calls


def _function_tool(tool: ToolSpec) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters or _NO_PARAMETERS
    return {"type": "function", "function": function}


def _upstream_response_format(given: ResponseFormat) -> dict[str, Any]:
    if given.kind == "json_object":
        return {"type": "json_object"}
    # OpenAI requires a name; a Gemini caller's schema has none.
    spec: dict[str, Any] = {"name": given.name or "response"}
    if given.schema is not None:
        spec["schema"] = given.schema
    if given.strict is not None:
        spec["strict"] = given.strict
    return {"type": "json_schema", "json_schema": spec}


def _upstream_settings(request: ChatRequest, body: dict[str, Any]) -> None:
    if request.max_tokens is not None:
        body["max_completion_tokens"] = request.max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.stop:
        body["stop"] = request.stop
    if request.top_k is not None:
        request.drop("top_k")
    if request.response_format is not None:
        body["response_format"] = _upstream_response_format(request.response_format)
    if request.reasoning_budget is not None:
        effort = effort_for_budget(request.reasoning_budget)
        if effort is None:
            # Thinking off: OpenAI has no effort every model takes for it ("none" is
            # gpt-5.1's; non-reasoning models refuse the field), so none is sent.
            request.drop("reasoning_budget")
        else:
            body["reasoning_effort"] = effort
    if request.show_reasoning:
        request.drop("show_reasoning")  # OpenAI shows no reasoning text


# --- the upstream's answer ---------------------------------------------------------------


class _AnswerFunction(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _AnswerToolCall(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    function: _AnswerFunction | None = None


class _AnswerMessage(msgspec.Struct):
    """A completion's ``message`` or a chunk's ``delta``."""

    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None  # DeepSeek, Qwen, older vLLM
    reasoning: Any = None  # OpenRouter, Groq, newer vLLM: text (other servers: objects)
    tool_calls: list[_AnswerToolCall] | None = None

    def reasoning_text(self) -> str | None:
        if self.reasoning_content:
            return self.reasoning_content
        return self.reasoning if isinstance(self.reasoning, str) and self.reasoning else None


class _AnswerChoice(msgspec.Struct):
    index: int = 0
    message: _AnswerMessage | None = None
    delta: _AnswerMessage | None = None
    finish_reason: str | None = None


class _Answer(msgspec.Struct):
    id: str = ""
    model: str = ""
    choices: list[_AnswerChoice] = []
    usage: ChatUsage | None = None
    error: Any = None  # a mid-stream error chunk


_ANSWER = msgspec.json.Decoder(_Answer)

_STOP_REASONS: Final[dict[str, StopReason]] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def _stop_reason(finish_reason: str | None, called_tools: bool, refused: bool) -> StopReason:
    if refused:
        return "content_filter"
    stop = _STOP_REASONS.get(finish_reason or "", "stop")
    # Some OpenAI-compatible servers end a turn of tool calls with "stop"; callers (Claude
    # Code, agents) run tools only on a tool_calls stop.
    return "tool_calls" if stop == "stop" and called_tools else stop


def _usage(usage: ChatUsage | None) -> Usage | None:
    if usage is None or (usage.prompt_tokens is None and usage.completion_tokens is None):
        return None  # no usage, or one with no count in it
    return chat_usage(usage)


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _answer_tool_call(call: _AnswerToolCall) -> ToolCall:
    function = call.function or _AnswerFunction()
    try:
        arguments = decode_any_json(function.arguments or "{}")
    except msgspec.DecodeError:
        arguments = None
    # Arguments cut short (a length stop) are no object: the call stays, with none.
    return ToolCall(
        call.id or _new_call_id(),
        function.name or "",
        arguments if isinstance(arguments, dict) else {},
    )


def _read_answer(body: bytes) -> ChatAnswer:
    answer = _ANSWER.decode(body)
    choice = answer.choices[0] if answer.choices else _AnswerChoice()
    message = choice.message or _AnswerMessage()
    parts: list[Text | ToolCall | Reasoning] = []
    if reasoning := message.reasoning_text():
        parts.append(Reasoning(reasoning))
    for text in (message.content, message.refusal):
        if text:
            parts.append(Text(text))
    calls = [_answer_tool_call(call) for call in message.tool_calls or ()]
    parts.extend(calls)
    stop = _stop_reason(choice.finish_reason, bool(calls), bool(message.refusal))
    return ChatAnswer(answer.id, answer.model, parts, stop, _usage(answer.usage))


class _ChunkReader(StreamReader):
    """Reads ``chat.completion.chunk`` events: a tool call's first delta names it, later
    ones (same ``index``) carry argument fragments; usage comes in a ``choices: []`` chunk."""

    def __init__(self) -> None:
        self._started = False
        self._calls: dict[int | str, int] = {}  # the upstream's index (or id) → the IR's
        self._refused = False

    def feed(self, name: str | None, data: bytes) -> list[StreamEvent]:
        if data.startswith(b"[DONE]"):
            return []
        chunk = _ANSWER.decode(data)
        if chunk.error is not None:
            # A stream that failed midway: raised, so the relay's tap writes the caller's own
            # error event and ends the stream (relaying.TranslatingTap).
            error = chunk.error
            message = error.get("message") if isinstance(error, dict) else error
            raise GatewayError(
                502, "upstream_error", f"The upstream's stream failed: {message or 'no message'}"
            )
        events: list[StreamEvent] = []
        # Azure OpenAI opens with a chunk of prompt filter results only (no id, no
        # choices): the answer starts with the first chunk that is part of it.
        if not self._started and (chunk.id or chunk.choices):
            self._started = True
            events.append(Started(chunk.id, chunk.model))
        for choice in chunk.choices:
            if choice.index == 0:  # n > 1 is refused: there is no other
                self._read_choice(choice, events)
        if (usage := _usage(chunk.usage)) is not None:
            events.append(UsageReport(usage))
        return events

    def _read_choice(self, choice: _AnswerChoice, events: list[StreamEvent]) -> None:
        delta = choice.delta or _AnswerMessage()
        if reasoning := delta.reasoning_text():
            events.append(ReasoningDelta(reasoning))
        if delta.content:
            events.append(TextDelta(delta.content))
        if delta.refusal:
            self._refused = True
            events.append(TextDelta(delta.refusal))
        for call in delta.tool_calls or ():
            self._read_tool_call(call, events)
        if choice.finish_reason is not None:
            stop = _stop_reason(choice.finish_reason, bool(self._calls), self._refused)
            events.append(Finished(stop))

    def _read_tool_call(self, call: _AnswerToolCall, events: list[StreamEvent]) -> None:
        # OpenAI keys fragments by index; a server that sends none keys them by id, and a
        # fragment with neither continues the latest call.
        key = call.index if call.index is not None else call.id
        function = call.function or _AnswerFunction()
        if key is None:
            if not self._calls:
                return
            index = len(self._calls) - 1
        elif key in self._calls:
            index = self._calls[key]
        else:
            index = self._calls[key] = len(self._calls)
            events.append(ToolCallStarted(index, call.id or _new_call_id(), function.name or ""))
        if function.arguments:
            events.append(ToolArgumentsDelta(index, function.arguments))


# --- the caller's answer -----------------------------------------------------------------


def _usage_json(usage: Usage) -> dict[str, Any]:
    details = {"cached_tokens": usage.cache_read_tokens}
    if usage.cache_write_tokens:
        details["cache_write_tokens"] = usage.cache_write_tokens
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": details,
    }


def _tool_call_delta(event: StreamEvent) -> bytes | None:
    """The chunk delta for a tool-call event, as JSON (None: nothing to write)."""
    if isinstance(event, ToolCallStarted):
        function = {"name": event.name, "arguments": ""}
        call = {"index": event.index, "id": event.id, "type": "function", "function": function}
        return encode_json({"tool_calls": [call]})
    if isinstance(event, ToolArgumentsDelta) and event.fragment:
        call = {"index": event.index, "function": {"arguments": event.fragment}}
        return encode_json({"tool_calls": [call]})
    return None  # a ReasoningDelta has no slot in a chunk


def _write_answer(answer: ChatAnswer, request: ChatRequest) -> bytes:
    texts = [part.text for part in answer.parts if isinstance(part, Text)]
    calls = [_tool_call_json(part) for part in answer.parts if isinstance(part, ToolCall)]
    # Reasoning parts have no slot in a chat completion: they are left out.
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    body: dict[str, Any] = {
        "id": answer.id or _new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.model or request.model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.stop}
        ],
    }
    if answer.usage is not None:
        body["usage"] = _usage_json(answer.usage)
    return encode_json(body)


# Each stop reason as JSON, for the finish chunk.
_FINISH_REASONS: Final[dict[StopReason, bytes]] = {
    stop: encode_json(stop) for stop in get_args(StopReason)
}


class _ChunkWriter(StreamWriter):
    """Writes ``chat.completion.chunk`` events: the role first, then each delta as it comes,
    the finish chunk, the usage chunk (asked for with ``include_usage``: the latest report,
    held to the end as OpenAI sends it last), and ``data: [DONE]``.

    Every chunk of one stream has the same id, created and model: their JSON is encoded once,
    and each chunk is that head, its delta's JSON and a fixed tail (the bytes ``encode_json``
    of the whole chunk would give)."""

    def __init__(self, request: ChatRequest) -> None:
        self._include_usage = request.include_usage
        self._model = request.model
        self._created = int(time.time())
        self._started = False
        self._usage: Usage | None = None
        # With include_usage every chunk has the field, null but on the last (OpenAI's way).
        self._tail = b',"usage":null}\n\n' if self._include_usage else b"}\n\n"
        self._head = self._chunk_head("")

    def feed(self, event: StreamEvent) -> bytes:
        if isinstance(event, TextDelta):  # the most frequent event: only its text is encoded
            if not event.text:
                return b""
            return self._opening() + self._chunk(b'{"content":' + encode_json(event.text) + b"}")
        if isinstance(event, Started):
            return b"" if self._started else self._start(event.id, event.model)
        if isinstance(event, UsageReport):
            self._usage = event.usage
            return b""
        if isinstance(event, Finished):
            return self._opening() + self._chunk(b"{}", _FINISH_REASONS[event.stop])
        delta = _tool_call_delta(event)
        return b"" if delta is None else self._opening() + self._chunk(delta)

    def close(self) -> bytes:
        usage = b""
        if self._include_usage and self._usage is not None:
            usage_json = encode_json(_usage_json(self._usage))
            usage = self._head + b'],"usage":' + usage_json + b"}\n\n"
        return usage + b"data: [DONE]\n\n"

    def _opening(self) -> bytes:
        """The role chunk, if no Started came first (a reader always sends one)."""
        return b"" if self._started else self._start("", "")

    def _start(self, answer_id: str, model: str) -> bytes:
        self._started = True
        self._model = model or self._model
        self._head = self._chunk_head(answer_id or _new_completion_id())
        return self._chunk(b'{"role":"assistant","content":""}')

    def _chunk_head(self, answer_id: str) -> bytes:
        """A chunk's bytes up to its choices' first element."""
        return (
            b'data: {"id":'
            + encode_json(answer_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(self._created).encode()
            + b',"model":'
            + encode_json(self._model)
            + b',"choices":['
        )

    def _chunk(self, delta_json: bytes, finish_reason: bytes = b"null") -> bytes:
        return (
            self._head
            + b'{"index":0,"delta":'
            + delta_json
            + b',"logprobs":null,"finish_reason":'
            + finish_reason
            + b"}]"
            + self._tail
        )


# --- the codec ---------------------------------------------------------------------------


class _Error(msgspec.Struct):
    message: Any = None


class _ErrorBody(msgspec.Struct):
    error: _Error | str | None = None
    message: Any = None  # what some OpenAI-compatible servers send instead
    detail: Any = None  # FastAPI-based servers (vLLM)


_ERROR_BODY = msgspec.json.Decoder(_ErrorBody)


class OpenAIChatCodec(Codec):
    name = "openai"

    def read_request(self, body: bytes, route: Route, path_model: str | None) -> ChatRequest:
        doc = decode_any_json(body)
        view = _validated(doc)
        _refuse_unanswerable(view)
        request = ChatRequest(model=require_model(view.model), stream=bool(view.stream))
        _read_settings(view, request)
        _read_tools(view, request)
        _read_messages(view.messages, request)
        _drop_unread_fields(doc, request)
        return request

    def write_answer(self, answer: ChatAnswer, request: ChatRequest) -> bytes:
        return _write_answer(answer, request)

    def answer_writer(self, request: ChatRequest) -> StreamWriter:
        return _ChunkWriter(request)

    def upstream_route(self, request: ChatRequest) -> Route:
        return Route.CHAT

    def write_request(self, request: ChatRequest, model: str, default_max_tokens: int) -> bytes:
        # No default cap: OpenAI needs none, and the adapter sends the held cap where the
        # account needs one (docs/converters.md).
        body: dict[str, Any] = {"model": model, "messages": _upstream_messages(request)}
        _upstream_settings(request, body)
        _upstream_tools(request, body)
        if request.stream:
            body["stream"] = True
            # The gateway settles from the usage chunk, whatever the caller asked for.
            body["stream_options"] = {"include_usage": True}
        return encode_json(body)

    def read_answer(self, body: bytes) -> ChatAnswer:
        return _read_answer(body)

    def answer_reader(self) -> StreamReader:
        return _ChunkReader()

    def error_message(self, body: bytes) -> str:
        try:
            parsed = _ERROR_BODY.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            parsed = _ErrorBody()
        error = parsed.error
        for message in (
            error if isinstance(error, str) else None,
            error.message if isinstance(error, _Error) else None,
            parsed.message,
            parsed.detail,
        ):
            if isinstance(message, str) and message:
                return message
        return body[:500].decode("utf-8", "replace").strip()
