"""What every protocol adapter shares: request facts, usage, the SSE tap, the adapter contract.

The gateway forwards the client's bytes untouched (docs/relay.md), so adapters never build full
request objects: they decode a few fields with small msgspec "view" Structs whose decoders
are built once at import, and read usage from the answer as it streams past.

An adapter plays two parts, and a route picks one adapter for each: the *caller's* protocol
(the paths it owns, the gateway key it sends, its request view, its error envelope and its
own response headers) and the *upstream's* protocol (the URL and credential header the
upstream takes, the body sent to it, the usage read from its answer). A native route uses
one adapter for both; a converter pairs two with a translator between them.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.model_lists import ModelListing
from ratelimit_gw.protocols.retry_hints import header_hint_ms

if TYPE_CHECKING:  # the limiter imports storage, which imports settings, which imports this
    from ratelimit_gw.limiter import Decision

T = TypeVar("T")

# An output cap must be a non-negative protobuf int32 (the widest the upstreams accept);
# the bound also keeps the limiter's token arithmetic in small integers.
MaxTokens = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class Route(enum.StrEnum):
    CHAT = "chat"
    RESPONSES = "responses"
    MESSAGES = "messages"
    GENERATE = "generate"
    STREAM_GENERATE = "stream_generate"


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int  # every input token billed, cached ones included
    output_tokens: int
    # The parts of input_tokens the provider read from or wrote to its prompt cache: they
    # have prices of their own (docs/limits-and-balance.md).
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The few request facts the limiter and relay need (docs/limits-and-balance.md,
    docs/relay.md)."""

    model: str | None
    stream: bool
    max_output_tokens: int | None  # the caller's cap (the largest, if it gave several)
    input_chars: int
    wants_usage_chunk: bool
    # Answers generated at once (chat `n`, Gemini `candidateCount`): each may use the cap.
    choices: int = 1
    # The request fields that carry the caller's cap, for the adapter to tell whether the
    # field the upstream honours is among them.
    cap_fields: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class UpstreamEdits:
    """What the gateway needs changed in the body it sends upstream (the exceptions in
    docs/relay.md)."""

    model: str | None = None  # the upstream's own id, when the model is renamed
    # The cap the request was held for; sent when the caller's body gives the upstream none.
    output_cap: int | None = None
    chat_cap_field: str = "max_completion_tokens"  # the chat field the upstream honours


# At most this many answers per request: OpenAI's own limit for `n` (Gemini allows 8).
# Bounded so cap × choices stays a small integer in the limiter's arithmetic.
Choices = Annotated[int, msgspec.Meta(le=128)]


def input_token_bound(body_len: int) -> int:
    """The most input tokens a body's text can cost: one per body byte, at least 1.

    An upper bound for text in any script, not a guess: the providers' tokenizers
    (byte-level BPE for OpenAI and Anthropic, SentencePiece with byte fallback for
    Gemini) never emit more tokens than the UTF-8 bytes of the text, and the JSON body
    holds each text character in at least as many bytes as its UTF-8 encoding (escapes
    only add). Rarer symbol sequences really do reach one token per byte, so no smaller
    ratio bounds ASCII either. What bytes cannot bound (prompts a provider adds for
    tools, media priced by its pixels or pages, referenced content) is refused or held
    separately (``ProtocolAdapter.unbounded_inputs``). Balance holds use this bound.
    """
    return max(1, body_len)


