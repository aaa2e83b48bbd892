"""What the relay needs to hand a translated answer to the caller (docs/converters.md): the
whole answer and the upstream's errors rewritten in the caller's protocol, and a stream tap
that writes the caller's stream event by event as the upstream's arrives.

Settlement never reads the translation: the upstream adapter's own tap and usage reader see
the upstream's bytes first, so a caller is charged from the figures the upstream reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from ratelimit_gw.errors import GatewayError
from ratelimit_gw.protocols.base import ProtocolAdapter, SseStreamTap, StreamTap
from ratelimit_gw.protocols.translation.ir import ChatRequest, Codec, StreamReader, StreamWriter

# What a broken upstream answer can raise while it is read (a view's decode, a missing key).
_UNREADABLE = (msgspec.DecodeError, KeyError, IndexError, TypeError, ValueError)


@dataclass(frozen=True, slots=True)
class AnswerTranslation:
    """Rewrites one request's answer from the upstream's protocol into the caller's."""

    caller: ProtocolAdapter  # renders the caller's error envelope
    caller_codec: Codec
    upstream_codec: Codec
    request: ChatRequest
    request_id: str

    @property
    def content_type(self) -> str:
        return "application/json"

    @property
    def stream_content_type(self) -> str:
        return "application/json" if self.request.json_array_stream else "text/event-stream"

    def answer(self, body: bytes) -> bytes:
        """A whole 2xx answer, rewritten (502 if the upstream's cannot be read)."""
        try:
            answer = self.upstream_codec.read_answer(body)
        except _UNREADABLE:
            raise GatewayError(
                502,
                "upstream_unreadable",
                f"The upstream's answer could not be read as a {self.upstream_codec.name} answer.",
            ) from None
        return self.caller_codec.write_answer(answer, self.request)

    def error(self, status: int, body: bytes) -> bytes:
        """The upstream's error, in the caller's envelope with the upstream's status."""
        message = self.upstream_codec.error_message(body)
        err = GatewayError(status, "upstream_error", f"The upstream answered {status}: {message}")
        return self.caller.error_body(err, self.request_id)

    def new_tap(self, upstream_tap: StreamTap) -> TranslatingTap:
        return TranslatingTap(upstream_tap, self)


class TranslatingTap(StreamTap):
    """Reads the upstream's stream with the upstream adapter's own tap (usage, text relayed)
    and writes each of its events, as soon as it is whole, as the caller's stream.

    The adapter's tap splits the stream into events and parses each event's fields once, for
    both: it reads its usage from them and hands them on here (``feed_events``)."""

    def __init__(self, upstream_tap: StreamTap, translation: AnswerTranslation) -> None:
        super().__init__()
        # The converter asks every upstream for an SSE stream (Gemini: ?alt=sse).
        assert isinstance(upstream_tap, SseStreamTap), "a translated stream is SSE upstream"
        self._upstream_tap = upstream_tap
        self._translation = translation
        self._reader: StreamReader = translation.upstream_codec.answer_reader()
        self._writer: StreamWriter = translation.caller_codec.answer_writer(translation.request)
        self._failed = False  # the upstream reported an error mid-stream: nothing more is written

    def feed(self, data: bytes) -> bytes:
        return self._translate(self._upstream_tap.feed_events(data))

    def flush(self) -> bytes:
        out = self._translate(self._upstream_tap.flush_events())
        return out if self._failed else out + self._writer.close()

    def _translate(self, events: list[tuple[str | None, bytes]]) -> bytes:
        tap = self._upstream_tap
        self.usage, self.output_chars = tap.usage, tap.output_chars
        if not events or self._failed:
            return b""
        out: list[bytes] = []
        reader, writer = self._reader, self._writer
        for name, data in events:
            try:
                read = reader.feed(name, data)
            except GatewayError as err:  # an error event: the caller's, and the stream ends
                out.append(self._error_event(err))
                break
            except _UNREADABLE:
                continue  # an event that cannot be read cannot be written either
            for translated in read:
                if written := writer.feed(translated):
                    out.append(written)
        return b"".join(out)

    def _error_event(self, err: GatewayError) -> bytes:
        self._failed = True
        translation = self._translation
        if translation.request.json_array_stream:
            return b""  # a JSON array has no place for it: the caller sees the stream end short
        return translation.caller.stream_error_event(err, translation.request_id)
