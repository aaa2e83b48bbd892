"""Gemini ``generateContent`` / ``streamGenerateContent`` ↔ the translation IR
(docs/converters.md has the field-by-field table).

Caller side: a request body, in camelCase or the snake_case spellings Google's proto3 JSON
parser also takes, read into a :class:`ChatRequest`; answers written as
GenerateContentResponse bodies, as SSE chunks, or as the one JSON array a stream asked for
without ``?alt=sse`` receives. Upstream side: a ChatRequest written as a Gemini request body,
and Gemini's answers and SSE chunks read back.

Gemini's history names no call ids: calls get ids from their position, and each
functionResponse is paired with the call of its name in the preceding model turn, in order.
Gemini's ``args`` are whole objects, so a streamed call is held until it is complete.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import msgspec

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.base import Route, Usage, require_model
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
    Role,
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

_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode

# Gemini 3 refuses a history whose function calls carry no thought signature (a 400); the
# calls a converter sends were made by another vendor, or their signature was lost on the
# way through another protocol. Google documents this value for exactly that case
# (ai.google.dev/gemini-api/docs/thought-signatures, FAQ); older models ignore it.
_FOREIGN_CALL_SIGNATURE = "skip_thought_signature_validator"

_CONTENT_FILTER_REASONS = frozenset(
    {"SAFETY", "RECITATION", "PROHIBITED_CONTENT", "SPII", "BLOCKLIST", "IMAGE_SAFETY"}
)
_FINISH_REASON: dict[StopReason, str] = {
    "stop": "STOP",
    "tool_calls": "STOP",  # Gemini says STOP and lets the functionCall parts speak
    "length": "MAX_TOKENS",
    "content_filter": "SAFETY",
}
_FUNCTION_TOOLS = frozenset({"functionDeclarations", "function_declarations"})
_TOOL_CHOICE_MODE: dict[str, Literal["auto", "none", "required"]] = {
    "AUTO": "auto",
    "VALIDATED": "auto",
    "NONE": "none",
    "ANY": "required",
}


# --- the caller's request --------------------------------------------------------------


def _invalid(param: str, expected: str) -> GatewayError:
    return GatewayError(
        400, "invalid_request", f"Invalid value for '{param}': expected {expected}", param=param
    )


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


class _Object:
    """One JSON object of the caller's request, read field by field in either spelling.
    ``path`` names it with indexes (for a 400), ``generic`` without (for the dropped-params
    list, which names a field once however many turns carry it)."""

    __slots__ = ("_doc", "_read", "generic", "path")

    def __init__(self, value: object, path: str, generic: str) -> None:
        if not isinstance(value, dict):
            raise _invalid(path, "a JSON object")
        self._doc: dict[str, Any] = value
        self._read: set[str] = set()
        self.path = path
        self.generic = generic

    def field(self, camel: str) -> tuple[str, Any]:
        """The field's name as the caller spelt it, and its value (None when absent)."""
        found: tuple[str, Any] = (camel, None)
        for key in (camel, _snake(camel)):
            if key in self._doc:
                self._read.add(key)
                if found[1] is None:
                    found = (key, self._doc[key])
        return found

    def child(self, key: str, value: object, index: int | None = None) -> _Object:
        suffix = "" if index is None else f"[{index}]"
        return _Object(
            value, self.at(key) + suffix, self.generic_at(key) + ("" if index is None else "[]")
        )

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def generic_at(self, key: str) -> str:
        return f"{self.generic}.{key}" if self.generic else key

    def drop_unread(self, request: ChatRequest) -> None:
        """Name every field nothing read (unknown, or only tuning) as not sent on."""
        for key in self._doc:
            if key not in self._read:
                request.drop(self.generic_at(key))


