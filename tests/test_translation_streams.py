"""A translated stream does not depend on how the network cut the upstream's (issue 19).

Every direction between the three protocols: the mock upstream's own streams (text, text cut
by the cap, parallel tool calls), each translated whole, cut at every byte, cut in two at
every byte and sent with CRLF line ends, must come out as the same bytes, and the relay's
tap must read the same usage from each.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable

import pytest

from ratelimit_gw.protocols import ADAPTERS, Route, Usage
from ratelimit_gw.protocols.translation import CODECS
from ratelimit_gw.protocols.translation.ir import ChatRequest
from ratelimit_gw.protocols.translation.relaying import AnswerTranslation
from ratelimit_gw.testing import mock_wire
from ratelimit_gw.testing.mock_wire import Reply, StreamFrames, ToolCall

UPSTREAM_ROUTES = {
    "openai": Route.CHAT,
    "anthropic": Route.MESSAGES,
    "gemini": Route.STREAM_GENERATE,
}
UPSTREAM_STREAMS: dict[str, Callable[[Reply], StreamFrames]] = {
    "openai": lambda reply: mock_wire.chat_stream(reply, include_usage=True),
    "anthropic": mock_wire.anthropic_stream,
    "gemini": mock_wire.gemini_sse_stream,
}
DIRECTIONS = list(itertools.permutations(UPSTREAM_STREAMS, 2))  # (caller, upstream)


def reply(cap_tokens: int | None = None, tool_calls: tuple[ToolCall, ...] = ()) -> Reply:
    return mock_wire.plan_reply(
        seq=1,
        model="upstream-model",
        created_s=1,
        input_tokens=7,
        chunks=4,
        tokens_per_chunk=5,
        cap_tokens=cap_tokens,
        ignore_cap=False,
        cache_read_tokens=2,
        tool_calls=tool_calls,
    )


REPLIES = {
    "text": reply(),
    "text cut by the cap": reply(cap_tokens=8),
    "parallel tool calls": reply(
        tool_calls=(
            ToolCall.of("get_weather", {"city": 'Paris "é"'}),
            ToolCall.of("lookup", {"q": [1, 2, {"n": None}]}),
        )
    ),
}


@pytest.fixture(autouse=True)
def fixed_clock_and_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers stamp chunks with the time and make up ids a protocol lacks: fixed here, so
    two translations of one stream can be compared byte for byte."""
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=1))


def translate(
    caller: str, upstream: str, include_usage: bool, pieces: list[bytes]
) -> tuple[bytes, Usage | None, int]:
    request = ChatRequest(model="caller-model", stream=True, include_usage=include_usage)
    translation = AnswerTranslation(
        ADAPTERS[caller], CODECS[caller], CODECS[upstream], request, "req_1"
    )
    tap = translation.new_tap(ADAPTERS[upstream].new_stream_tap(UPSTREAM_ROUTES[upstream], False))
    written = b"".join(tap.feed(piece) for piece in pieces) + tap.flush()
    return written, tap.usage, tap.output_chars


@pytest.mark.parametrize("reply_name", list(REPLIES))
@pytest.mark.parametrize(("caller", "upstream"), DIRECTIONS)
def test_a_translated_stream_is_the_same_however_the_upstream_stream_is_cut(
    caller: str, upstream: str, reply_name: str
) -> None:
    frames = UPSTREAM_STREAMS[upstream](REPLIES[reply_name])
    stream = frames.head + b"".join(frames.chunks) + frames.tail
    crlf = stream.replace(b"\n", b"\r\n")
    for include_usage in (False, True):
        whole = translate(caller, upstream, include_usage, [stream])
        assert whole[0] and whole[1] is not None
        cuts = [
            [frames.head, *frames.chunks, frames.tail],
            [stream[i : i + 1] for i in range(len(stream))],
            *([stream[:cut], stream[cut:]] for cut in range(1, len(stream))),
            [crlf[i : i + 1] for i in range(len(crlf))],
        ]
        for pieces in cuts:
            assert translate(caller, upstream, include_usage, pieces) == whole
