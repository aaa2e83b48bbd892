"""Rate-limit response headers (docs/limits-and-balance.md): a limiter Decision, or a refusal's
wait, as headers.

The forms every caller gets (OpenAI's ``x-ratelimit-*`` and the IETF ``RateLimit`` pair);
a protocol's own forms are its adapter's (``ProtocolAdapter.add_own_headers``).
"""

from __future__ import annotations

import math

from .limiter import Decision


def go_duration(ms: int) -> str:
    """Milliseconds → the OpenAI header form of a duration: "250ms", "1s", "6m0s", "1h2m3.5s"."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


# Header names per bucket kind, built once: this runs for every admitted request.
_KINDS = (("requests", "rpm"), ("tokens", "tpm"))
_OPENAI_NAMES = {
    kind: (
        f"x-ratelimit-limit-{kind}",
        f"x-ratelimit-remaining-{kind}",
        f"x-ratelimit-reset-{kind}",
    )
    for kind, _ in _KINDS
}


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """Headers describing the tightest bucket of each kind, in the forms every caller reads."""
    out: dict[str, str] = {}
    policies: list[str] = []
    states: list[str] = []
    for (kind, name), bucket in zip(_KINDS, (decision.requests, decision.tokens), strict=True):
        if bucket is None:
            continue
        limit, remaining = str(bucket.limit), str(bucket.remaining)
        names = _OPENAI_NAMES[kind]
        out[names[0]] = limit
        out[names[1]] = remaining
        out[names[2]] = go_duration(bucket.reset_ms)
        policies.append(f'"{name}";q={limit};w=60')
        states.append(f'"{name}";r={remaining};t={-(-bucket.reset_ms // 1000)}')
    if decision.concurrency_limit is not None and decision.concurrency_in_use is not None:
        left = max(decision.concurrency_limit - decision.concurrency_in_use, 0)
        policies.append(f'"concurrency";q={decision.concurrency_limit};qu="concurrent-requests"')
        states.append(f'"concurrency";r={left}')
    if policies:
        out["RateLimit-Policy"] = ", ".join(policies)
        out["RateLimit"] = ", ".join(states)
    return out


def retry_headers(retry_after_ms: int | None, should_retry: bool | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if retry_after_ms is not None and retry_after_ms > 0:
        out["retry-after"] = str(max(1, math.ceil(retry_after_ms / 1000)))
        out["retry-after-ms"] = str(retry_after_ms)
    if should_retry is not None:
        out["x-should-retry"] = "true" if should_retry else "false"
    return out
