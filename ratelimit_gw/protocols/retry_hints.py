"""Reading how long an upstream asked to be left alone: the retry hint of an upstream 429.

Promises: a reader returns whole milliseconds, rounded up, from 0 to
:data:`MAX_RETRY_HINT_MS`, or None when its source gives no usable number; none raises,
whatever an upstream sent. A negative, NaN, infinite or unparsable value is no hint, so the
next source (or the caller's default) decides. Only 429 answers are read, so plain parsing
is cheap enough; the usual answer has no hint at all.

The header rules are the official SDKs' (OpenAI and Anthropic, protocol notes §4):
``retry-after-ms`` first, then ``retry-after`` as seconds (a float is accepted, as they do)
or as an HTTP-date. Gemini puts its hint in the error body instead (its adapter reads that,
with :func:`duration_ms`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_tz

# A hint longer than this is taken as this. A key cools down for the hint, and a broken
# header ("retry-after: 86400000", a date years ahead) would otherwise take the key out of
# its pool for days without anything failing loudly: the pool just shrinks. An hour covers
# the per-minute and per-hour windows; a key held by a per-day quota is simply tried again
# after an hour and cools down again on its next 429, at the cost of one request.
MAX_RETRY_HINT_MS = 3_600_000

# A protobuf Duration in its JSON form: seconds with up to 9 fractional digits and an "s".
# Negative durations are no wait; the digit bounds are the type's own range.
_DURATION = re.compile(r"(\d{1,12})(?:\.(\d{1,9}))?s")


def header_hint_ms(headers: Mapping[str, str], now_s: float | None = None) -> int | None:
    """The hint in ``retry-after-ms``, else ``retry-after`` (seconds or an HTTP-date; a date
    already past is 0). ``headers`` may be case-insensitive (aiohttp's) or a plain mapping
    in any case; ``now_s`` (Unix time) is the clock an HTTP-date is read against."""
    raw_ms = _header(headers, "retry-after-ms")
    if raw_ms is not None:
        hint = _scaled_ms(_number(raw_ms), 1)
        if hint is not None:
            return hint
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    seconds = _number(raw)
    if seconds is not None:
        return _scaled_ms(seconds, 1000)
    return _http_date_ms(raw, time.time() if now_s is None else now_s)


def duration_ms(text: object) -> int | None:
    """A protobuf Duration string ("2s", "1.5s", "0.250s") in milliseconds; None for
    anything else (a negative duration included)."""
    if not isinstance(text, str):
        return None
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        return None
    seconds, fraction = match.groups()
    nanos = int((fraction or "").ljust(9, "0"))
    total_ms = int(seconds) * 1000 - (-nanos // 1_000_000)  # the fraction rounded up
    return min(total_ms, MAX_RETRY_HINT_MS)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """``headers[name]`` looked up case-insensitively; ``name`` is lower case."""
    value = headers.get(name)
    if value is not None:
        return value
    # A plain mapping need not be lower case (a CIMultiDict only gets here on a miss).
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return None


def _number(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None


def _scaled_ms(value: float | None, ms_per_unit: int) -> int | None:
    if value is None or not math.isfinite(value) or value < 0:
        return None
    ms = value * ms_per_unit
    if ms >= MAX_RETRY_HINT_MS:  # also a product that overflowed to inf
        return MAX_RETRY_HINT_MS
    # Round first: 0.1 s is 100.00000000000001 ms in binary floating point, not 101 ms.
    return math.ceil(round(ms, 6))


def _http_date_ms(raw: str, now_s: float) -> int | None:
    try:
        parts = parsedate_tz(raw)
        if parts is None:
            return None
        # datetime refuses a day or hour out of range (calendar.timegm would roll "32 Oct"
        # over into November). An HTTP-date is always GMT: email.utils would read one without
        # a zone as local time, so the offset (0 when absent) is applied here.
        at = datetime(*parts[:6], tzinfo=UTC)
        at_s = at.timestamp() - (parts[9] or 0)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None  # not a date on the calendar
    return _scaled_ms(max(0.0, at_s - now_s), 1000)
