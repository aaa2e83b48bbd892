"""Why a request was refused, in words a caller can act on: Decision → GatewayError."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import GatewayError, RateLimitInfo
from .limiter import Decision
from .management import iso
from .money import affordable_output_tokens, format_usd
from .protocols import UnboundedInput
from .rate_limit_headers import go_duration
from .settings import Model

if TYPE_CHECKING:  # worst_case.py and failover.py raise this module's errors
    from .itinerary import Destination
    from .upstream_pool import Exhausted
    from .worst_case import Hold

_KEY_REFUSALS = {
    "invalid_key": (401, "Invalid API key."),
    "key_revoked": (401, "This API key has been revoked."),
    "key_expired": (401, "This API key has expired."),
    "account_disabled": (403, "The account of this API key is disabled."),
}
# A budget that resets within this long is waited for: the SDKs cap their waits at 60 s, so a
# later reset is answered with x-should-retry: false (they would retry into the wall).
BUDGET_WAIT_MS = 60_000
BUDGET_RESET_HEADER = "x-ratelimit-reset-budget"


def count(number: int | str, noun: str) -> str:
    """``number`` and ``noun`` as a message says them: "1 request", "0.5 requests"."""
    return f"{number} {noun}" if str(number) == "1" else f"{number} {noun}s"


def _per_second(per_minute: int) -> str:
    return count(f"{per_minute / 60:.3g}", "request") + " per second"


def key_error(reason: str) -> GatewayError | None:
    """The 401 for a key the admission script refused (the 403 for a key of a disabled
    account); None for any other reason."""
    refusal = _KEY_REFUSALS.get(reason)
    return None if refusal is None else GatewayError(refusal[0], reason, refusal[1])


def rejection_error(decision: Decision, model: Model, hold: Hold) -> GatewayError:
    """Why admission refused a request held for ``hold`` on ``model``."""
    reason = decision.reason
    if reason == "budget_exceeded":
        return budget_error(decision, hold.nano)
    choices = hold.choices
    output = f"{choices} × {hold.output_cap}" if choices > 1 else str(hold.output_cap)
    if reason == "balance_exceeded":
        available = decision.available_nano or 0
        input_cost = -(-hold.input_tokens * model.input_nano_usd_per_mtok // 1_000_000)
        affordable = affordable_output_tokens(available, input_cost, model.output_nano_usd_per_mtok)
        each = " per answer" if choices > 1 else ""
        return GatewayError(
            402,
            reason,
            f"Insufficient balance: ${format_usd(max(available, 0))} available, but this "
            f"request may cost up to ${format_usd(hold.nano)} (at most "
            f"{count(hold.input_tokens, 'input token')} + {count(output, 'output token')} on "
            f"{model.id}). The balance can pay for at most "
            f"{count(affordable // choices, 'output token')}{each}: lower max_tokens or top up "
            "the account.",
            should_retry=False,
        )
    return _limit_error(decision, hold.estimated_input_tokens, hold.output_tokens, output)


def unbounded_input_error(model: Model, found: list[UnboundedInput]) -> GatewayError:
    """A prepaid account's request carries input whose cost its bytes do not bound
    (docs/limits-and-balance.md)."""
    first = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return GatewayError(
        400,
        "unbounded_input",
        f"`{first.path}` ({first.kind}){more} is input whose cost the gateway cannot bound "
        "from the request bytes (the provider prices it by pixels, pages or duration, or "
        "fetches it from elsewhere), so a prepaid balance could not be held for its worst "
        f"case. Send the content as text, or ask the operator to set "
        f"`reference_allowance_tokens` for the model `{model.id}`: each such part then holds "
        "that many input tokens.",
        param=first.path,
    )


def per_request_rejection_error(
    decision: Decision, endpoint_id: str, input_tokens: int, output_cap: int, price_nano: int
) -> GatewayError:
    """The refusal of a custom-endpoint request charged a fixed price (docs/custom-endpoints.md)."""
    if decision.reason == "budget_exceeded":
        return budget_error(decision, price_nano)
    if decision.reason == "balance_exceeded":
        available = decision.available_nano or 0
        return GatewayError(
            402,
            "balance_exceeded",
            f"Insufficient balance: ${format_usd(max(available, 0))} available, but a request "
            f"to the custom endpoint `{endpoint_id}` costs ${format_usd(price_nano)}. Top up "
            "the account.",
            should_retry=False,
        )
    return _limit_error(decision, input_tokens, output_cap)


def budget_error(decision: Decision, hold_nano: int) -> GatewayError:
    """429 budget_exceeded (docs/limits-and-balance.md): the real wait when the period resets
    within a minute; otherwise ``x-should-retry: false``. Either way the reset time is in the
    message and in ``x-ratelimit-reset-budget`` (RFC 3339, UTC)."""
    whose = "this API key's" if decision.budget_scope == "key" else "the account's"
    cap, used = decision.budget_cap_nano, decision.budget_used_nano
    resets = iso(decision.budget_reset_ms)
    wait_ms = max(decision.budget_reset_ms - decision.now_ms, 1)
    if hold_nano > cap:
        cure = "more than the whole budget: lower max_tokens."
    else:
        cure = f"it resets at {resets} (in {go_duration(wait_ms)})."
    message = (
        f"Budget exceeded: {whose} budget of ${format_usd(cap)} per period has "
        f"${format_usd(used)} spent or held this period, and this request may cost up to "
        f"${format_usd(hold_nano)}; {cure}"
    )
    headers = {BUDGET_RESET_HEADER: resets}
    if wait_ms <= BUDGET_WAIT_MS and hold_nano <= cap:
        return GatewayError(
            429, "budget_exceeded", message, retry_after_ms=wait_ms, headers=headers
        )
    return GatewayError(429, "budget_exceeded", message, should_retry=False, headers=headers)


def _limit_error(
    decision: Decision, input_tokens: int, output_tokens: int, output: str | None = None
) -> GatewayError:
    """``output_tokens`` is the estimate's output part; ``output`` how to show it."""
    reason = decision.reason
    estimate = input_tokens + output_tokens
    if (refused_key := key_error(reason)) is not None:
        return refused_key
    limits = RateLimitInfo(
        rpm=decision.requests.limit if decision.requests else None,
        tpm=decision.tokens.limit if decision.tokens else None,
    )
    limit = decision.hit_limit or 0
    # A per-model limit (docs/limits-and-balance.md) names itself.
    whose = "your limit"
    if decision.model_pattern is not None:
        whose = f"the {decision.model_scope} limit for models matching `{decision.model_pattern}`"
    if reason == "request_exceeds_limit":
        return GatewayError(
            429,
            reason,
            f"This request needs an estimated {count(estimate, 'token')} ({input_tokens} input "
            f"+ {output or output_tokens} max output), more than {whose} of "
            f"{count(limit, 'token')} per minute can ever allow. Lower max_tokens or shorten "
            "the input.",
            should_retry=False,
            rate_limit=limits,
        )
    wait = f" Please try again in {go_duration(decision.retry_after_ms)}."
    current = "Your current limit is"
    if decision.model_pattern is not None:
        current = (
            f"The {decision.model_scope} limit for models matching `{decision.model_pattern}` is"
        )
    if reason == "rpm_exceeded":
        message = (
            f"Rate limit exceeded. {current} {count(limit, 'request')} per minute "
            f"(approximately {_per_second(limit)}).{wait}"
        )
    elif reason == "tpm_exceeded":
        message = (
            f"Rate limit exceeded. {current} {count(limit, 'token')} per minute; "
            f"this request needs an estimated {count(estimate, 'token')}.{wait}"
        )
    else:
        message = (
            f"Too many concurrent requests. Your current limit is {count(limit, 'request')} in "
            f"flight.{wait}"
        )
    return GatewayError(
        429, reason, message, retry_after_ms=max(decision.retry_after_ms, 1), rate_limit=limits
    )


