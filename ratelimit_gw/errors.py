"""The error catalog: one typed exception every layer raises, rendered per protocol in one place.

Each protocol module turns a :class:`GatewayError` into its own envelope
(``protocols.<name>.error_body``); :mod:`ratelimit_gw.middleware` is the only place that
catches it and writes the response.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

ERROR_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_balance",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    # The body came too slowly (server.body_timeout_s). Anthropic's name for a timeout; not
    # invalid_request_error, as the same request sent faster succeeds (SDKs retry a 408).
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "api_error",
    529: "overloaded_error",
}


# Every reason the gateway may refuse or fail a (non-admin) request with
# (docs/limits-and-balance.md): each
# rlgw_rejections_total series exists from start-up at zero. A new reason is added here.
REJECTION_REASONS: tuple[str, ...] = (
    # the admission script (limits, balance, the key's and its account's state)
    "rpm_exceeded",
    "tpm_exceeded",
    "concurrency_exceeded",
    "request_exceeds_limit",
    "balance_exceeded",
    "budget_exceeded",
    "invalid_key",
    "key_revoked",
    "key_expired",
    "account_disabled",
    "upstream_quota",
    # the request itself
    "missing_key",
    "model_not_allowed",
    "model_not_found",
    "protocol_mismatch",
    "missing_model",
    "invalid_json",
    "invalid_request",
    "unbounded_input",
    "route_not_found",
    "method_not_allowed",
    "endpoint_not_found",
    "endpoint_not_allowed",
    "request_too_large",
    "body_timeout",
    # the gateway or what it depends on
    "overloaded",
    "body_buffer_full",
    "storage_unavailable",
    "upstream_timeout",
    "upstream_unreachable",
    "upstream_unreadable",
    "upstream_unavailable",  # every key of the upstream's pool unhealthy (upstream 401s)
    # an upstream's own error, rewritten into the caller's envelope (converter routes)
    "upstream_error",
    "internal_error",
)


@dataclass(frozen=True)
class RateLimitInfo:
    """The limits in force for the caller, echoed in 429 bodies (docs/limits-and-balance.md)."""

    rpm: int | None
    tpm: int | None


@dataclass
class GatewayError(Exception):
    """A request the gateway answers itself, with a typed body in the caller's protocol.

    ``reason`` is the machine-readable cause (docs/limits-and-balance.md); ``retry_after_ms`` is
    set on 429/503 and
    becomes ``retry-after``/``retry-after-ms``; ``should_retry=False`` adds
    ``x-should-retry: false`` for errors waiting cannot cure.
    """

    status: int
    reason: str
    message: str
    retry_after_ms: int | None = None
    should_retry: bool | None = None
    rate_limit: RateLimitInfo | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        # A status outside the table comes from an upstream's error rewritten by a converter
        # route (a 422, 409, …): a client error must not read as the server's api_error.
        fallback = "invalid_request_error" if 400 <= self.status < 500 else "api_error"
        return ERROR_TYPE_BY_STATUS.get(self.status, fallback)


def connect_failure_reason(exc: OSError) -> str:
    """Why a connection (to storage or an upstream) failed, in the operating system's words:
    ``connection refused``, ``no route to host``, ``name lookup failed: …``. asyncio's own
    messages ("Connect call failed ('10.0.0.5', 6379)") hide the errno's meaning."""
    if isinstance(exc, socket.gaierror):
        return f"name lookup failed: {exc.strerror or exc}"
    if exc.errno and exc.errno > 0:
        reason = os.strerror(exc.errno)
    else:
        reason = exc.strerror or str(exc) or type(exc).__name__
    return reason[:1].lower() + reason[1:]
