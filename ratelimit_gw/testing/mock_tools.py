"""When the mock upstream answers with tool calls instead of text, which tools, how many.

Each protocol's request is read into a :class:`ToolRequest` (the functions it declares, its
tool choice, whether parallel calls are allowed, whether its latest input is a tool result);
:func:`plan_calls` then makes the one decision, the same for all three protocols:

- **Calls or text.** Tool calls when the request declares functions, its tool choice is not
  "none" and its latest input is not a tool result (so a round trip ends in text); else text.
- **Which.** The named tool (OpenAI ``{type: function, function: {name}}``, Anthropic
  ``{type: tool, name}``, Gemini mode ANY with ``allowedFunctionNames``: those, in declared
  order), else the declared functions in order. A name the request does not declare is a 400.
- **How many.** ``wanted`` (the ``x-mock-tool-calls`` header, default 1) cycling through
  those tools, but 1 when the request disables parallel calls (OpenAI
  ``parallel_tool_calls: false``, Anthropic ``tool_choice.disable_parallel_tool_use``).
- **Arguments.** One per property of the tool's schema, in order, from :func:`example_args`.

Only requests that carry tools reach past the first check, so a request without them costs a
dictionary lookup. :mod:`ratelimit_gw.testing.mock_wire` writes the calls out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import cycle, islice
from typing import Any

from .mock_wire import ToolCall


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    schema: Mapping[str, Any]  # OpenAI/Gemini parameters, Anthropic input_schema ({} if none)


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """What a request declares and asks about tools, in no protocol's words."""

    functions: tuple[Function, ...] = ()
    choice_none: bool = False
    named: tuple[str, ...] | None = None  # the tools the choice allows, when it names some
    parallel: bool = True
    after_tool_result: bool = False  # the latest user input is a tool result


NO_TOOLS = ToolRequest()


class UnknownTool(ValueError):
    """The tool choice names a function the request does not declare."""


def plan_calls(request: ToolRequest, wanted: int) -> tuple[ToolCall, ...]:
    """The calls to answer with; none means "answer with text"."""
    if not request.functions or request.choice_none or request.after_tool_result:
        return ()
    pool = request.functions
    if request.named is not None:
        pool = tuple(f for f in pool if f.name in request.named)
        if not pool:
            raise UnknownTool(f"tool choice names undeclared tools: {', '.join(request.named)}")
    n = wanted if request.parallel else 1
    return tuple(ToolCall.of(f.name, example_args(f.schema)) for f in islice(cycle(pool), n))


def example_args(schema: Mapping[str, Any]) -> dict[str, Any]:
    """One value per property: an enum's first value, else by type (JSON Schema's lower-case
    names or Gemini's upper-case ones) string ``"<prop>-value"``, integer 1, number 1.5,
    boolean true, array ``[]``, object ``{}``; anything else null."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    return {name: _example(name, prop) for name, prop in properties.items()}


def _example(name: str, prop: object) -> Any:
    if not isinstance(prop, dict):
        return None
    enum = prop.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = prop.get("type")
    if isinstance(kind, list):  # JSON Schema's ["string", "null"]
        kind = next((k for k in kind if k != "null"), None)
    kind = kind.lower() if isinstance(kind, str) else None
    if kind == "string":
        return f"{name}-value"
    examples: dict[str | None, Any] = {
        "integer": 1,
        "number": 1.5,
        "boolean": True,
        "array": [],
        "object": {},
    }
    return examples.get(kind)


# --- each protocol's request ------------------------------------------------------------------


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _schema(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _get(obj: Mapping[str, Any], camel: str, snake: str) -> Any:
    return obj.get(camel, obj.get(snake))


def openai_request(body: Mapping[str, Any]) -> ToolRequest:
    """Chat Completions: ``tools[]`` of type function, ``tool_choice``, ``parallel_tool_calls``;
    the latest input is a tool result when the last user or tool message is a tool's."""
    tools = _dicts(body.get("tools"))
    if not tools:
        return NO_TOOLS
    functions = tuple(
        Function(fn["name"], _schema(fn.get("parameters")))
        for tool in tools
        if tool.get("type") == "function"
        and isinstance(fn := tool.get("function"), dict)
        and isinstance(fn.get("name"), str)
    )
    choice = body.get("tool_choice")
    named = None
    if isinstance(choice, dict) and isinstance(fn := choice.get("function"), dict):
        named = (fn["name"],) if isinstance(fn.get("name"), str) else None
    inputs = [m for m in _dicts(body.get("messages")) if m.get("role") in ("user", "tool")]
    return ToolRequest(
        functions=functions,
        choice_none=choice == "none",
        named=named,
        parallel=body.get("parallel_tool_calls") is not False,
        after_tool_result=bool(inputs) and inputs[-1].get("role") == "tool",
    )


def anthropic_request(body: Mapping[str, Any]) -> ToolRequest:
    """Messages: ``tools[]`` with an ``input_schema`` (server tools have none), ``tool_choice``
    (none, tool + name, disable_parallel_tool_use); the latest input is a tool result when
    the last user message holds a ``tool_result`` block."""
    tools = _dicts(body.get("tools"))
    if not tools:
        return NO_TOOLS
    functions = tuple(
        Function(tool["name"], tool["input_schema"])
        for tool in tools
        if isinstance(tool.get("name"), str) and isinstance(tool.get("input_schema"), dict)
    )
    choice = _schema(body.get("tool_choice"))
    name = choice.get("name")
    users = [m for m in _dicts(body.get("messages")) if m.get("role") == "user"]
    last = users[-1].get("content") if users else None
    return ToolRequest(
        functions=functions,
        choice_none=choice.get("type") == "none",
        named=(name,) if choice.get("type") == "tool" and isinstance(name, str) else None,
        parallel=choice.get("disable_parallel_tool_use") is not True,
        after_tool_result=any(b.get("type") == "tool_result" for b in _dicts(last)),
    )


_JSON_SCHEMA = ("parametersJsonSchema", "parameters_json_schema")


def gemini_request(body: Mapping[str, Any]) -> ToolRequest:
    """generateContent: ``tools[].functionDeclarations[]`` (``parameters`` or
    ``parametersJsonSchema``), ``toolConfig.functionCallingConfig`` (mode NONE, or ANY with
    ``allowedFunctionNames``), camelCase or snake_case; the latest input is a tool result when
    the last content not the model's has a ``functionResponse`` part."""
    tools = _dicts(body.get("tools"))
    if not tools:
        return NO_TOOLS
    declarations = (
        decl
        for tool in tools
        for decl in _dicts(_get(tool, "functionDeclarations", "function_declarations"))
        if isinstance(decl.get("name"), str)
    )
    functions = tuple(
        Function(d["name"], _schema(d.get("parameters") or _get(d, *_JSON_SCHEMA)))
        for d in declarations
    )
    tool_config = _schema(_get(body, "toolConfig", "tool_config"))
    config = _schema(_get(tool_config, "functionCallingConfig", "function_calling_config"))
    mode = str(config.get("mode", "AUTO")).upper()
    allowed = _get(config, "allowedFunctionNames", "allowed_function_names")
    named = None
    if mode == "ANY" and isinstance(allowed, list) and allowed:
        named = tuple(n for n in allowed if isinstance(n, str))
    turns = [c for c in _dicts(body.get("contents")) if c.get("role") != "model"]
    parts = _dicts(turns[-1].get("parts")) if turns else []
    return ToolRequest(
        functions=functions,
        choice_none=mode == "NONE",
        named=named,
        after_tool_result=any("functionResponse" in p or "function_response" in p for p in parts),
    )
