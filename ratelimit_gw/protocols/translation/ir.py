"""The shape every translation passes through: one chat request, answer and stream, in no
protocol's words (docs/converters.md).

A converter route reads the caller's request into a :class:`ChatRequest` with the caller's
codec, writes it out with the upstream's codec, and reads the answer back the other way: three
codecs, one per protocol, instead of a translator per direction.

Conventions every codec keeps:

- ``Usage`` (from ``protocols.base``) has one meaning here: ``input_tokens`` counts every input
  token, cached ones included (OpenAI's and Gemini's meaning). A codec converts to and from
  its own protocol's meaning at its edge (Anthropic's ``input_tokens`` excludes cache reads
  and writes).
- Tool results live in *user* turns (as Anthropic and Gemini put them); the OpenAI codec
  splits them out into ``tool`` messages and back.
- Tool-call arguments are JSON objects (``dict``); the OpenAI codec parses and prints the
  JSON string its protocol carries.
- Every refusal and every dropped field names the *caller's* field (``ChatRequest.param``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.base import Route, Usage

Role = Literal["user", "assistant"]
# Why an answer ended, in OpenAI's words (the smallest common set).
StopReason = Literal["stop", "length", "tool_calls", "content_filter"]


# --- content parts ---------------------------------------------------------------------


@dataclass(slots=True)
class Text:
    text: str


@dataclass(slots=True)
class Image:
    """An image given inline (``data``: base64, no ``data:`` prefix) or by ``url``."""

    media_type: str | None
    data: str | None = None
    url: str | None = None
    param: str = ""  # the caller's field, for a refusal (e.g. ``messages[0].content[1]``)


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(slots=True)
class ToolResult:
    call_id: str
    name: str | None  # the function's name (Gemini needs it): paired from the history
    content: list[Text | Image]
    is_error: bool = False


@dataclass(slots=True)
class Reasoning:
    """A model's reasoning text. ``signature`` is its vendor's seal (an Anthropic thinking
    block's signature, a Gemini thought signature): only that vendor may receive it back, so
    a codec writing a request for another vendor drops it."""

    text: str
    signature: str | None = None


Part = Text | Image | ToolCall | ToolResult | Reasoning


@dataclass(slots=True)
class Turn:
    role: Role
    parts: list[Part]


# --- the request -----------------------------------------------------------------------


@dataclass(slots=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: dict[str, Any]  # JSON Schema, lower-case type names


@dataclass(slots=True)
class NamedTool:
    name: str


ToolChoice = Literal["auto", "none", "required"] | NamedTool


@dataclass(slots=True)
class ResponseFormat:
    kind: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    name: str | None = None  # OpenAI's json_schema.name
    strict: bool | None = None


@dataclass(slots=True)
class ChatRequest:
    model: str
    stream: bool
    system: list[str] = field(default_factory=list)  # in order; writers join with "\n\n"
    turns: list[Turn] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # Thinking budget in tokens (0: thinking off); see EFFORT_BUDGETS for OpenAI's efforts.
    reasoning_budget: int | None = None
    # The caller asked to be shown reasoning (Anthropic thinking on, Gemini includeThoughts).
    show_reasoning: bool = False
    # OpenAI callers only: the stream ends with a usage chunk.
    include_usage: bool = False
    # Gemini callers only: a stream asked for without ?alt=sse is one JSON array.
    json_array_stream: bool = False
    # IR field name → the caller's field name, for refusals and the dropped-params header
    # (e.g. "max_tokens" → "generationConfig.maxOutputTokens"); absent: the IR name.
    params: dict[str, str] = field(default_factory=dict)
    # The caller's fields not sent on (x-rlgw-dropped-params), in the caller's names.
    dropped: list[str] = field(default_factory=list)

    def param(self, name: str) -> str:
        return self.params.get(name, name)

    def drop(self, name: str) -> None:
        """Note that the caller's field for IR field ``name`` is not sent on."""
        caller_name = self.param(name)
        if caller_name not in self.dropped:
            self.dropped.append(caller_name)

    def refuse(self, name: str, why: str) -> GatewayError:
        """The 400 for a field the target cannot honour without changing the answer."""
        return refusal(self.param(name), why)


def refusal(param: str, why: str) -> GatewayError:
    return GatewayError(
        400,
        "invalid_request",
        f"'{param}' is not supported on this converter route: {why}",
        param=param,
    )


# OpenAI's reasoning_effort ↔ a thinking budget in tokens (docs/converters.md): effort → the
# budget sent to Anthropic (at least its minimum, 1024) and Gemini; a budget → the smallest
# effort whose budget covers it.
EFFORT_BUDGETS: dict[str, int] = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}


