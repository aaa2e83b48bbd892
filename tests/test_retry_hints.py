"""Reading an upstream 429's retry hint: headers for every protocol, Gemini's RetryInfo body.

The hint decides how long an upstream key cools down, so a wrong reading either hammers a
rate-limited key or takes a good one out of its pool: every source, their order, and every
kind of garbage is pinned here.
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from ratelimit_gw.protocols import ADAPTERS
from ratelimit_gw.protocols.retry_hints import MAX_RETRY_HINT_MS, duration_ms, header_hint_ms
from ratelimit_gw.testing.mock_keys import KeyBehaviour
from ratelimit_gw.testing.mock_upstream import MOCK_STATE, MockState, start_mock_upstream

OPENAI = ADAPTERS["openai"]
ANTHROPIC = ADAPTERS["anthropic"]
GEMINI = ADAPTERS["gemini"]
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"

# The real Gemini 429 of the protocol notes (§3.1), byte for byte.
REAL_GEMINI_429 = (
    b'{"error":{"code":429,"message":"You exceeded your current quota, please check your plan'
    b" and billing details. For more information on this error, head to:"
    b" https://ai.google.dev/gemini-api/docs/rate-limits. ...\\nPlease retry in 20.70617005s."
    b'","status":"RESOURCE_EXHAUSTED","details":[\n'
    b' {"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"Learn more about'
    b' Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]},\n'
    b' {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":'
    b'"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":'
    b'"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"model":'
    b'"gemini-2.5-flash","location":"global"},"quotaValue":"5"}]},\n'
    b' {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"20s"}]}}'
)


def gemini_body(*details: Any) -> bytes:
    error = {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "m", "details": details}
    return json.dumps({"error": error}).encode()


def retry_info(delay: Any) -> dict[str, Any]:
    return {"@type": RETRY_INFO, "retryDelay": delay}


# --- headers, every protocol ------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [OPENAI, ANTHROPIC, GEMINI], ids=lambda a: a.name)
@pytest.mark.parametrize(
    ("headers", "hint_ms"),
    [
        ({"retry-after-ms": "1500"}, 1500),
        ({"retry-after-ms": "250.2"}, 251),  # rounded up: never earlier than asked
        ({"retry-after": "2"}, 2000),
        ({"retry-after": "1.5"}, 1500),  # the SDKs accept float seconds too
        ({"retry-after": " 0.1 "}, 100),  # not 101 from binary floating point
        ({"retry-after": "0"}, 0),
        ({}, None),
        ({"x-ratelimit-reset-requests": "1s"}, None),  # not a retry hint
    ],
)
def test_each_header_source(adapter: Any, headers: dict[str, str], hint_ms: int | None) -> None:
    assert adapter.retry_hint_ms(CIMultiDict(headers), b"") == hint_ms


@pytest.mark.parametrize(
    ("headers", "hint_ms"),
    [
        ({"retry-after-ms": "300", "retry-after": "7"}, 300),  # milliseconds first
        ({"retry-after-ms": "soon", "retry-after": "7"}, 7000),  # a bad source is skipped
        ({"retry-after-ms": "-5", "retry-after": "7"}, 7000),
        ({"retry-after-ms": "nan", "retry-after": "7"}, 7000),
        ({"retry-after-ms": "inf", "retry-after": "7"}, 7000),
        ({"retry-after-ms": "", "retry-after": "7"}, 7000),
    ],
)
def test_retry_after_ms_comes_first_unless_unusable(headers: dict[str, str], hint_ms: int) -> None:
    assert OPENAI.retry_hint_ms(headers, b"") == hint_ms


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "3"},
        {"RETRY-AFTER": "3"},
        {"content-type": "application/json", "Retry-after": "3"},
        CIMultiDict({"Retry-After": "3"}),
        CIMultiDictProxy(CIMultiDict({"RETRY-AFTER": "3"})),
    ],
    ids=["title", "upper", "mixed", "cimultidict", "proxy"],
)
def test_header_names_are_read_in_any_case(headers: Any) -> None:
    assert ANTHROPIC.retry_hint_ms(headers, b"") == 3000


def test_an_odd_case_milliseconds_header_still_comes_first() -> None:
    assert OPENAI.retry_hint_ms({"Retry-After": "9", "Retry-After-Ms": "40"}, b"") == 40


@pytest.mark.parametrize(
    "value", ["soon", "", "   ", "nan", "-nan", "inf", "-Infinity", "-1", "1e400", "0x10", "2s"]
)
def test_garbage_retry_after_is_no_hint(value: str) -> None:
    assert OPENAI.retry_hint_ms({"retry-after": value}, b"") is None


# --- HTTP-dates -------------------------------------------------------------------------------

NOW_S = calendar.timegm((2015, 10, 21, 7, 27, 30))


@pytest.mark.parametrize(
    ("date", "hint_ms"),
    [
        ("Wed, 21 Oct 2015 07:28:00 GMT", 30_000),  # IMF-fixdate
        ("Wednesday, 21-Oct-15 07:28:00 GMT", 30_000),  # RFC 850
        ("Wed, 21 Oct 2015 08:28:00 +0100", 30_000),  # an offset is applied
        ("Wed, 21 Oct 2015 07:28:00", 30_000),  # no zone: GMT, as HTTP says, not local time
        ("Wed, 21 Oct 2015 07:27:30 GMT", 0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0),  # already past: use the key now
        ("Tue, 20 Oct 2015 07:28:00 GMT", 0),
    ],
)
def test_an_http_date_is_read_against_the_clock(date: str, hint_ms: int) -> None:
    assert header_hint_ms({"retry-after": date}, now_s=NOW_S) == hint_ms


def test_an_http_date_uses_the_real_clock_by_default() -> None:
    date = formatdate(time.time() + 30, usegmt=True)
    hint = GEMINI.retry_hint_ms({"Retry-After": date}, b"")
    assert hint is not None and 28_000 <= hint <= 31_000  # dates count whole seconds


@pytest.mark.parametrize(
    "date",
    [
        "Wed, 99 Foo 2015 07:28:00 GMT",
        "Wed, 32 Oct 2015 07:28:00 GMT",  # not rolled over into November
        "Wed, 21 Oct 2015 25:28:00 GMT",
        "Wed, 21 Oct 99999 07:28:00 GMT",
        "Mon",
        "12:00:00 GMT",
    ],
)
def test_a_broken_http_date_is_no_hint(date: str) -> None:
    assert header_hint_ms({"retry-after": date}, now_s=NOW_S) is None


# --- the cap ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "86400000"},
        {"retry-after": "1e308"},  # finite, but its milliseconds overflow
        {"retry-after-ms": "1e12"},
        {"retry-after": "Fri, 01 Jan 2999 00:00:00 GMT"},
    ],
)
def test_an_absurd_hint_is_capped_at_an_hour(headers: dict[str, str]) -> None:
    assert OPENAI.retry_hint_ms(headers, b"") == MAX_RETRY_HINT_MS == 3_600_000


def test_a_hint_just_under_the_cap_is_kept() -> None:
    assert OPENAI.retry_hint_ms({"retry-after": "3599.5"}, b"") == 3_599_500


# --- Gemini's RetryInfo -----------------------------------------------------------------------


def test_the_real_gemini_429_is_read() -> None:
    json.loads(REAL_GEMINI_429)  # the fixture itself is valid JSON
    assert GEMINI.retry_hint_ms({}, REAL_GEMINI_429) == 20_000


@pytest.mark.parametrize(
    ("delay", "hint_ms"),
    [
        ("2s", 2000),
        ("1.5s", 1500),
        ("0.250s", 250),
        ("20.70617005s", 20_707),  # rounded up
        ("0.000000001s", 1),
        ("0s", 0),
        ("86400s", MAX_RETRY_HINT_MS),
        ("-1s", None),
        ("2", None),
        ("2m", None),
        ("1.5 s", None),
        ("", None),
        (5, None),
        (None, None),
        ({"seconds": 2}, None),
    ],
)
def test_retry_info_delays(delay: Any, hint_ms: int | None) -> None:
    assert GEMINI.retry_hint_ms({}, gemini_body(retry_info(delay))) == hint_ms


def test_headers_come_before_the_gemini_body() -> None:
    body = gemini_body(retry_info("20s"))
    assert GEMINI.retry_hint_ms({"Retry-After": "3"}, body) == 3000
    # Unusable headers leave the body to decide.
    assert GEMINI.retry_hint_ms({"retry-after": "later"}, body) == 20_000


def test_only_gemini_reads_the_body() -> None:
    body = gemini_body(retry_info("20s"))
    assert OPENAI.retry_hint_ms({}, body) is None
    assert ANTHROPIC.retry_hint_ms({}, body) is None


def test_a_streamed_gemini_error_array_is_read() -> None:
    # :streamGenerateContent without ?alt=sse answers its error inside a JSON array.
    body = b"[" + gemini_body(retry_info("4s")) + b"]"
    assert GEMINI.retry_hint_ms({}, body) == 4000


def test_odd_details_do_not_hide_the_retry_info() -> None:
    body = gemini_body(
        {"@type": 5, "retryDelay": [[["deep"]]]},
        {"no": "type"},
        {"@type": "type.googleapis.com/google.rpc.Help", "retryDelay": "99s"},
        retry_info("3s"),
    )
    assert GEMINI.retry_hint_ms({}, body) == 3000


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[",
        b"null",
        b"42",
        b'"error"',
        b"[1, 2]",
        b'{"error": "quota"}',
        b'{"error": {"details": "none"}}',
        b'{"error": {"details": [1, "x"]}}',
        b'{"error": {"details": null}}',
        b'{"error": {"code": 429}}',
        b'{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo"}]}}',
        b'{"error": {"details": [{"@type": "'
        + RETRY_INFO.encode()
        + b'", "retryDelay": '
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}]}}",
    ],
    ids=lambda body: repr(body[:40]),
)
def test_a_garbage_gemini_body_is_no_hint(body: bytes) -> None:
    assert GEMINI.retry_hint_ms({}, body) is None


def test_a_huge_gemini_body_is_not_decoded() -> None:
    padding = {"@type": "type.googleapis.com/google.rpc.Help", "text": "x" * 100_000}
    assert GEMINI.retry_hint_ms({}, gemini_body(padding, retry_info("2s"))) is None
    assert GEMINI.retry_hint_ms({"retry-after": "2"}, b"x" * 10_000_000) == 2000


def test_duration_ms_takes_only_strings() -> None:
    assert duration_ms(" 2s ") == 2000
    assert duration_ms(2) is None


@settings(max_examples=300, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(["retry-after", "Retry-After", "retry-after-ms", "RETRY-AFTER-MS", "x"]),
        st.text(max_size=40),
    ),
    body=st.binary(max_size=200) | st.builds(lambda d: gemini_body(retry_info(d)), st.text()),
)
def test_any_answer_gives_a_hint_in_range_or_none(headers: dict[str, str], body: bytes) -> None:
    for adapter in (OPENAI, ANTHROPIC, GEMINI):
        hint = adapter.retry_hint_ms(headers, body)
        assert hint is None or (isinstance(hint, int) and 0 <= hint <= MAX_RETRY_HINT_MS)


# --- against the mock upstream's keyed 429s, over HTTP ----------------------------------------


@pytest.fixture
async def mock() -> AsyncIterator[tuple[str, MockState]]:
    runner, url = await start_mock_upstream()
    try:
        yield url, runner.app[MOCK_STATE]
    finally:
        await runner.cleanup()


CALLS = {  # path, auth header name, value prefix
    "openai": ("/v1/chat/completions", "Authorization", "Bearer "),
    "anthropic": ("/v1/messages", "x-api-key", ""),
    "gemini": ("/v1beta/models/g:generateContent", "x-goog-api-key", ""),
}


@pytest.mark.parametrize(
    ("protocol", "behaviour", "hint_ms"),
    [
        ("openai", KeyBehaviour(status=429, retry_after_s=2, retry_after_ms=1500), 1500),
        ("anthropic", KeyBehaviour(status=429, retry_after_s=2), 2000),
        ("gemini", KeyBehaviour(status=429, retry_after_s=2), 2000),
        ("gemini", KeyBehaviour(status=429, retry_after_ms=1250, retry_headers=False), 1250),
        ("openai", KeyBehaviour(status=429), None),
    ],
)
async def test_a_keyed_429_from_the_mock_is_read(
    mock: tuple[str, MockState], protocol: str, behaviour: KeyBehaviour, hint_ms: int | None
) -> None:
    url, state = mock
    state.set_key_behaviour("k-429", behaviour)
    path, header, prefix = CALLS[protocol]
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + path, json={}, headers={header: prefix + "k-429"}) as resp,
    ):
        assert resp.status == 429
        body = await resp.read()
        assert ADAPTERS[protocol].retry_hint_ms(resp.headers, body) == hint_ms
