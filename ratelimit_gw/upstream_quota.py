"""Upstream quotas (docs/custom-endpoints.md): the rpm/tpm quota of one upstream key, shared by all
accounts.

A provider or custom endpoint with ``rpm``/``tpm`` set is one upstream key shared by every
account on every gateway instance. The gateway spends that quota itself, so it answers
429 ``upstream_quota`` (with the real wait) before the upstream would answer its own 429.

The buckets belong to no account, so they cannot join admit.lua's hash slot: an upstream
quota costs one more storage round trip per request (``lua/upstream_quota.lua``), run just
*before* the account's admission. If the account then refuses, the reservation is refunded,
so a rejected request consumes nothing anywhere; at settlement the tpm bucket is corrected
from the estimate to the real usage, as the account's buckets are. Knows no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from .keyspace import quota_keys
from .settings import CustomEndpoint, Provider
from .storage import Storage


@dataclass(frozen=True, slots=True)
class Quota:
    """One shared upstream key's quota; ``id`` names its buckets in storage."""

    id: str  # "provider:<name>" or "endpoint:<provider_account>/<name>"
    label: str  # how messages name it, e.g. "provider `openai-main`"
    rpm: int | None
    tpm: int | None


@dataclass(frozen=True, slots=True)
class QuotaLevels:
    """What is left in the quota's buckets after a call (None: the quota has no such limit)."""

    rpm: float | None
    tpm: float | None


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The answer of :meth:`UpstreamQuota.reserve`; an allowed one is a reservation."""

    allowed: bool
    reason: str  # "ok", "rpm_exceeded", "tpm_exceeded" or "request_exceeds_limit"
    retry_after_ms: int
    hit_limit: int | None  # the limit that refused
    quota: Quota
    tokens: int  # the estimate reserved (or asked for)
    levels: QuotaLevels


def provider_quota(provider: Provider) -> Quota | None:
    if provider.rpm is None and provider.tpm is None:
        return None
    return Quota(
        f"provider:{provider.name}", f"provider `{provider.name}`", provider.rpm, provider.tpm
    )


def endpoint_quota(endpoint: CustomEndpoint) -> Quota | None:
    if endpoint.rpm is None and endpoint.tpm is None:
        return None
    return Quota(
        f"endpoint:{endpoint.id}", f"custom endpoint `{endpoint.id}`", endpoint.rpm, endpoint.tpm
    )


def _level(text: str) -> float | None:
    return None if text == "" else float(text)


class UpstreamQuota:
    """Spends and gives back upstream quotas in storage."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def _run(self, quota: Quota, mode: str, requests: int, tokens: int) -> list[str]:
        args = [mode, quota.rpm or -1, quota.tpm or -1, requests, tokens]
        reply: list[str] = await self._storage.run("upstream_quota", quota_keys(quota.id), args)
        return reply

    async def reserve(self, quota: Quota, estimated_tokens: int) -> QuotaDecision:
        """Take one request and the token estimate from the quota, or nothing and say why."""
        reply = await self._run(quota, "reserve", 1, estimated_tokens)
        return QuotaDecision(
            allowed=int(reply[0]) == 1,
            reason=str(reply[1]),
            retry_after_ms=int(reply[2]),
            hit_limit=None if int(reply[3]) < 0 else int(reply[3]),
            quota=quota,
            tokens=estimated_tokens,
            levels=QuotaLevels(_level(reply[4]), _level(reply[5])),
        )

    async def refund(self, reservation: QuotaDecision) -> QuotaLevels:
        """Give a reservation back whole: the account refused the request after the quota."""
        reply = await self._run(reservation.quota, "refund", 1, reservation.tokens)
        return QuotaLevels(_level(reply[4]), _level(reply[5]))

    async def correct(self, reservation: QuotaDecision, actual_tokens: int) -> QuotaLevels | None:
        """Settle the tpm bucket to the real usage (refund or extra debit); None: nothing to do."""
        delta = reservation.tokens - actual_tokens
        if reservation.quota.tpm is None or delta == 0:
            return None
        reply = await self._run(reservation.quota, "refund", 0, delta)
        return QuotaLevels(_level(reply[4]), _level(reply[5]))