def effort_for_budget(budget: int) -> str | None:
    """The OpenAI effort for a thinking budget (None: thinking off)."""
    if budget <= 0:
        return None
    for effort, limit in EFFORT_BUDGETS.items():
        if budget <= limit:
            return effort
    return "high"


# --- the answer ------------------------------------------------------------------------


@dataclass(slots=True)
class ChatAnswer:
    id: str
    model: str
    parts: list[Text | ToolCall | Reasoning]
    stop: StopReason
    usage: Usage | None
    stop_sequence: str | None = None  # the stop sequence that ended it, when known


# --- stream events ---------------------------------------------------------------------


@dataclass(slots=True)
class Started:
    id: str
    model: str
    usage: Usage | None = None  # input known at the start (Anthropic's message_start)


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ReasoningDelta:
    text: str
    signature: str | None = None


@dataclass(slots=True)
class ToolCallStarted:
    index: int  # 0, 1, … among this answer's tool calls
    id: str
    name: str


@dataclass(slots=True)
class ToolArgumentsDelta:
    index: int
    fragment: str  # a piece of the arguments' JSON text


@dataclass(slots=True)
class Finished:
    stop: StopReason
    stop_sequence: str | None = None


@dataclass(slots=True)
class UsageReport:
    usage: Usage  # cumulative: the latest report replaces earlier ones


StreamEvent = (
    Started
    | TextDelta
    | ReasoningDelta
    | ToolCallStarted
    | ToolArgumentsDelta
    | Finished
    | UsageReport
)


class StreamReader(ABC):
    """Reads an upstream's stream, one SSE event at a time, into stream events."""

    @abstractmethod
    def feed(self, name: str | None, data: bytes) -> list[StreamEvent]:
        """One SSE event: its ``event:`` name (if any) and its joined ``data:`` payload."""


class StreamWriter(ABC):
    """Writes stream events as the caller's stream, each as soon as it can be written."""

    @abstractmethod
    def feed(self, event: StreamEvent) -> bytes:
        """The bytes (whole SSE events) to send the caller for ``event``; may be empty."""

    @abstractmethod
    def close(self) -> bytes:
        """The stream ended whole: what is still held, and the protocol's terminator."""


class Codec(ABC):
    """One protocol's chat format, both as the caller's and as the upstream's."""

    name: str

    # --- the caller's side ---------------------------------------------------------------

    @abstractmethod
    def read_request(self, body: bytes, route: Route, path_model: str | None) -> ChatRequest:
        """The caller's request body (already parsed once by the adapter: a JSON object).
        Raises GatewayError 400 for a field no target can honour (e.g. ``n`` > 1)."""

    @abstractmethod
    def write_answer(self, answer: ChatAnswer, request: ChatRequest) -> bytes:
        """A whole answer, as this protocol's response body."""

    @abstractmethod
    def answer_writer(self, request: ChatRequest) -> StreamWriter:
        """A writer for one streamed answer to ``request``."""

    # --- the upstream's side -------------------------------------------------------------

    @abstractmethod
    def upstream_route(self, request: ChatRequest) -> Route:
        """The native route the translated request goes to."""

    @abstractmethod
    def write_request(self, request: ChatRequest, model: str, default_max_tokens: int) -> bytes:
        """The request body for this protocol's upstream. ``model`` is the gateway's model id
        (the adapter renames it); ``default_max_tokens`` is sent where the protocol requires
        a cap and the caller gave none. Raises GatewayError 400 (``request.refuse``) for a
        field this protocol cannot honour; calls ``request.drop`` for one it ignores."""

    @abstractmethod
    def read_answer(self, body: bytes) -> ChatAnswer:
        """A whole 2xx answer from this protocol's upstream."""

    @abstractmethod
    def answer_reader(self) -> StreamReader:
        """A reader for one streamed answer from this protocol's upstream."""

    @abstractmethod
    def error_message(self, body: bytes) -> str:
        """The message of this protocol's error body (the body itself, cut short, if none)."""