def _list(value: object, param: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid(param, "an array")
    return value


def _str(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise _invalid(param, "a string")
    return value


def _int(value: object, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(param, "an integer")
    return value


def _number(value: object, param: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(param, "a number")
    return float(value)


def _flag(value: object, param: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(param, "a boolean")
    return value


def _dict(value: object, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(param, "a JSON object")
    return value


# Schema fields whose proto snake_case spelling differs from JSON Schema's camelCase keyword.
_SCHEMA_KEYWORDS = {
    _snake(name): name
    for name in (
        "anyOf", "maxItems", "minItems", "maxLength", "minLength", "maxProperties",
        "minProperties", "propertyOrdering",
    )
}  # fmt: skip


def _json_schema(schema: object) -> Any:
    """Gemini's OpenAPI-subset Schema as JSON Schema: lower-case type names, ``nullable``
    as a ``"null"`` type, Gemini's own ``propertyOrdering`` left out."""
    if isinstance(schema, list):
        return [_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted: dict[str, Any] = {}
    for raw_key, value in schema.items():
        key = _SCHEMA_KEYWORDS.get(str(raw_key), str(raw_key))
        if key in ("propertyOrdering", "nullable"):
            continue
        if key == "type" and isinstance(value, str):
            if value.upper() != "TYPE_UNSPECIFIED":
                converted["type"] = value.lower()
        elif key == "properties" and isinstance(value, dict):
            converted[key] = {name: _json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "anyOf"):
            converted[key] = _json_schema(value)
        else:
            converted[key] = value
    if schema.get("nullable") is True and isinstance(converted.get("type"), str):
        converted["type"] = [converted["type"], "null"]
    return converted


class _CallPairing:
    """Gives history calls their ids and pairs each functionResponse with a call of the
    preceding model turn: by id when the caller sent ours back, else by name, in order."""

    def __init__(self) -> None:
        self._open: list[ToolCall] = []  # the preceding model turn's calls not yet answered

    def new_model_turn(self) -> None:
        self._open = []

    def called(self, call: ToolCall) -> None:
        self._open.append(call)

    def answer(self, call_id: str | None, name: str, param: str) -> str:
        by_id = [i for i, call in enumerate(self._open) if call_id and call.id == call_id]
        by_name = [i for i, call in enumerate(self._open) if call.name == name]
        for i in by_id or by_name:
            return self._open.pop(i).id
        raise refusal(param, f"no functionCall named {name!r} in the preceding model turn")


class _RequestReader:
    """Reads one caller request into ``self.request``."""

    def __init__(self, root: _Object, request: ChatRequest) -> None:
        self.root = root
        self.request = request
        self.pairing = _CallPairing()

    def read(self) -> ChatRequest:
        root, request = self.root, self.request
        self._system()
        self._contents()
        self._tools()
        self._tool_config()
        self._generation_config()
        key, value = root.field("cachedContent")
        if value is not None:
            raise refusal(key, "it names content stored on Google's side")
        root.drop_unread(request)  # safetySettings, labels, and what else only tunes Gemini
        return request

    # -- system and contents

    def _system(self) -> None:
        key, value = self.root.field("systemInstruction")
        if value is None:
            return
        self.request.params["system"] = key
        if isinstance(value, str):  # the SDKs' shorthand, harmless to take
            self.request.system.append(value)
            return
        content = self.root.child(key, value)
        content.field("role")  # whatever role it names, it is the system prompt
        parts_key, parts = content.field("parts")
        for j, raw in enumerate(_list(parts, content.at(parts_key))):
            part = content.child(parts_key, raw, j)
            text_key, text = part.field("text")
            if text is None:
                raise refusal(part.path, "a system instruction translates only as text")
            self.request.system.append(_str(text, part.at(text_key)))
            part.drop_unread(self.request)
        content.drop_unread(self.request)

    def _contents(self) -> None:
        key, value = self.root.field("contents")
        contents = _list(value, key)
        if not contents:
            raise GatewayError(400, "invalid_request", f"'{key}' must not be empty", param=key)
        previous_role: Role | None = None
        for i, raw in enumerate(contents):
            content = self.root.child(key, raw, i)
            role_key, role = content.field("role")
            if role == "model":
                ir_role: Role = "assistant"
                if previous_role != "assistant":  # consecutive model contents: one turn
                    self.pairing.new_model_turn()
            elif role in (None, "user", "function"):  # "function": the older tool-result role
                ir_role = "user"
            else:
                raise _invalid(content.at(role_key), "'user' or 'model'")
            parts_key, parts_value = content.field("parts")
            parts: list[Part] = []
            for j, raw_part in enumerate(_list(parts_value, content.at(parts_key))):
                part = content.child(parts_key, raw_part, j)
                read = self._part(part, i, j)
                if read is not None:
                    parts.append(read)
                part.drop_unread(self.request)
            content.drop_unread(self.request)
            self.request.turns.append(Turn(ir_role, parts))
            previous_role = ir_role

    def _part(self, part: _Object, turn: int, index: int) -> Part | None:
        request = self.request
        text_key, text = part.field("text")
        thought_key, thought = part.field("thought")
        signature_key, signature = part.field("thoughtSignature")
        if text is not None and _flag(thought, part.at(thought_key)):
            request.params.setdefault("reasoning", part.generic_at(thought_key))
            return Reasoning(_str(text, part.at(text_key)), signature)
        if signature is not None:
            # A seal only Gemini takes back, and a converter's target is never Gemini.
            request.drop(part.generic_at(signature_key))
        if text is not None:
            return Text(_str(text, part.at(text_key))) if text else None
        key, value = part.field("inlineData")
        if value is not None:
            return _image(part.child(key, value), request)
        key, value = part.field("functionCall")
        if value is not None:
            return self._call(part.child(key, value), turn, index)
        key, value = part.field("functionResponse")
        if value is not None:
            return self._result(part.child(key, value))
        for name, why in (
            ("fileData", "a file URI is readable only by Gemini (send the bytes as inlineData)"),
            ("executableCode", "it is the output of Gemini's own code execution tool"),
            ("codeExecutionResult", "it is the output of Gemini's own code execution tool"),
        ):
            key, value = part.field(name)
            if value is not None:
                raise refusal(part.at(key), why)
        return None

    def _call(self, call: _Object, turn: int, index: int) -> ToolCall:
        id_key, call_id = call.field("id")
        name_key, name = call.field("name")
        args_key, args = call.field("args")
        tool_call = ToolCall(
            id=_str(call_id, call.at(id_key)) if call_id else f"call_{turn}_{index}",
            name=_str(name, call.at(name_key)),
            arguments=_dict(args, call.at(args_key)) if args is not None else {},
        )
        self.pairing.called(tool_call)
        call.drop_unread(self.request)
        return tool_call

    def _result(self, answered: _Object) -> ToolResult:
        id_key, call_id = answered.field("id")
        name_key, name = answered.field("name")
        name = _str(name, answered.at(name_key))
        value_key, value = answered.field("response")
        output = _dict(value, answered.at(value_key)) if value is not None else {}
        # The API's convention: "output" holds a result, "error" a failure.
        is_error = set(output) == {"error"}
        if set(output) in ({"output"}, {"error"}):
            (result,) = output.values()
        else:
            result = output
        text = result if isinstance(result, str) else _encode(result).decode()
        content: list[Text | Image] = [Text(text)]
        parts_key, parts = answered.field("parts")  # media a function returned
        for j, raw in enumerate(_list(parts, answered.at(parts_key))):
            part = answered.child(parts_key, raw, j)
            key, media = part.field("inlineData")
            if media is None:
                raise refusal(part.path, "only inline images translate in a function response")
            content.append(_image(part.child(key, media), self.request))
            part.drop_unread(self.request)
        call_id = self.pairing.answer(
            _str(call_id, answered.at(id_key)) if call_id else None, name, answered.path
        )
        answered.drop_unread(self.request)
        return ToolResult(call_id, name, content, is_error)

    # -- tools

    def _tools(self) -> None:
        key, value = self.root.field("tools")
        for i, raw in enumerate(_list(value, key)):
            tool = self.root.child(key, raw, i)
            decls_key, decls = tool.field("functionDeclarations")
            for j, raw_decl in enumerate(_list(decls, tool.at(decls_key))):
                self.request.tools.append(self._declaration(tool.child(decls_key, raw_decl, j)))
            for other, given in _dict(raw, tool.path).items():
                if other not in _FUNCTION_TOOLS and given is not None:
                    raise refusal(tool.at(other), "Google's own tools run only on Gemini")
        if self.request.tools:
            self.request.params["tools"] = key

    def _declaration(self, decl: _Object) -> ToolSpec:
        name_key, name = decl.field("name")
        description_key, description = decl.field("description")
        json_key, json_schema = decl.field("parametersJsonSchema")
        schema_key, schema = decl.field("parameters")
        if json_schema is not None:
            parameters = _dict(json_schema, decl.at(json_key))
        elif schema is not None:
            parameters = _json_schema(_dict(schema, decl.at(schema_key)))
        else:
            parameters = {"type": "object", "properties": {}}
        decl.drop_unread(self.request)  # response schemas, behavior
        return ToolSpec(
            name=_str(name, decl.at(name_key)),
            description=_str(description, decl.at(description_key)) if description else None,
            parameters=parameters,
        )

    def _tool_config(self) -> None:
        key, value = self.root.field("toolConfig")
        if value is None:
            return
        config = self.root.child(key, value)
        calling_key, calling_value = config.field("functionCallingConfig")
        config.drop_unread(self.request)  # retrievalConfig: for Google's own tools
        if calling_value is None:
            return
        calling = config.child(calling_key, calling_value)
        self.request.params["tool_choice"] = calling.path
        mode_key, mode = calling.field("mode")
        names_key, names = calling.field("allowedFunctionNames")
        allowed = [_str(n, calling.at(names_key)) for n in _list(names, calling.at(names_key))]
        calling.drop_unread(self.request)
        choice = _TOOL_CHOICE_MODE.get(_str(mode, calling.at(mode_key)).upper()) if mode else None
        if choice == "required" and len(allowed) == 1:
            self.request.tool_choice = NamedTool(allowed[0])
            return
        self.request.tool_choice = choice
        if allowed and choice != "none":
            # The model may call only these: the same as offering only these.
            self.request.tools = [tool for tool in self.request.tools if tool.name in allowed]

    # -- generation settings

    def _generation_config(self) -> None:
        key, value = self.root.field("generationConfig")
        if value is None:
            return
        config = self.root.child(key, value)
        request = self.request

        def setting(camel: str, ir_name: str) -> tuple[str, Any]:
            name, found = config.field(camel)
            if found is not None:
                request.params[ir_name] = config.at(name)
            return config.at(name), found

        param, found = setting("maxOutputTokens", "max_tokens")
        request.max_tokens = _int(found, param) or None  # proto3: 0 is "unset"
        param, found = setting("temperature", "temperature")
        request.temperature = _number(found, param)
        param, found = setting("topP", "top_p")
        request.top_p = _number(found, param)
        param, found = setting("topK", "top_k")
        request.top_k = _int(found, param)
        param, found = setting("presencePenalty", "presence_penalty")
        request.presence_penalty = _number(found, param)
        param, found = setting("frequencyPenalty", "frequency_penalty")
        request.frequency_penalty = _number(found, param)
        param, found = setting("seed", "seed")
        request.seed = _int(found, param)
        param, found = setting("stopSequences", "stop")
        request.stop = [_str(s, param) for s in _list(found, param)]
        self._refusals(config)
        self._response_format(config)
        self._thinking(config)
        config.drop_unread(request)  # speechConfig, mediaResolution, …

    def _refusals(self, config: _Object) -> None:
        key, count = config.field("candidateCount")
        if (_int(count, config.at(key)) or 1) > 1:
            raise refusal(config.at(key), "only one candidate can be translated")
        key, logprobs = config.field("responseLogprobs")
        if _flag(logprobs, config.at(key)):
            raise refusal(config.at(key), "log probabilities cannot be translated")
        key, logprobs = config.field("logprobs")
        if logprobs is not None:
            raise refusal(config.at(key), "log probabilities cannot be translated")
        key, modalities = config.field("responseModalities")
        for modality in _list(modalities, config.at(key)):
            if str(modality).upper() != "TEXT":
                raise refusal(config.at(key), f"{modality} output cannot be translated")

    def _response_format(self, config: _Object) -> None:
        mime_key, mime = config.field("responseMimeType")
        json_key, json_schema = config.field("responseJsonSchema")
        schema_key, schema = config.field("responseSchema")
        if mime in (None, "text/plain"):
            if json_schema is None and schema is None:
                return
        elif mime != "application/json":
            raise refusal(config.at(mime_key), f"{mime!r} output cannot be translated")
        if json_schema is not None:
            parsed, param = _dict(json_schema, config.at(json_key)), config.at(json_key)
        elif schema is not None:
            parsed, param = (
                _json_schema(_dict(schema, config.at(schema_key))),
                config.at(schema_key),
            )
        else:
            self.request.response_format = ResponseFormat("json_object")
            self.request.params["response_format"] = config.at(mime_key)
            return
        self.request.response_format = ResponseFormat("json_schema", schema=parsed)
        self.request.params["response_format"] = param

    def _thinking(self, config: _Object) -> None:
        key, value = config.field("thinkingConfig")
        if value is None:
            return
        thinking = config.child(key, value)
        budget_key, budget = thinking.field("thinkingBudget")
        level_key, level = thinking.field("thinkingLevel")
        show_key, show = thinking.field("includeThoughts")
        thinking.drop_unread(self.request)
        self.request.show_reasoning = _flag(show, thinking.at(show_key))
        self.request.params["show_reasoning"] = thinking.at(show_key)
        tokens = _int(budget, thinking.at(budget_key))
        if tokens is not None and tokens >= 0:
            self.request.reasoning_budget = tokens
            self.request.params["reasoning_budget"] = thinking.at(budget_key)
        elif tokens is not None:  # -1: "the model decides", i.e. the target's default
            self.request.drop(thinking.generic_at(budget_key))
        elif level is not None:
            effort = _str(level, thinking.at(level_key)).lower()
            if effort not in EFFORT_BUDGETS:
                raise _invalid(thinking.at(level_key), "'minimal', 'low', 'medium' or 'high'")
            self.request.reasoning_budget = EFFORT_BUDGETS[effort]
            self.request.params["reasoning_budget"] = thinking.at(level_key)


def _image(media: _Object, request: ChatRequest) -> Image:
    mime_key, mime = media.field("mimeType")
    data_key, data = media.field("data")
    mime = _str(mime, media.at(mime_key))
    if not mime.startswith("image/"):
        raise refusal(media.path, f"only images translate, not {mime!r}")
    media.drop_unread(request)  # displayName
    return Image(media_type=mime, data=_str(data, media.at(data_key)), param=media.path)


# --- the upstream request --------------------------------------------------------------


def _image_part(image: Image) -> dict[str, Any]:
    media_type, data = image.media_type, image.data
    if data is None and image.url and image.url.startswith("data:"):
        header, _, data = image.url[5:].partition(",")
        media_type = media_type or header.split(";", 1)[0] or None
    if data is None:
        # fileData takes only Files API / Cloud Storage URIs; fetching the URL ourselves is
        # a server-side request on the caller's behalf (SSRF, unbounded size): refuse.
        raise refusal(image.param or "image", "Gemini cannot read an image from a URL")
    if not media_type:
        raise refusal(image.param or "image", "Gemini needs the image's media type")
    return {"inlineData": {"mimeType": media_type, "data": data}}


def _result_parts(result: ToolResult, name: str) -> list[dict[str, Any]]:
    text = "".join(part.text for part in result.content if isinstance(part, Text))
    response = {"error" if result.is_error else "output": text}
    parts: list[dict[str, Any]] = [{"functionResponse": {"name": name, "response": response}}]
    # Images a tool returned follow its response in the same user turn (every model reads
    # inline parts there; functionResponse.parts only Gemini 3).
    parts.extend(_image_part(part) for part in result.content if isinstance(part, Image))
    return parts


def _contents(request: ChatRequest) -> list[dict[str, Any]]:
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # call id → function name, for results that name none
    for turn in request.turns:
        parts: list[dict[str, Any]] = []
        for part in turn.parts:
            if isinstance(part, Text):
                if part.text:  # Gemini refuses an empty text part
                    parts.append({"text": part.text})
            elif isinstance(part, Image):
                parts.append(_image_part(part))
            elif isinstance(part, ToolCall):
                call_names[part.id] = part.name
                parts.append({"functionCall": {"name": part.name, "args": part.arguments}})
            elif isinstance(part, ToolResult):
                name = part.name or call_names.get(part.call_id)
                if name is None:
                    raise request.refuse("tool_result", f"no call {part.call_id!r} in the history")
                parts.extend(_result_parts(part, name))
            else:  # another vendor's reasoning: never sent on (ir.Reasoning)
                request.drop("reasoning")
        role = "model" if turn.role == "assistant" else "user"
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:  # Gemini wants turns to alternate
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    for content in contents:
        if content["role"] == "model":
            first_call = next((p for p in content["parts"] if "functionCall" in p), None)
            if first_call is not None:
                first_call["thoughtSignature"] = _FOREIGN_CALL_SIGNATURE
    return contents


def _tool_config(request: ChatRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    if choice is None:
        return None
    if not request.tools:
        request.drop("tool_choice")  # nothing to choose among
        return None
    if isinstance(choice, NamedTool):
        calling: dict[str, Any] = {"mode": "ANY", "allowedFunctionNames": [choice.name]}
    else:
        calling = {"mode": {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice]}
    return {"functionCallingConfig": calling}


def _declaration(tool: ToolSpec) -> dict[str, Any]:
    declaration: dict[str, Any] = {"name": tool.name}
    if tool.description:
        declaration["description"] = tool.description
    # JSON Schema as it is: `parameters` takes only an OpenAPI subset and would need
    # keywords (additionalProperties, $ref, …) removed.
    declaration["parametersJsonSchema"] = tool.parameters
    return declaration


def _generation_config(request: ChatRequest) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name, value in (
        ("maxOutputTokens", request.max_tokens),
        ("temperature", request.temperature),
        ("topP", request.top_p),
        ("topK", request.top_k),
        ("stopSequences", request.stop or None),
        ("presencePenalty", request.presence_penalty),
        ("frequencyPenalty", request.frequency_penalty),
        ("seed", request.seed),
    ):
        if value is not None:
            config[name] = value
    response_format = request.response_format
    if response_format is not None:
        config["responseMimeType"] = "application/json"
        if response_format.kind == "json_schema" and response_format.schema is not None:
            config["responseJsonSchema"] = response_format.schema
    thinking: dict[str, Any] = {}
    if request.reasoning_budget is not None:
        thinking["thinkingBudget"] = request.reasoning_budget
    if request.show_reasoning:
        thinking["includeThoughts"] = True
    if thinking:
        config["thinkingConfig"] = thinking
    return config


# --- the upstream answer ---------------------------------------------------------------


class _FunctionCall(msgspec.Struct):
    name: str = ""
    args: dict[str, Any] | None = None
    id: str | None = None


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool = False
    thought_signature: str | None = None
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] | None = None


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int = 0
    tool_use_prompt_token_count: int = 0
    cached_content_token_count: int = 0


class _Response(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] | None = None
    prompt_feedback: _PromptFeedback | None = None
    usage_metadata: _UsageMetadata | None = None
    model_version: str | None = None
    response_id: str | None = None
    error: dict[str, Any] | None = None  # a stream that failed midway ends with one


class _Error(msgspec.Struct):
    message: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _Error | None = None


_RESPONSE = msgspec.json.Decoder(_Response)
_ERROR = msgspec.json.Decoder(_ErrorBody | list[_ErrorBody])


def _usage(meta: _UsageMetadata) -> Usage:
    # promptTokenCount already holds the cached tokens; tool-use prompt tokens are input and
    # thinking tokens output (the same reading as protocols.gemini).
    return Usage(
        meta.prompt_token_count + meta.tool_use_prompt_token_count,
        meta.candidates_token_count + meta.thoughts_token_count,
        cache_read_tokens=meta.cached_content_token_count,
    )


def _stop(finish_reason: str, called: bool) -> StopReason:
    if finish_reason in _CONTENT_FILTER_REASONS:
        return "content_filter"
    if finish_reason == "MAX_TOKENS":
        return "length"
    return "tool_calls" if called else "stop"


def _first_candidate(response: _Response) -> _Candidate | None:
    return response.candidates[0] if response.candidates else None


def _blocked(response: _Response) -> bool:
    """A prompt-level block: no candidates, a blockReason (HTTP 200, input still billed)."""
    feedback = response.prompt_feedback
    return not response.candidates and feedback is not None and bool(feedback.block_reason)


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _answer_parts(parts: list[_Part]) -> list[Text | ToolCall | Reasoning]:
    read: list[Text | ToolCall | Reasoning] = []
    for part in parts:
        if part.function_call is not None:
            call = part.function_call
            read.append(ToolCall(call.id or _new_id("call_"), call.name, call.args or {}))
        elif part.text and part.thought:
            read.append(Reasoning(part.text, part.thought_signature))
        elif part.text:
            read.append(Text(part.text))
    return read


class GeminiStreamReader(StreamReader):
    """``?alt=sse``: every event a whole GenerateContentResponse; the last one carries the
    finishReason and the cumulative usageMetadata."""

    def __init__(self) -> None:
        self._started = False
        self._calls = 0
        self._finished = False
        self._usage: Usage | None = None

    def feed(self, name: str | None, data: bytes) -> list[StreamEvent]:
        try:
            response = _RESPONSE.decode(data)
        except msgspec.DecodeError:
            return []
        if response.error is not None:
            # A stream that failed midway: raised, so the relay's tap writes the caller's own
            # error event and ends the stream (relaying.TranslatingTap).
            error = response.error
            code = error.get("code")
            status = code if isinstance(code, int) and 400 <= code <= 599 else 502
            message = error.get("message") or "no message"
            raise GatewayError(
                status,
                "upstream_error",
                f"The upstream's stream failed: {message}",
            )
        events: list[StreamEvent] = []
        if response.usage_metadata is not None:
            self._usage = _usage(response.usage_metadata)
        if not self._started:
            self._started = True
            events.append(
                Started(
                    response.response_id or _new_id("gemini-"),
                    response.model_version or "",
                    self._usage,
                )
            )
        candidate = _first_candidate(response)
        if candidate is not None and candidate.content is not None:
            for part in candidate.content.parts or ():
                events.extend(self._part_events(part))
        stop: StopReason | None = None
        if candidate is not None and candidate.finish_reason:
            stop = _stop(candidate.finish_reason, self._calls > 0)
        elif _blocked(response):
            stop = "content_filter"
        if stop is not None and not self._finished:
            self._finished = True
            events.append(Finished(stop))
            if self._usage is not None:
                events.append(UsageReport(self._usage))
        elif self._finished and response.usage_metadata is not None and self._usage is not None:
            events.append(UsageReport(self._usage))
        return events

    def _part_events(self, part: _Part) -> list[StreamEvent]:
        if part.function_call is not None:
            call = part.function_call
            index = self._calls
            self._calls += 1
            arguments = _encode(call.args or {}).decode()
            return [
                ToolCallStarted(index, call.id or _new_id("call_"), call.name),
                ToolArgumentsDelta(index, arguments),
            ]
        if part.text and part.thought:
            return [ReasoningDelta(part.text, part.thought_signature)]
        if part.text:
            return [TextDelta(part.text)]
        return []


# --- the caller's answer ---------------------------------------------------------------


def _usage_metadata(usage: Usage) -> dict[str, int]:
    meta = {
        "promptTokenCount": usage.input_tokens,  # cached tokens included, as Gemini counts
        "candidatesTokenCount": usage.output_tokens,
        "totalTokenCount": usage.input_tokens + usage.output_tokens,
    }
    if usage.cache_read_tokens:
        meta["cachedContentTokenCount"] = usage.cache_read_tokens
    return meta


def _call_part(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"functionCall": {"id": call_id, "name": name, "args": arguments}}


def _thought_part(text: str) -> dict[str, Any]:
    # Another vendor's signature is not a Gemini thought signature: never handed out as one.
    return {"text": text, "thought": True}


def _response_body(
    response_id: str,
    model: str,
    parts: list[dict[str, Any]] | None,
    finish: StopReason | None,
    usage: Usage | None,
) -> dict[str, Any]:
    candidate: dict[str, Any] = {}
    if parts is not None:
        candidate["content"] = {"role": "model", "parts": parts}
    if finish is not None:
        candidate["finishReason"] = _FINISH_REASON[finish]
    candidate["index"] = 0
    body: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        body["usageMetadata"] = _usage_metadata(usage)
    body["modelVersion"] = model
    body["responseId"] = response_id
    return body


class _PendingCall:
    __slots__ = ("fragments", "id", "index", "name")

    def __init__(self, event: ToolCallStarted) -> None:
        self.index = event.index
        self.id = event.id
        self.name = event.name
        self.fragments: list[str] = []

    def part(self) -> dict[str, Any]:
        try:
            arguments = _decode_any("".join(self.fragments) or "{}")
        except msgspec.DecodeError:
            arguments = None  # cut short (a length stop): no whole object to give
        return _call_part(self.id, self.name, arguments if isinstance(arguments, dict) else {})


# A text chunk, the most frequent, is written as fixed bytes around its encoded text, then
# the chunk's rest (usage, model, id), cut once from an encoded chunk with no parts: such a
# chunk's bytes are _EMPTY_CANDIDATE_HEAD followed by that rest.
_TEXT_CHUNK_HEAD = b'{"candidates":[{"content":{"role":"model","parts":[{"text":'
_TEXT_CHUNK_MIDDLE = b'}]},"index":0}]'
_EMPTY_CANDIDATE_HEAD = b'{"candidates":[{"content":{"role":"model","parts":[]},"index":0}]'


class GeminiStreamWriter(StreamWriter):
    """Each event as a GenerateContentResponse chunk (an SSE event, or an element of the
    JSON array). Held only what Gemini's shape forces: a call until its arguments are
    whole, and the finishReason until the usage it travels with (the next UsageReport, or
    close)."""

    def __init__(self, request: ChatRequest) -> None:
        self._show_reasoning = request.show_reasoning
        self._json_array = request.json_array_stream
        self._id = ""
        self._model = ""
        self._usage: Usage | None = None
        self._call: _PendingCall | None = None
        self._stop: StopReason | None = None
        self._chunks = 0
        self._final_sent = False
        # A text chunk's bytes after its text, kept while the id, model and usage stand.
        self._text_tail: bytes | None = None

    def feed(self, event: StreamEvent) -> bytes:
        if isinstance(event, TextDelta) and self._call is None:  # the most frequent event
            return self._text_chunk(event.text) if event.text else b""
        if isinstance(event, Started):
            self._id, self._model = event.id, event.model
            self._usage = event.usage or self._usage
            self._text_tail = None
            return b""
        if isinstance(event, ToolArgumentsDelta):
            if self._call is not None and self._call.index == event.index:
                self._call.fragments.append(event.fragment)
            return b""
        if isinstance(event, UsageReport):
            self._usage = event.usage
            self._text_tail = None
            if self._final_sent:  # a late report: pass the newer totals on
                return self._chunk([{"text": ""}], None)
            return self._final() if self._stop is not None else b""
        held = self._flush_call()
        if isinstance(event, TextDelta):
            return held + (self._text_chunk(event.text) if event.text else b"")
        if isinstance(event, ReasoningDelta):
            if not self._show_reasoning or not event.text:
                return held
            return held + self._chunk([_thought_part(event.text)], None)
        if isinstance(event, ToolCallStarted):
            self._call = _PendingCall(event)
            return held
        self._stop = event.stop  # Finished: waits for its usage
        return held

    def close(self) -> bytes:
        out = self._flush_call()
        if not self._final_sent:
            out += self._final()
        if self._json_array:
            out += b"]" if self._chunks else b"[]"
        return out

    def _flush_call(self) -> bytes:
        if self._call is None:
            return b""
        part, self._call = self._call.part(), None
        return self._chunk([part], None)

    def _final(self) -> bytes:
        self._final_sent = True
        # An empty text part, as Gemini's own last chunk has: the SDK's chat history keeps
        # only chunks whose candidate has content.
        return self._chunk([{"text": ""}], self._stop or "stop")

    def _text_chunk(self, text: str) -> bytes:
        """``_chunk([{"text": text}], None)``, with only the text encoded."""
        if self._text_tail is None:
            body = _encode(_response_body(self._id, self._model, [], None, self._usage))
            assert body.startswith(_EMPTY_CANDIDATE_HEAD), "_response_body's layout changed"
            self._text_tail = body[len(_EMPTY_CANDIDATE_HEAD) :]
        return self._framed(_TEXT_CHUNK_HEAD + _encode(text) + _TEXT_CHUNK_MIDDLE + self._text_tail)

    def _chunk(self, parts: list[dict[str, Any]], finish: StopReason | None) -> bytes:
        return self._framed(
            _encode(_response_body(self._id, self._model, parts, finish, self._usage))
        )

    def _framed(self, data: bytes) -> bytes:
        self._chunks += 1
        if not self._json_array:
            return b"data: " + data + b"\n\n"
        return (b"[" if self._chunks == 1 else b",") + data


# --- the codec -------------------------------------------------------------------------


class GeminiGenerateCodec(Codec):
    name = "gemini"

    def read_request(self, body: bytes, route: Route, path_model: str | None) -> ChatRequest:
        try:
            doc = _decode_any(body)
        except msgspec.DecodeError as exc:
            raise GatewayError(
                400, "invalid_json", f"Request body is not valid JSON: {exc}"
            ) from None
        if not isinstance(doc, dict):
            raise GatewayError(400, "invalid_json", "Request body must be a JSON object")
        request = ChatRequest(
            model=require_model(path_model), stream=route is Route.STREAM_GENERATE
        )
        return _RequestReader(_Object(doc, "", ""), request).read()

    def write_answer(self, answer: ChatAnswer, request: ChatRequest) -> bytes:
        parts: list[dict[str, Any]] = []
        for part in answer.parts:
            if isinstance(part, Text):
                parts.append({"text": part.text})
            elif isinstance(part, ToolCall):
                parts.append(_call_part(part.id, part.name, part.arguments))
            elif request.show_reasoning and part.text:
                parts.append(_thought_part(part.text))
        # A blocked answer has no content, as Gemini sends it.
        content = None if not parts and answer.stop == "content_filter" else parts or [{"text": ""}]
        return _encode(_response_body(answer.id, answer.model, content, answer.stop, answer.usage))

    def answer_writer(self, request: ChatRequest) -> StreamWriter:
        return GeminiStreamWriter(request)

    def upstream_route(self, request: ChatRequest) -> Route:
        return Route.STREAM_GENERATE if request.stream else Route.GENERATE

    def write_request(self, request: ChatRequest, model: str, default_max_tokens: int) -> bytes:
        # The model is in the URL; no cap is injected: Gemini needs none, and the gateway
        # adds the held cap itself when it must (protocols.gemini).
        body: dict[str, Any] = {"contents": _contents(request)}
        if request.system:
            body["systemInstruction"] = {"parts": [{"text": "\n\n".join(request.system)}]}
        if request.tools:
            body["tools"] = [{"functionDeclarations": [_declaration(t) for t in request.tools]}]
        tool_config = _tool_config(request)
        if tool_config is not None:
            body["toolConfig"] = tool_config
        if request.parallel_tool_calls is False:
            request.drop("parallel_tool_calls")  # Gemini has no switch for it
        config = _generation_config(request)
        if config:
            body["generationConfig"] = config
        return _encode(body)

    def read_answer(self, body: bytes) -> ChatAnswer:
        response = _RESPONSE.decode(body)
        candidate = _first_candidate(response)
        parts: list[Text | ToolCall | Reasoning] = []
        stop: StopReason = "content_filter" if _blocked(response) else "stop"
        if candidate is not None:
            if candidate.content is not None:
                parts = _answer_parts(candidate.content.parts or [])
            called = any(isinstance(part, ToolCall) for part in parts)
            stop = _stop(candidate.finish_reason or "STOP", called)
        usage = _usage(response.usage_metadata) if response.usage_metadata else None
        return ChatAnswer(
            id=response.response_id or _new_id("gemini-"),
            model=response.model_version or "",
            parts=parts,
            stop=stop,
            usage=usage,
        )

    def answer_reader(self) -> StreamReader:
        return GeminiStreamReader()

    def error_message(self, body: bytes) -> str:
        try:
            decoded = _ERROR.decode(body)
        except msgspec.DecodeError:
            decoded = None
        # A stream without ?alt=sse fails as a one-element array.
        error_body = decoded[0] if isinstance(decoded, list) and decoded else decoded
        if isinstance(error_body, _ErrorBody) and error_body.error and error_body.error.message:
            return error_body.error.message
        return body[:500].decode("utf-8", "replace")