def estimate_input_tokens(body_len: int) -> int:
    """The usual input of a body: one token per 4 bytes, at least 1 (the fast heuristic of
    docs/limits-and-balance.md).

    What token buckets charge at admission (settlement corrects them to the real usage) and
    what a stream cut before its usage arrived is charged for its prompt. Not a bound
    (CJK, emoji and dense symbols cost more per byte): money is held on
    :func:`input_token_bound`. Limits use the estimate so that a prompt an upstream would
    accept under the same tpm limit is not refused as larger than the limit can ever allow.
    """
    return max(1, -(-body_len // 4))


@dataclass(frozen=True, slots=True)
class UnboundedInput:
    """A part of a request whose input cost its bytes do not bound."""

    path: str  # the field, e.g. ``messages[0].content[1]``
    kind: str  # what it is, e.g. ``image_url part`` or ``previous_response_id``


encode_json = msgspec.json.Encoder().encode
decode_any_json = msgspec.json.Decoder().decode


# A Raw field the body does not have: msgspec cannot take Raw in a union with None.
ABSENT = msgspec.Raw()


def lenient(decoder: msgspec.json.Decoder[T], data: bytes | msgspec.Raw) -> T | None:
    """A view of ``data``, or None when it does not have the view's shape (the upstream
    refuses such a body, so it can bill nothing)."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError:
        return None


def is_array(raw: msgspec.Raw) -> bool:
    """Whether a zero-copy slice of the body holds a JSON array."""
    return bytes(memoryview(raw)[:1]) == b"["


def is_given(raw: msgspec.Raw) -> bool:
    """Whether a field is present with a value (not null, nor an empty string or list)."""
    return len(raw) > 4 or bytes(raw) not in (b"", b"null", b'""', b"[]")


_ERROR_PATH = re.compile(r" - at `\$\.?(.*)`$")


def decode_view(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode a request view, turning msgspec errors into the 400 errors of
    docs/limits-and-balance.md."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        detail = str(exc)
        match = _ERROR_PATH.search(detail)
        if match is None or not match.group(1):
            # The only failure at the root of a Struct view is a non-object body.
            raise GatewayError(400, "invalid_json", "Request body must be a JSON object") from None
        param = match.group(1)
        raise GatewayError(
            400,
            "invalid_request",
            f"Invalid value for '{param}': {detail[: match.start()]}",
            param=param,
        ) from None
    except msgspec.DecodeError as exc:
        raise GatewayError(400, "invalid_json", f"Request body is not valid JSON: {exc}") from None


def require_model(model: str | None) -> str:
    if not model:
        raise GatewayError(400, "missing_model", "The request must name a 'model'", param="model")
    return model


def bearer_token(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    return headers.get(name, "").strip() or None


def sse_event_fields(event: bytes) -> tuple[str | None, bytes | None]:
    """Return one SSE event's ``event:`` name and its joined ``data:`` payload."""
    name: str | None = None
    data: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value[:1] == b" " else value)
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, (b"\n".join(data) if data else None)


def _lf_event_fields(event: bytes) -> tuple[str | None, bytes | None]:
    """``sse_event_fields`` of an event with no CR in it (its blank line may be left off),
    quicker for the shape upstreams send: an optional ``event:`` line and one ``data:`` line
    (any other shape: the general reading)."""
    line, _, rest = event.partition(b"\n")
    name = None
    if line[:6] == b"event:":
        name = line[6:].strip().decode("utf-8", "replace")
        line, _, rest = rest.partition(b"\n")
    if line[:5] == b"data:" and (rest == b"\n" or not rest):
        return name, (line[6:] if line[5:6] == b" " else line[5:])
    return sse_event_fields(event)


_FieldReader = Callable[[bytes], tuple[str | None, bytes | None]]


class StreamTap(ABC):
    """Relays one upstream stream unchanged while reading its usage.

    ``usage`` is the best known so far; ``output_chars`` counts generated text seen, so
    a stream cut before its usage arrives can still be estimated.
    """

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.output_chars = 0

    @abstractmethod
    def feed(self, data: bytes) -> bytes:
        """Take one network chunk; return the bytes to forward to the client now."""

    @abstractmethod
    def flush(self) -> bytes:
        """The stream ended: return whatever is still held."""


class SseStreamTap(StreamTap):
    """An SSE tap: forwards every *complete* event at once, byte for byte.

    A partial event is held only until its blank line arrives, because an event is the
    smallest unit a tap can read (or, for the OpenAI usage chunk, drop). Subclasses read
    each event's fields in ``read_event``; every event is split out and its fields parsed
    once, whether the tap forwards bytes (``feed``) or hands a translator the fields
    (``feed_events``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending = b""
        # Where the boundary search resumes, so a large event arriving in many small
        # chunks is not rescanned from its start each time.
        self._scan_from = 0
        # No CR seen yet: events end only with an LF pair, and one split finds them all.
        self._lf_only = True

    def feed(self, data: bytes) -> bytes:
        whole, events, lf_only = self._take_whole_events(data)
        fields = _lf_event_fields if lf_only else sse_event_fields
        kept: list[bytes] = []
        for event in events:
            name, payload = fields(event)
            if payload is None or self.read_event(name, payload):
                kept.append(event)
        if len(kept) == len(events):
            return whole
        return b"".join([event + b"\n\n" for event in kept] if lf_only else kept)

    def flush(self) -> bytes:
        """Forward what is left: an event the upstream did not end with a blank line."""
        rest = self._take_rest()
        if not rest:
            return b""
        name, payload = sse_event_fields(rest)
        return rest if payload is None or self.read_event(name, payload) else b""

    def feed_events(self, data: bytes) -> list[tuple[str | None, bytes]]:
        """Read one network chunk as ``feed`` does, but return the ``event:`` name and
        ``data:`` payload of each event ``feed`` would forward that has a payload: for a
        tap that writes a stream of its own from them (translation)."""
        _, events, lf_only = self._take_whole_events(data)
        return self._read_fields(events, _lf_event_fields if lf_only else sse_event_fields)

    def flush_events(self) -> list[tuple[str | None, bytes]]:
        """``flush`` for ``feed_events``."""
        rest = self._take_rest()
        return self._read_fields([rest], sse_event_fields) if rest else []

    @abstractmethod
    def read_event(self, name: str | None, data: bytes) -> bool:
        """Read one event's ``event:`` name and ``data:`` payload (an event without a payload
        is forwarded unread); return False to keep the event from the client."""

    def _read_fields(
        self, events: list[bytes], fields: _FieldReader
    ) -> list[tuple[str | None, bytes]]:
        read: list[tuple[str | None, bytes]] = []
        for event in events:
            name, payload = fields(event)
            if payload is not None and self.read_event(name, payload):
                read.append((name, payload))
        return read

    def _take_whole_events(self, data: bytes) -> tuple[bytes, list[bytes], bool]:
        """The complete events held and in ``data``: their bytes, the events, and whether
        the stream is LF-only so far; what follows the last is held for the next chunk. An
        LF-only stream's events come without their blank line, others' with it."""
        if self._lf_only and data.find(b"\r") >= 0:
            self._lf_only = False
        buf = self._pending + data if self._pending else data
        if self._lf_only:  # the usual stream
            if self._scan_from and buf.find(b"\n\n", self._scan_from) < 0:
                events: list[bytes] = []  # still inside one event: held, not split again
                rest = buf
            else:
                *events, rest = buf.split(b"\n\n")
            whole = buf[: len(buf) - len(rest)]
        else:
            events = []
            start = 0
            while (end := _event_end(buf, max(start, self._scan_from))) >= 0:
                events.append(buf[start:end])
                start = end
            whole, rest = buf[:start], buf[start:]
        self._pending = rest
        # A separator may straddle this chunk and the next: re-check its last 3 bytes.
        self._scan_from = max(0, len(rest) - 3)
        return whole, events, self._lf_only

    def _take_rest(self) -> bytes:
        rest, self._pending, self._scan_from = self._pending, b"", 0
        return rest


def _event_end(buf: bytes, scan_from: int) -> int:
    """Index just past the first event separator at or after ``scan_from``, else -1."""
    lf = buf.find(b"\n\n", scan_from)
    crlf = buf.find(b"\r\n\r\n", scan_from, lf + 4 if lf >= 0 else len(buf))
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 4
    return lf + 2 if lf >= 0 else -1


class ProtocolAdapter(ABC):
    """One protocol: credentials, request views, usage, error envelopes, upstream URLs."""

    name: str
    error_content_type = "application/json"
    # The headers that carry a credential in this protocol: never relayed from a caller, and
    # written in config only as an env reference.
    credential_headers: frozenset[str] = frozenset({"authorization"})
    # Where a model of another protocol can be reached from a caller speaking this one (README.md,
    # Routes).
    converter_route: str
    # The headers add_own_headers sets (by name, and by prefix): an upstream's are dropped.
    own_header_names: frozenset[str] = frozenset()
    own_header_prefixes: tuple[str, ...] = ()
    # Request headers that belong to this protocol's family (its SDKs' options and telemetry):
    # a converter does not forward them to an upstream of another protocol.
    family_header_prefixes: tuple[str, ...] = ()
    # Headers this protocol's upstream requires that a translated request has no caller's
    # value for (a native relay forwards the caller's own).
    upstream_required_headers: Mapping[str, str] = MappingProxyType({})
    # Whether a provider of this protocol may choose the field the output cap is sent in
    # (``chat_cap_field``, docs/configuration.md).
    has_chat_cap_field = False

    # --- the caller's side --------------------------------------------------------------

    def is_called_on(self, path: str, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        """Whether a request to ``path`` speaks this protocol (the default protocol, OpenAI,
        takes every path no other claims)."""
        return False

    def add_own_headers(
        self, request_id: str, decision: Decision | None, headers: dict[str, str]
    ) -> None:
        """Add this protocol's own forms of the gateway's response headers (request id,
        rate limits) to ``headers``, which already holds the forms every caller gets."""
        return None  # most protocols have no forms of their own

    @abstractmethod
    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """The gateway key the client sent (docs/admin.md); ``headers`` must be case-insensitive."""

    @abstractmethod
    def parse_request(self, route: Route, body: bytes, path_model: str | None) -> RequestInfo:
        """Decode only the fields the gateway needs; raise GatewayError (400) on bad input."""

    @abstractmethod
    def prepare_upstream_body(
        self, route: Route, body: bytes, info: RequestInfo, edits: UpstreamEdits
    ) -> bytes:
        """The bytes sent upstream: the client's own, unless ``edits`` or the protocol's own
        needs (asking for usage) change them — then decoded and encoded once for all."""

    @abstractmethod
    def unbounded_inputs(self, route: Route, body: bytes) -> list[UnboundedInput]:
        """Input the body references, or whose cost its bytes do not bound (media priced
        by pixels or pages, stored state, server-side tools): one entry per part.

        A body that ``parse_request`` accepted; never raises. A plain text body costs byte
        searches only.
        """

    @abstractmethod
    def usage_from_body(self, route: Route, body: bytes) -> Usage | None:
        """Usage of a non-streamed answer, or None if it has none (never raises)."""

    @abstractmethod
    def new_stream_tap(
        self, route: Route, strip_usage_chunk: bool, *, sse: bool = True
    ) -> StreamTap:
        """A tap for one streamed answer.

        ``strip_usage_chunk`` hides the OpenAI chat usage chunk the gateway itself asked
        for (docs/relay.md); ``sse=False`` selects Gemini's JSON-array stream (no ``?alt=sse``).
        """

    def answer_tap(
        self, route: Route, info: RequestInfo, query: Mapping[str, str]
    ) -> Callable[[], StreamTap] | None:
        """How to make the tap for a streamed answer to ``info``; None: it comes whole."""
        if not info.stream:
            return None
        return lambda: self.new_stream_tap(route, False)

    @abstractmethod
    def error_body(self, err: GatewayError, request_id: str) -> bytes:
        """The error envelope (docs/limits-and-balance.md) for ``err`` in this protocol."""

    def stream_error_event(self, err: GatewayError, request_id: str) -> bytes:
        """``err`` as an event of this protocol's SSE stream (its SDKs raise on it)."""
        return b"data: " + self.error_body(err, request_id) + b"\n\n"

    def model_list_credential(
        self, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> str | None:
        """The gateway key sent to this protocol's model list (the route may be shared)."""
        return self.credential(headers, query)

    @abstractmethod
    def model_list(self, models: Sequence[ModelListing]) -> dict[str, Any]:
        """The model list this protocol's SDK reads (README.md Routes)."""

    def model_entry(self, model: ModelListing) -> dict[str, Any] | None:
        """One model, as ``GET …/models/{name}`` answers it; None: the protocol has no such
        route."""
        return None

    # --- the upstream's side ------------------------------------------------------------

    @abstractmethod
    def upstream_url(
        self,
        base_url: str,
        route: Route,
        upstream_model: str,
        path: str,
        query: Iterable[tuple[str, str]],
    ) -> str:
        """The upstream URL for ``route`` on ``upstream_model``. ``path`` is the path the
        caller called; ``query`` its query, already without any gateway key."""

    @abstractmethod
    def upstream_credential(self, api_key: str) -> tuple[str, str]:
        """The header (name, value) this protocol's upstream takes its API key in."""

    def retry_hint_ms(self, headers: Mapping[str, str], body: bytes) -> int | None:
        """How long the upstream asked us to wait before using this key again (an upstream
        429), in ms; None when it gave no usable hint.

        ``retry-after-ms``, else ``retry-after`` (seconds or an HTTP-date), looked up
        case-insensitively; capped at an hour (:mod:`ratelimit_gw.protocols.retry_hints`).
        Never raises.
        """
        return header_hint_ms(headers)

    @abstractmethod
    def models_url(self, base_url: str) -> str:
        """The upstream's model list: a GET that costs nothing and answers 401 to a bad key,
        which is how an unhealthy upstream key is probed (upstream_probe.py). ``base_url``
        as :meth:`upstream_url` takes it."""


def rate_limit_body(err: GatewayError) -> dict[str, int | float | None]:
    """The ``rate_limit`` object every 429 body carries (docs/limits-and-balance.md)."""
    rpm = err.rate_limit.rpm if err.rate_limit else None
    tpm = err.rate_limit.tpm if err.rate_limit else None
    return {"rpm": rpm, "qps": rpm / 60 if rpm is not None else None, "tpm": tpm}
