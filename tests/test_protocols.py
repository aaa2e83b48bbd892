"""Protocol adapters: request views, usage reading, stream taps and error envelopes."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterator

import pytest
from multidict import CIMultiDict

from ratelimit_gw.errors import GatewayError, RateLimitInfo
from ratelimit_gw.protocols import (
    ADAPTERS,
    ProtocolAdapter,
    RequestInfo,
    Route,
    StreamTap,
    UpstreamEdits,
    Usage,
    estimate_input_tokens,
    input_token_bound,
)
from ratelimit_gw.protocols.base import SseStreamTap, sse_event_fields

OPENAI = ADAPTERS["openai"]
ANTHROPIC = ADAPTERS["anthropic"]
GEMINI = ADAPTERS["gemini"]

# --- example streams (shapes from reference/protocol-notes.md) -----------------------

CHAT_TEXT_EVENT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}\n\n'
)
CHAT_TOOL_EVENT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\":1}"}}]},'
    b'"finish_reason":"stop"}],"usage":null}\n\n'
)
CHAT_USAGE_EVENT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[],"usage":{"prompt_tokens":13,"completion_tokens":5,"total_tokens":18,'
    b'"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}\n\n'
)
CHAT_DONE_EVENT = b"data: [DONE]\n\n"
CHAT_STREAM = CHAT_TEXT_EVENT + CHAT_TOOL_EVENT + CHAT_USAGE_EVENT + CHAT_DONE_EVENT

RESPONSES_STREAM = (
    b"event: response.created\n"
    b'data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1",'
    b'"status":"in_progress","output":[],"usage":null}}\n\n'
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1",'
    b'"output_index":0,"content_index":0,"delta":"Hel"}\n\n'
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","sequence_number":2,"item_id":"msg_1",'
    b'"output_index":0,"content_index":0,"delta":"lo"}\n\n'
    b"event: response.output_text.done\n"
    b'data: {"type":"response.output_text.done","sequence_number":3,"text":"Hello"}\n\n'
    b"event: response.completed\n"
    b'data: {"type":"response.completed","sequence_number":4,"response":{"id":"resp_1",'
    b'"status":"completed","output":[{"type":"message","content":[{"type":"output_text",'
    b'"text":"Hello"}]}],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},'
    b'"output_tokens":2,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":11}}}\n\n'
)

ANTHROPIC_STREAM = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant",'
    b'"content":[],"model":"claude-x","stop_reason":null,"usage":{"input_tokens":12,'
    b'"cache_creation_input_tokens":3,"cache_read_input_tokens":100,"output_tokens":1}}}\n\n'
    b"event: ping\n"
    b'data: {"type":"ping"}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"input_json_delta","partial_json":"{\\"q\\":"}}\n\n'
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":0}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":7}}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":15}}\n\n'
    b"event: message_stop\n"
    b'data: {"type":"message_stop"}\n\n'
)

GEMINI_CHUNKS = [
    b'{"candidates":[{"content":{"parts":[{"text":"Hel"}],"role":"model"}}],'
    b'"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":1,"totalTokenCount":9}}',
    b'{"candidates":[{"content":{"parts":[{"text":"lo"}],"role":"model"}}]}',
    b'{"candidates":[{"content":{"parts":[{"text":"!"}],"role":"model"},"finishReason":"STOP"}],'
    b'"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":3,"thoughtsTokenCount":4,'
    b'"totalTokenCount":15}}',
]
# Gemini frames its SSE with CRLF line endings.
GEMINI_SSE_STREAM = b"".join(b"data: " + chunk + b"\r\n\r\n" for chunk in GEMINI_CHUNKS)
GEMINI_ARRAY_STREAM = b"[" + b"\n,\r\n".join(GEMINI_CHUNKS) + b"]"

STREAM_CASES = {
    "openai-chat": (OPENAI, Route.CHAT, CHAT_STREAM, Usage(13, 5), 2 + 7),
    "openai-responses": (OPENAI, Route.RESPONSES, RESPONSES_STREAM, Usage(9, 2), 5),
    "anthropic": (
        ANTHROPIC,
        Route.MESSAGES,
        ANTHROPIC_STREAM,
        Usage(115, 15, cache_read_tokens=100, cache_write_tokens=3),
        2 + 5,
    ),
    "gemini-sse": (GEMINI, Route.STREAM_GENERATE, GEMINI_SSE_STREAM, Usage(8, 7), 6),
}


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Every way the network might cut ``data`` that a test can afford to try."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]
    rng = random.Random(1234)
    for _ in range(30):
        a, b = sorted(rng.sample(range(1, len(data)), 2))
        yield [data[:a], data[a:b], data[b:]]


def relay(tap: StreamTap, pieces: list[bytes]) -> bytes:
    return b"".join(tap.feed(piece) for piece in pieces) + tap.flush()


def rejection(call: Callable[..., object], *args: object) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        call(*args)
    return caught.value


# --- stream taps ----------------------------------------------------------------------


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_tap_forwards_stream_byte_for_byte_and_reads_usage_however_it_is_split(
    case: str,
) -> None:
    adapter, route, stream, usage, output_chars = STREAM_CASES[case]
    for pieces in splits(stream):
        tap = adapter.new_stream_tap(route, False)
        assert relay(tap, pieces) == stream
        assert tap.usage == usage
        assert tap.output_chars == output_chars


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_tap_forwards_each_event_as_soon_as_it_is_complete(case: str) -> None:
    adapter, route, stream, _, _ = STREAM_CASES[case]
    tap = adapter.new_stream_tap(route, False)
    forwarded = b""
    for i in range(len(stream)):
        forwarded += tap.feed(stream[i : i + 1])
        received = stream[: i + 1]
        lf, crlf = received.rfind(b"\n\n"), received.rfind(b"\r\n\r\n")
        boundary = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        assert forwarded == stream[:boundary]
    assert tap.flush() == b""


def whole_event_fields(stream: bytes) -> list[tuple[str | None, bytes]]:
    """Each event's fields, read the general way from the stream cut at its blank lines (an
    LF pair or a CRLF pair, whichever comes first)."""
    events: list[bytes] = []
    start = 0
    while True:
        found = [
            (at, len(sep)) for sep in (b"\n\n", b"\r\n\r\n") if (at := stream.find(sep, start)) >= 0
        ]
        if not found:
            break
        at, size = min(found)
        events.append(stream[start : at + size])
        start = at + size
    events.append(stream[start:])
    return [(name, data) for name, data in map(sse_event_fields, events) if data is not None]


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_tap_hands_a_translator_the_fields_of_each_event_however_it_is_split(case: str) -> None:
    adapter, route, stream, usage, output_chars = STREAM_CASES[case]
    expected = whole_event_fields(stream)
    for pieces in splits(stream):
        tap = adapter.new_stream_tap(route, False)
        assert isinstance(tap, SseStreamTap)
        read = [fields for piece in pieces for fields in tap.feed_events(piece)]
        assert read + tap.flush_events() == expected
        assert (tap.usage, tap.output_chars) == (usage, output_chars)


# Shapes an SSE stream may take beside the usual `event:` line and one `data:` line.
ODD_EVENTS = (
    b": keep-alive comment\n\n",
    b"event: ping\n\n",
    b"data:no space\n\n",
    b"data:  two spaces\n\n",
    b"data: line one\ndata: line two\n\n",
    b"event:  padded \ndata: x\n\n",
    b"data: first\nevent: named after\n\n",
    b"event: a\nevent: b\ndata: last name wins\n\n",
    b"id: 7\nretry: 100\ndata: with other fields\n\n",
    b"\ndata: after a blank line\n\n",
    b"data:\n\n",
    b"event: \xff\xfe\ndata: a name that is not UTF-8\n\n",
    b"data: a final event without its blank line",
)


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_tap_reads_every_shape_of_event_as_the_general_reading_does(line_end: bytes) -> None:
    stream = b"".join(ODD_EVENTS).replace(b"\n", line_end)
    expected = whole_event_fields(stream)
    for pieces in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        tap = OPENAI.new_stream_tap(Route.CHAT, False)
        assert isinstance(tap, SseStreamTap)
        read = [fields for piece in pieces for fields in tap.feed_events(piece)]
        assert read + tap.flush_events() == expected
        assert relay(OPENAI.new_stream_tap(Route.CHAT, False), pieces) == stream


def test_chat_tap_strips_only_the_usage_chunk_the_gateway_asked_for() -> None:
    expected = CHAT_TEXT_EVENT + CHAT_TOOL_EVENT + CHAT_DONE_EVENT
    for pieces in splits(CHAT_STREAM):
        tap = OPENAI.new_stream_tap(Route.CHAT, True)
        assert relay(tap, pieces) == expected
        assert tap.usage == Usage(13, 5)


def test_chat_tap_keeps_usage_on_chunks_that_also_carry_choices() -> None:
    event = (
        b'data: {"choices":[{"index":0,"delta":{"content":"ok"}}],'
        b'"usage":{"prompt_tokens":4,"completion_tokens":1}}\n\n'
    )
    tap = OPENAI.new_stream_tap(Route.CHAT, True)
    assert relay(tap, [event]) == event
    assert tap.usage == Usage(4, 1)


def test_tap_reads_a_final_event_that_lacks_its_blank_line() -> None:
    tap = OPENAI.new_stream_tap(Route.CHAT, True)
    unterminated = CHAT_USAGE_EVENT.rstrip(b"\n")
    assert tap.feed(CHAT_TEXT_EVENT + unterminated) == CHAT_TEXT_EVENT
    assert tap.flush() == b""  # it is the gateway's own usage chunk: still stripped
    assert tap.usage == Usage(13, 5)


def test_tap_ignores_events_it_cannot_decode() -> None:
    stream = b"data: {not json\n\n: keep-alive comment\n\n" + b'data: {"error":{"message":"x"}}\n\n'
    tap = OPENAI.new_stream_tap(Route.CHAT, True)
    assert relay(tap, [stream]) == stream
    assert tap.usage is None
    assert tap.output_chars == 0


def test_anthropic_usage_takes_the_last_cumulative_message_delta() -> None:
    tap = ANTHROPIC.new_stream_tap(Route.MESSAGES, False)
    head, _, _ = ANTHROPIC_STREAM.partition(b"event: message_delta")
    tap.feed(head)
    # message_start: input + cache writes + cache reads
    assert tap.usage == Usage(115, 1, cache_read_tokens=100, cache_write_tokens=3)
    relay(tap, [ANTHROPIC_STREAM[len(head) :]])
    assert tap.usage == Usage(115, 15, 100, 3)  # 15, not 7 + 15


def test_anthropic_message_delta_may_restate_input_tokens() -> None:
    stream = (
        b"event: message_start\n"
        b'data: {"type":"message_start","message":{"usage":{"input_tokens":0,'
        b'"cache_read_input_tokens":50,"output_tokens":1}}}\n\n'
        b"event: message_delta\n"
        b'data: {"type":"message_delta","delta":{},'
        b'"usage":{"input_tokens":20,"output_tokens":9}}\n\n'
    )
    tap = ANTHROPIC.new_stream_tap(Route.MESSAGES, False)
    relay(tap, [stream])
    assert tap.usage == Usage(70, 9, cache_read_tokens=50)


def test_gemini_usage_is_the_last_running_total_and_survives_chunks_without_it() -> None:
    tap = GEMINI.new_stream_tap(Route.STREAM_GENERATE, False)
    first, second, _ = GEMINI_SSE_STREAM.split(b"\r\n\r\n", 2)
    tap.feed(first + b"\r\n\r\n" + second + b"\r\n\r\n")
    assert tap.usage == Usage(8, 1)  # the chunk without usageMetadata did not reset it
    tap.feed(GEMINI_SSE_STREAM[len(first) + len(second) + 8 :])
    assert tap.usage == Usage(8, 3 + 4)  # candidates + thoughts, not summed over chunks


def test_gemini_json_array_stream_is_forwarded_at_once_and_read_at_the_end() -> None:
    for pieces in splits(GEMINI_ARRAY_STREAM):
        tap = GEMINI.new_stream_tap(Route.STREAM_GENERATE, False, sse=False)
        assert [tap.feed(piece) for piece in pieces] == pieces
        assert tap.flush() == b""
        assert tap.usage == Usage(8, 7)
        assert tap.output_chars == 6


def test_gemini_json_array_cut_between_elements_still_yields_usage() -> None:
    cut = GEMINI_ARRAY_STREAM[: GEMINI_ARRAY_STREAM.index(GEMINI_CHUNKS[1]) + len(GEMINI_CHUNKS[1])]
    tap = GEMINI.new_stream_tap(Route.STREAM_GENERATE, False, sse=False)
    tap.feed(cut + b"\n,\r\n")
    tap.flush()
    assert tap.usage == Usage(8, 1)
    assert tap.output_chars == 5


# --- request views --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter", "route", "body", "path_model", "expected"),
    [
        (
            OPENAI,
            Route.CHAT,
            b'{"model":"gpt-4o","messages":[],"stream":true,"max_tokens":50,'
            b'"stream_options":{"include_usage":true}}',
            None,
            RequestInfo("gpt-4o", True, 50, 0, True, cap_fields=frozenset({"max_tokens"})),
        ),
        (
            OPENAI,
            Route.CHAT,
            b'{"model":"gpt-4o"}',
            None,
            RequestInfo("gpt-4o", False, None, 0, False),
        ),
        (
            OPENAI,
            Route.CHAT,
            b'{"model":"o3","max_tokens":10,"max_completion_tokens":90,"stream":null}',
            None,
            RequestInfo(
                "o3",
                False,
                90,
                0,
                False,
                cap_fields=frozenset({"max_tokens", "max_completion_tokens"}),
            ),
        ),
        (
            OPENAI,
            Route.CHAT,
            b'{"model":"o3","max_tokens":90,"max_completion_tokens":10,"n":3}',
            None,
            RequestInfo(
                "o3",
                False,
                90,
                0,
                False,
                choices=3,
                cap_fields=frozenset({"max_tokens", "max_completion_tokens"}),
            ),
        ),
        (OPENAI, Route.CHAT, b'{"model":"m","n":0}', None, RequestInfo("m", False, None, 0, False)),
        (
            OPENAI,
            Route.RESPONSES,
            b'{"model":"gpt-4o","input":"hi","stream":true,"max_output_tokens":64}',
            None,
            RequestInfo("gpt-4o", True, 64, 0, False, cap_fields=frozenset({"max_output_tokens"})),
        ),
        (
            ANTHROPIC,
            Route.MESSAGES,
            b'{"model":"claude-x","max_tokens":1024,"stream":true,"messages":[]}',
            None,
            RequestInfo("claude-x", True, 1024, 0, False, cap_fields=frozenset({"max_tokens"})),
        ),
        (
            GEMINI,
            Route.GENERATE,
            b'{"contents":[],"generationConfig":{"maxOutputTokens":256,"temperature":1}}',
            "gemini-2.5-flash",
            RequestInfo("gemini-2.5-flash", False, 256, 0, False),
        ),
        (
            GEMINI,
            Route.STREAM_GENERATE,
            b'{"contents":[],"generation_config":{"max_output_tokens":32}}',
            "gemini-2.5-flash",
            RequestInfo("gemini-2.5-flash", True, 32, 0, False),
        ),
        (GEMINI, Route.GENERATE, b"{}", "g", RequestInfo("g", False, None, 0, False)),
        (
            GEMINI,
            Route.GENERATE,
            b'{"generationConfig":{"maxOutputTokens":0,"candidateCount":3}}',
            "g",
            RequestInfo("g", False, None, 0, False, choices=3),  # protobuf's 0 is "unset"
        ),
        (
            GEMINI,
            Route.GENERATE,
            b'{"generation_config":{"candidate_count":2}}',
            "g",
            RequestInfo("g", False, None, 0, False, choices=2),
        ),
    ],
)
def test_request_view_reads_only_the_fields_the_gateway_needs(
    adapter: ProtocolAdapter,
    route: Route,
    body: bytes,
    path_model: str | None,
    expected: RequestInfo,
) -> None:
    info = adapter.parse_request(route, body, path_model)
    assert info == dataclasses.replace(expected, input_chars=len(body))


@pytest.mark.parametrize(
    ("name", "route", "body", "param"),
    [
        ("openai", Route.CHAT, b'{"model":"m","max_tokens":"abc"}', "max_tokens"),
        (
            "openai",
            Route.CHAT,
            b'{"model":"m","max_completion_tokens":-1}',
            "max_completion_tokens",
        ),
        ("openai", Route.CHAT, b'{"model":"m","stream":"yes"}', "stream"),
        (
            "openai",
            Route.CHAT,
            b'{"model":"m","stream_options":{"include_usage":1}}',
            "stream_options.include_usage",
        ),
        ("openai", Route.CHAT, b'{"model":7}', "model"),
        ("openai", Route.RESPONSES, b'{"model":"m","max_output_tokens":1.5}', "max_output_tokens"),
        ("openai", Route.CHAT, b'{"model":"m","n":129}', "n"),
        (
            "gemini",
            Route.GENERATE,
            b'{"generationConfig":{"candidateCount":1000}}',
            "generationConfig.candidateCount",
        ),
        ("anthropic", Route.MESSAGES, b'{"model":"m","max_tokens":-5}', "max_tokens"),
        (
            "gemini",
            Route.GENERATE,
            b'{"generationConfig":{"maxOutputTokens":"many"}}',
            "generationConfig.maxOutputTokens",
        ),
    ],
)
def test_field_of_wrong_type_is_rejected_naming_the_param(
    name: str, route: Route, body: bytes, param: str
) -> None:
    err = rejection(ADAPTERS[name].parse_request, route, body, "g")
    assert (err.status, err.reason, err.param) == (400, "invalid_request", param)
    assert param in err.message


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("body", [b"{not json", b"", b'{"model":"m"} trailing'])
def test_invalid_json_is_rejected(name: str, body: bytes) -> None:
    route = {"openai": Route.CHAT, "anthropic": Route.MESSAGES, "gemini": Route.GENERATE}[name]
    err = rejection(ADAPTERS[name].parse_request, route, body, "g")
    assert (err.status, err.reason) == (400, "invalid_json")


@pytest.mark.parametrize("body", [b"[1,2]", b'"text"', b"null", b"3"])
def test_body_that_is_not_an_object_is_rejected(body: bytes) -> None:
    for name, route in [("openai", Route.RESPONSES), ("anthropic", Route.MESSAGES)]:
        err = rejection(ADAPTERS[name].parse_request, route, body, None)
        assert (err.status, err.reason) == (400, "invalid_json")
        assert err.message == "Request body must be a JSON object"


@pytest.mark.parametrize(
    ("name", "route", "body", "path_model"),
    [
        ("openai", Route.CHAT, b'{"messages":[]}', None),
        ("openai", Route.RESPONSES, b'{"model":""}', None),
        ("anthropic", Route.MESSAGES, b'{"model":null,"max_tokens":5}', None),
        ("gemini", Route.GENERATE, b"{}", None),
    ],
)
def test_missing_model_is_rejected(
    name: str, route: Route, body: bytes, path_model: str | None
) -> None:
    err = rejection(ADAPTERS[name].parse_request, route, body, path_model)
    assert (err.status, err.reason, err.param) == (400, "missing_model", "model")


def test_input_estimate_is_a_quarter_of_the_body_rounded_up_and_never_zero() -> None:
    assert [estimate_input_tokens(n) for n in (0, 1, 4, 5, 4000)] == [1, 1, 1, 2, 1000]


def test_input_bound_is_one_token_per_body_byte_and_never_zero() -> None:
    assert [input_token_bound(n) for n in (0, 1, 4, 5, 4000)] == [1, 1, 4, 5, 4000]


# --- upstream body --------------------------------------------------------------------


def test_chat_stream_without_include_usage_asks_upstream_for_usage() -> None:
    body = b'{"model":"m","stream":true,"stream_options":{"include_obfuscation":false},"n":1}'
    info = OPENAI.parse_request(Route.CHAT, body, None)
    sent = json.loads(OPENAI.prepare_upstream_body(Route.CHAT, body, info, UpstreamEdits()))
    assert sent == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_obfuscation": False, "include_usage": True},
        "n": 1,
    }


@pytest.mark.parametrize(
    ("name", "route", "body"),
    [
        (
            "openai",
            Route.CHAT,
            b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}',
        ),
        ("openai", Route.CHAT, b'{"model":"m"}'),
        ("openai", Route.RESPONSES, b'{"model":"m","stream":true}'),
        ("anthropic", Route.MESSAGES, b'{"model":"m","stream":true}'),
        ("gemini", Route.STREAM_GENERATE, b'{"contents":[]}'),
    ],
)
def test_every_other_body_is_forwarded_untouched(name: str, route: Route, body: bytes) -> None:
    adapter = ADAPTERS[name]
    info = adapter.parse_request(route, body, "g")
    assert adapter.prepare_upstream_body(route, body, info, UpstreamEdits()) is body


# The held cap goes where each upstream reads it (§5); a caller's own cap is never touched.
@pytest.mark.parametrize(
    ("name", "route", "body", "edits", "sent"),
    [
        (
            "openai",
            Route.CHAT,
            b'{"model":"m"}',
            UpstreamEdits(output_cap=700),
            {"model": "m", "max_completion_tokens": 700},
        ),
        (
            "openai",
            Route.CHAT,
            b'{"model":"m"}',
            UpstreamEdits(output_cap=700, chat_cap_field="max_tokens"),
            {"model": "m", "max_tokens": 700},
        ),
        (  # an upstream that reads max_tokens only would see no cap at all
            "openai",
            Route.CHAT,
            b'{"model":"m","max_completion_tokens":5}',
            UpstreamEdits(output_cap=5, chat_cap_field="max_tokens"),
            {"model": "m", "max_completion_tokens": 5, "max_tokens": 5},
        ),
        (  # one decode and one encode for the usage request, the rename and the cap
            "openai",
            Route.CHAT,
            b'{"model":"m","stream":true}',
            UpstreamEdits(model="m-2025", output_cap=9),
            {
                "model": "m-2025",
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_completion_tokens": 9,
            },
        ),
        (
            "openai",
            Route.RESPONSES,
            b'{"model":"m","input":"hi"}',
            UpstreamEdits(output_cap=700),
            {"model": "m", "input": "hi", "max_output_tokens": 700},
        ),
        (
            "anthropic",
            Route.MESSAGES,
            b'{"model":"m","messages":[]}',
            UpstreamEdits(model="m-1", output_cap=700),
            {"model": "m-1", "messages": [], "max_tokens": 700},
        ),
        (  # the model is in the URL: a rename leaves a Gemini body alone
            "gemini",
            Route.GENERATE,
            b'{"contents":[]}',
            UpstreamEdits(model="g-1", output_cap=700),
            {"contents": [], "generationConfig": {"maxOutputTokens": 700}},
        ),
        (
            "gemini",
            Route.GENERATE,
            b'{"generationConfig":{"maxOutputTokens":0,"temperature":1}}',
            UpstreamEdits(output_cap=700),
            {"generationConfig": {"maxOutputTokens": 700, "temperature": 1}},
        ),
        (
            "gemini",
            Route.STREAM_GENERATE,
            b'{"generation_config":{"max_output_tokens":0}}',
            UpstreamEdits(output_cap=700),
            {"generation_config": {"max_output_tokens": 700}},
        ),
        (
            "gemini",
            Route.GENERATE,
            b'{"generation_config":{"temperature":1}}',
            UpstreamEdits(output_cap=700),
            {"generation_config": {"temperature": 1, "maxOutputTokens": 700}},
        ),
    ],
)
def test_uncapped_body_is_sent_with_the_held_cap(
    name: str, route: Route, body: bytes, edits: UpstreamEdits, sent: dict[str, object]
) -> None:
    adapter = ADAPTERS[name]
    info = adapter.parse_request(route, body, "g")
    assert json.loads(adapter.prepare_upstream_body(route, body, info, edits)) == sent


@pytest.mark.parametrize(
    ("name", "route", "body", "chat_cap_field"),
    [
        ("openai", Route.CHAT, b'{"model":"m","max_completion_tokens":3}', "max_completion_tokens"),
        ("openai", Route.CHAT, b'{"model":"m","max_tokens":3}', "max_completion_tokens"),
        ("openai", Route.CHAT, b'{"model":"m","max_tokens":3}', "max_tokens"),
        (
            "openai",
            Route.RESPONSES,
            b'{"model":"m","max_output_tokens":3}',
            "max_completion_tokens",
        ),
        ("anthropic", Route.MESSAGES, b'{"model":"m","max_tokens":3}', "max_completion_tokens"),
        ("gemini", Route.GENERATE, b'{"generationConfig":{"maxOutputTokens":3}}', "-"),
        ("gemini", Route.GENERATE, b'{"generation_config":{"max_output_tokens":3}}', "-"),
    ],
)
def test_body_whose_caller_gave_a_cap_is_sent_byte_identical(
    name: str, route: Route, body: bytes, chat_cap_field: str
) -> None:
    adapter = ADAPTERS[name]
    info = adapter.parse_request(route, body, "g")
    edits = UpstreamEdits(output_cap=3, chat_cap_field=chat_cap_field)
    assert adapter.prepare_upstream_body(route, body, info, edits) is body


# --- usage of buffered answers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "route", "body", "usage"),
    [
        (
            "openai",
            Route.CHAT,
            b'{"id":"c","choices":[{"message":{"content":"hi"}}],'
            b'"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":13}}',
            Usage(10, 3),
        ),
        (
            "openai",
            Route.RESPONSES,
            b'{"id":"r","output":[],"usage":{"input_tokens":7,"output_tokens":2,"total_tokens":9}}',
            Usage(7, 2),
        ),
        (
            "anthropic",
            Route.MESSAGES,
            b'{"content":[],"usage":{"input_tokens":5,"cache_creation_input_tokens":2,'
            b'"cache_read_input_tokens":30,"output_tokens":4,"service_tier":"standard"}}',
            Usage(37, 4, cache_read_tokens=30, cache_write_tokens=2),
        ),
        (
            "gemini",
            Route.GENERATE,
            b'{"candidates":[],"usageMetadata":{"promptTokenCount":6,"candidatesTokenCount":2,'
            b'"thoughtsTokenCount":10,"totalTokenCount":18}}',
            Usage(6, 12),
        ),
        ("gemini", Route.STREAM_GENERATE, GEMINI_ARRAY_STREAM, Usage(8, 7)),
        ("openai", Route.CHAT, b'{"id":"c","choices":[]}', None),
        ("anthropic", Route.MESSAGES, b'{"error":{"type":"x"},"usage":null}', None),
        ("gemini", Route.GENERATE, b'{"promptFeedback":{"blockReason":"SAFETY"}}', None),
        ("openai", Route.RESPONSES, b"<html>bad gateway</html>", None),
        ("anthropic", Route.MESSAGES, b'{"usage":{"input_tokens":"many"}}', None),
    ],
)
def test_usage_is_read_from_a_buffered_answer_or_is_none(
    name: str, route: Route, body: bytes, usage: Usage | None
) -> None:
    assert ADAPTERS[name].usage_from_body(route, body) == usage


# --- credentials ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "headers", "query", "key"),
    [
        ("openai", {"authorization": "Bearer rlgw-a"}, {}, "rlgw-a"),
        ("openai", {"Authorization": "bearer  rlgw-a "}, {}, "rlgw-a"),
        ("openai", {"x-api-key": "rlgw-a"}, {}, None),
        ("openai", {"Authorization": "Basic abc"}, {}, None),
        ("anthropic", {"X-Api-Key": "rlgw-b", "Authorization": "Bearer other"}, {}, "rlgw-b"),
        ("anthropic", {"Authorization": "Bearer rlgw-b"}, {}, "rlgw-b"),
        ("anthropic", {}, {}, None),
        ("gemini", {"X-Goog-Api-Key": "rlgw-c"}, {"key": "other"}, "rlgw-c"),
        ("gemini", {"Authorization": "Bearer other"}, {"key": "rlgw-c"}, "rlgw-c"),
        ("gemini", {"Authorization": "Bearer rlgw-c"}, {}, "rlgw-c"),
        ("gemini", {"x-goog-api-key": ""}, {}, None),
    ],
)
def test_credential_comes_from_the_protocols_own_header(
    name: str, headers: dict[str, str], query: dict[str, str], key: str | None
) -> None:
    assert ADAPTERS[name].credential(CIMultiDict(headers), query) == key


# --- error envelopes ------------------------------------------------------------------

RATE_LIMITED = GatewayError(
    429,
    "rpm_exceeded",
    "Rate limit exceeded. Your current limit is 60 requests per minute.",
    retry_after_ms=12_000,
    rate_limit=RateLimitInfo(rpm=60, tpm=None),
)
BAD_PARAM = GatewayError(400, "invalid_request", "Invalid value for 'stream'", param="stream")


def test_openai_error_envelope() -> None:
    assert json.loads(OPENAI.error_body(BAD_PARAM, "req-1")) == {
        "error": {
            "type": "invalid_request_error",
            "code": "400",
            "reason": "invalid_request",
            "message": "Invalid value for 'stream'",
            "param": "stream",
        }
    }
    assert json.loads(OPENAI.error_body(RATE_LIMITED, "req-1")) == {
        "error": {
            "type": "rate_limit_error",
            "code": "429",
            "reason": "rpm_exceeded",
            "message": RATE_LIMITED.message,
            "param": None,
            "rate_limit": {"rpm": 60, "qps": 1.0, "tpm": None},
        }
    }
    assert OPENAI.error_content_type == "application/json"


def test_anthropic_error_envelope_carries_the_request_id() -> None:
    assert json.loads(ANTHROPIC.error_body(BAD_PARAM, "req-2")) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "code": "400",
            "reason": "invalid_request",
            "message": "Invalid value for 'stream'",
        },
        "request_id": "req-2",
    }
    tpm_limited = GatewayError(429, "tpm_exceeded", "m", rate_limit=RateLimitInfo(90, 1000))
    body = json.loads(ANTHROPIC.error_body(tpm_limited, "req-3"))
    assert body["error"]["rate_limit"] == {"rpm": 90, "qps": 1.5, "tpm": 1000}


def test_gemini_error_envelope_is_a_google_rpc_status_with_retry_info() -> None:
    assert json.loads(GEMINI.error_body(RATE_LIMITED, "req-4")) == {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "message": RATE_LIMITED.message,
            "type": "rate_limit_error",
            "reason": "rpm_exceeded",
            "rate_limit": {"rpm": 60, "qps": 1.0, "tpm": None},
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "rpm_exceeded",
                    "domain": "ratelimit-gw",
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"},
            ],
        }
    }


@pytest.mark.parametrize(
    ("retry_after_ms", "delay"), [(250, "0.250s"), (1500, "1.500s"), (0, "0s")]
)
def test_gemini_retry_delay_is_a_protobuf_duration(retry_after_ms: int, delay: str) -> None:
    err = GatewayError(429, "tpm_exceeded", "m", retry_after_ms=retry_after_ms)
    details = json.loads(GEMINI.error_body(err, "r"))["error"]["details"]
    assert details[-1] == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


@pytest.mark.parametrize(
    ("status", "rpc_status"),
    [
        (400, "INVALID_ARGUMENT"),
        (401, "UNAUTHENTICATED"),
        (402, "RESOURCE_EXHAUSTED"),
        (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"),
        (405, "INVALID_ARGUMENT"),
        (413, "INVALID_ARGUMENT"),
        (500, "INTERNAL"),
        (502, "INTERNAL"),
        (503, "UNAVAILABLE"),
        (504, "DEADLINE_EXCEEDED"),
        (529, "UNAVAILABLE"),
    ],
)
def test_gemini_error_status_follows_the_google_rpc_mapping(status: int, rpc_status: str) -> None:
    # retry_after_ms on a non-429 (e.g. 503) does not add RetryInfo: only rate limits do.
    err = GatewayError(status, "some_reason", "m", retry_after_ms=1000)
    error = json.loads(GEMINI.error_body(err, "r"))["error"]
    assert (error["code"], error["status"]) == (status, rpc_status)
    assert error["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "some_reason",
            "domain": "ratelimit-gw",
        }
    ]
    assert "rate_limit" not in error


def test_adapters_are_registered_by_protocol_name() -> None:
    assert {name: adapter.name for name, adapter in ADAPTERS.items()} == {
        "openai": "openai",
        "anthropic": "anthropic",
        "gemini": "gemini",
    }