def pools_exhausted_error(
    exhausted: list[tuple[Destination, Exhausted]], tokens: int
) -> GatewayError:
    """No key of any destination could take the request (docs/upstream-pools.md): 429
    upstream_quota with the soonest real wait, for good when the request is larger than
    every ceiling; 503 upstream_unavailable when every key is unhealthy."""
    waits = [e.retry_after_ms for _, e in exhausted if e.retry_after_ms > 0]
    pools = [d.pool for d, _ in exhausted]
    first, first_why = exhausted[0][0].pool, exhausted[0][1]
    names = ", then ".join(pool.label for pool in pools)
    limits = RateLimitInfo(rpm=first.rpm, tpm=first.tpm) if len(pools) == 1 else None
    if waits:
        wait = f" Please try again in {go_duration(min(waits))}."
        if len(pools) == 1 and first_why.reason == "provider_full":
            message = f"Shared upstream limit reached: {first.label} allows " + _pool_ceiling(
                first.rpm, first.tpm, tokens
            )
        elif len(pools) == 1 and first_why.reason == "all_cooling":
            message = (
                f"Every upstream key of {first.label} is cooling down after the provider's "
                "own rate limit (429)."
            )
        else:
            message = (
                f"Every upstream key of {names} is cooling down after the provider's own "
                "rate limit (429) or at its ceiling for all callers together."
            )
        return GatewayError(
            429, "upstream_quota", message + wait, retry_after_ms=min(waits), rate_limit=limits
        )
    if any(e.reason == "request_exceeds_limit" for _, e in exhausted):
        return GatewayError(
            429,
            "upstream_quota",
            f"This request needs an estimated {count(tokens, 'token')}, more than the "
            f"shared upstream limits of {names} (per minute, for all callers) can ever "
            "allow. Lower max_tokens or shorten the input.",
            should_retry=False,
            rate_limit=limits,
        )
    recheck_ms = min(d.recheck_ms for d, _ in exhausted)
    return GatewayError(
        503,
        "upstream_unavailable",
        f"Every upstream key of {names} was refused by the provider as unauthorized; the "
        f"gateway checks them again every {go_duration(recheck_ms)}. The operator needs to "
        "check the keys.",
        retry_after_ms=recheck_ms,
    )


def _pool_ceiling(rpm: int | None, tpm: int | None, tokens: int) -> str:
    """A pool's own ceiling in words, for all callers together."""
    needs = f"; this request needs an estimated {count(tokens, 'token')}."
    if tpm is None:
        per_second = f" (approximately {_per_second(rpm)})" if rpm is not None else ""
        return f"{count(rpm or 0, 'request')} per minute for all callers together{per_second}."
    if rpm is None:
        return f"{count(tpm, 'token')} per minute for all callers together{needs}"
    return (
        f"{count(rpm, 'request')} and {count(tpm, 'token')} per minute for all callers "
        f"together{needs}"
    )
