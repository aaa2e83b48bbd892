"""What every protocol adapter shares: request facts, usage, the SSE tap, the adapter contract.

The gateway forwards the client's bytes untouched (§8), so adapters never build full
request objects: they decode a few fields with small msgspec "view" Structs whose decoders
are built once at import, and read usage from the answer as it streams past.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, TypeVar

import msgspec

from ratelimit_gw.errors import GatewayError

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
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The few request facts the limiter and relay need (§4 "Tokens", §8)."""

    model: str | None
    stream: bool
    max_output_tokens: int | None
    input_chars: int
    wants_usage_chunk: bool


def estimate_input_tokens(body_len: int) -> int:
    """Admission-time input estimate: one token per 4 body bytes, at least 1.

    No tokenizer and no network call on the hot path (§4). JSON syntax, roles and
    non-text parts make the body longer than its text, so this overestimates, which
    only makes the hold safer; settlement corrects it to the real usage.
    """
    return max(1, -(-body_len // 4))


encode_json = msgspec.json.Encoder().encode

_ERROR_PATH = re.compile(r" - at `\$\.?(.*)`$")


def decode_view(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode a request view, turning msgspec errors into the §7 400 errors."""
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
    events in ``on_event``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending = b""
        # Where the boundary search resumes, so a large event arriving in many small
        # chunks is not rescanned from its start each time.
        self._scan_from = 0

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        start = 0
        kept: list[bytes] = []
        dropped = False
        while (end := _event_end(buf, max(start, self._scan_from))) >= 0:
            if self.on_event(buf[start:end]):
                kept.append(buf[start:end])
            else:
                dropped = True
            start = end
        self._pending = buf[start:]
        # A separator may straddle this chunk and the next: re-check its last 3 bytes.
        self._scan_from = max(0, len(self._pending) - 3)
        if not dropped:
            return buf[:start]
        return b"".join(kept)

    def flush(self) -> bytes:
        """Forward what is left: an event the upstream did not end with a blank line."""
        rest, self._pending, self._scan_from = self._pending, b"", 0
        if rest and self.on_event(rest):
            return rest
        return b""

    @abstractmethod
    def on_event(self, event: bytes) -> bool:
        """Read one event (separator included); return False to keep it from the client."""


def _event_end(buf: bytes, scan_from: int) -> int:
    """Index just past the first event separator at or after ``scan_from``, else -1."""
    lf = buf.find(b"\n\n", scan_from)
    crlf = buf.find(b"\r\n\r\n", scan_from, lf + 4 if lf >= 0 else len(buf))
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 4
    return lf + 2 if lf >= 0 else -1


class ProtocolAdapter(ABC):
    """One client protocol: credentials, request views, usage, and error envelopes."""

    name: str
    error_content_type = "application/json"

    @abstractmethod
    def credential(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """The gateway key the client sent (§2); ``headers`` must be case-insensitive."""

    @abstractmethod
    def parse_request(self, route: Route, body: bytes, path_model: str | None) -> RequestInfo:
        """Decode only the fields the gateway needs; raise GatewayError (400) on bad input."""

    def prepare_upstream_body(self, route: Route, body: bytes, info: RequestInfo) -> bytes:
        """The bytes sent upstream: the client's own, unless the protocol must ask for usage."""
        return body

    @abstractmethod
    def usage_from_body(self, route: Route, body: bytes) -> Usage | None:
        """Usage of a non-streamed answer, or None if it has none (never raises)."""

    @abstractmethod
    def new_stream_tap(
        self, route: Route, strip_usage_chunk: bool, *, sse: bool = True
    ) -> StreamTap:
        """A tap for one streamed answer.

        ``strip_usage_chunk`` hides the OpenAI chat usage chunk the gateway itself asked
        for (§8); ``sse=False`` selects Gemini's JSON-array stream (no ``?alt=sse``).
        """

    @abstractmethod
    def error_body(self, err: GatewayError, request_id: str) -> bytes:
        """The §7 envelope for ``err`` in this protocol."""


def rate_limit_body(err: GatewayError) -> dict[str, int | float | None]:
    """The ``rate_limit`` object every 429 body carries (§7)."""
    rpm = err.rate_limit.rpm if err.rate_limit else None
    tpm = err.rate_limit.tpm if err.rate_limit else None
    return {"rpm": rpm, "qps": rpm / 60 if rpm is not None else None, "tpm": tpm}
