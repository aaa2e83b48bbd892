"""One request's walk over its itinerary's upstream keys (docs/upstream-pools.md).

What it promises:

- Each attempt's key is picked, and its ceilings reserved, in one atomic storage step shared
  by every gateway instance (``upstream_pool.py``); the first at admission, before the
  account's own limits, so a request no key can take is refused before it holds anything.
- An attempt the upstream refused (429, 401, 5xx) or that failed before any answer (time-out,
  connection) is charged nothing: its ceiling reservation is given back, and the key is
  marked for everyone: a 429 cools it down for the upstream's own retry hint, a 401 makes it
  unhealthy until a probe brings it back (a custom endpoint's cools down instead).
- The next attempt goes to another key of the same pool, then to the fallbacks in order,
  never to a key this request already tried, and never beyond ``max_attempts``. Nothing
  else (a 2xx, a 403, any other 4xx) is retried, and neither is anything once a byte of it
  reached the caller: the caller decides by the status line alone, before relaying.
- A request with a single key, no ceilings and no fallback is not tracked: it makes one
  attempt with no storage step; only an upstream 401 is recorded (for the metrics and the
  alert).

Knows no HTTP beyond the status line and the retry hint: metering.py relays.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDict

from .itinerary import Destination, Itinerary
from .metrics import Metrics, labelled
from .protocols import ADAPTERS
from .rejections import pools_exhausted_error
from .relay import RefusedAnswer
from .storage import StorageError
from .upstream_pool import Exhausted, Picked, Pool, PoolStore

log = logging.getLogger("ratelimit_gw.upstream")
_ANY_PROTOCOL = ADAPTERS["openai"]  # a custom endpoint's hint: the standard headers only


def failure_of(status: int) -> str | None:
    """The attempt outcome an upstream status means when another key may do better; None
    for an answer the caller gets whatever is left (a 2xx; a 403 or another 4xx: a request
    error, often per model or region, not the key's fault)."""
    if status == 429:
        return "rate_limited"
    if status == 401:
        return "unauthorized"
    if status >= 500:
        return "server_error"
    return None


@dataclass(frozen=True, slots=True)
class PoolReservation:
    """What the answering attempt reserved, for settlement to correct to the real usage."""

    pool: Pool
    key: str
    tokens: int


class Failover:
    """Which key each attempt of one request uses, and what a failed attempt leaves behind.

    The current attempt is ``destination`` (the ``index``-th of the itinerary) with its
    pool's ``key``; ``reserved``: its ceilings are reserved in storage, and given back if
    it fails.
    """

    __slots__ = (
        "_metrics",
        "_pools",
        "_tried",
        "attempts",
        "destination",
        "index",
        "itinerary",
        "key",
        "reserved",
        "tokens",
    )

    def __init__(
        self, itinerary: Itinerary, tokens: int, pools: PoolStore, metrics: Metrics
    ) -> None:
        self.itinerary = itinerary
        self.tokens = tokens  # the request's estimate, reserved from the tpm ceilings
        self._pools = pools
        self._metrics = metrics
        # Until a pick says otherwise (untracked, or storage bypassed): the first key.
        self.destination = itinerary.destinations[0]
        self.index = 0
        self.key = itinerary.first_key
        self.reserved = False
        self.attempts = 1
        self._tried: set[tuple[int, str]] | None = None

    @property
    def pool(self) -> Pool:
        return self.destination.pool

    async def pick_first(self) -> None:
        """At admission: pick and reserve the first attempt's key, or raise the 429 (every
        key cooling or at its ceiling, with the soonest real wait) or 503 (every key
        unhealthy) to answer. Untracked itineraries make no storage step."""
        if not self.itinerary.tracked:
            return
        exhausted = await self._pick(0)
        if exhausted:
            raise pools_exhausted_error(exhausted, self.tokens)

    async def give_back(self) -> None:
        """The account refused the request after its key was picked: nothing was used."""
        if self.reserved:
            await self._pools.refund(self.pool, self.key, 1, self.tokens)
            self.reserved = False

    def reservation(self) -> PoolReservation | None:
        """The answering attempt's reservation, for settlement's tpm correction; None when
        nothing is reserved or no ceiling counts tokens."""
        if not self.reserved:
            return None
        pool = self.pool
        if pool.tpm is None and pool.key(self.key).tpm is None:
            return None
        return PoolReservation(pool, self.key, self.tokens)

    def answered(self) -> None:
        self._count("answered")

    async def failed(self, outcome: str, refused: RefusedAnswer | None = None) -> None:
        """The current attempt failed (``outcome``, see :func:`failure_of`; or ``timeout`` /
        ``unreachable``): mark its key for every instance, give its reservation back.
        A storage failure here is logged, not raised: the caller's answer does not depend
        on it (a key not cooled is tried again, and refused again)."""
        self._count(outcome)
        pool, key = self.pool, self.key
        if self._tried is None:
            self._tried = set()
        self._tried.add((self.index, key))
        try:
            if outcome == "rate_limited" and self.itinerary.tracked:
                wait_ms = self._retry_hint_ms(refused)
                await self._pools.cool_down(pool, key, wait_ms)
                log.info(
                    "upstream %s key %s answered 429: cooling down for %.3g s",
                    pool.provider,
                    key,
                    wait_ms / 1000,
                )
            elif outcome == "unauthorized":
                await self._unauthorized()
            if self.reserved:
                self.reserved = False
                await self._pools.refund(pool, key, 1, self.tokens)
        except StorageError as exc:
            log.warning(
                "recording the failed attempt on upstream %s key %s failed: %s",
                pool.provider,
                key,
                exc,
            )

    async def move_on(self) -> bool:
        """Pick the next attempt's key after a failure: another key of the same pool, then
        the fallbacks. False when ``max_attempts`` is spent, nothing is left to try, or
        storage cannot say (the caller then gets the last upstream error)."""
        if not self.itinerary.tracked or self.attempts >= self.itinerary.max_attempts:
            return False
        failed_pool, failed_key = self.pool.provider, self.key
        try:
            exhausted = await self._pick(self.index)
        except StorageError as exc:
            log.warning("picking another upstream key failed, no failover: %s", exc)
            return False
        if exhausted:
            return False
        self.attempts += 1
        log.info(
            "upstream %s key %s failed; attempt %d goes to %s key %s",
            failed_pool,
            failed_key,
            self.attempts,
            self.pool.provider,
            self.key,
        )
        return True

    async def _pick(self, start: int) -> list[tuple[Destination, Exhausted]]:
        """Pick from the destinations from ``start`` on and make it the current attempt;
        what each said instead when none could be picked (empty: picked)."""
        exhausted: list[tuple[Destination, Exhausted]] = []
        destinations = self.itinerary.destinations
        tried = self._tried or ()
        for index in range(start, len(destinations)):
            destination = destinations[index]
            skip = frozenset(key for i, key in tried if i == index)
            picked = await self._pools.pick(destination.pool, self.tokens, skip)
            if isinstance(picked, Picked):
                self.destination, self.index = destination, index
                self.key, self.reserved = picked.key_name, True
                return []
            exhausted.append((destination, picked))
        return exhausted

    async def _unauthorized(self) -> None:
        destination, key = self.destination, self.key
        pool = destination.pool
        if destination.probed:
            await self._pools.mark_unhealthy(pool, key)
            log.warning(
                "upstream %s refused key %s as unauthorized (401): marked unhealthy until a "
                "probe succeeds (every %.3g s); check the key",
                pool.provider,
                key,
                destination.recheck_ms / 1000,
            )
        elif self.itinerary.tracked:
            await self._pools.cool_down(pool, key, destination.recheck_ms)
            log.warning(
                "custom endpoint %s refused key %s as unauthorized (401): skipped for %.3g s; "
                "check the key",
                pool.provider,
                key,
                destination.recheck_ms / 1000,
            )

    def _retry_hint_ms(self, refused: RefusedAnswer | None) -> int:
        destination = self.destination
        if refused is None:
            return destination.cooldown_default_ms
        provider = destination.provider
        adapter = ADAPTERS[provider.protocol] if provider is not None else _ANY_PROTOCOL
        headers: Mapping[str, str] = CIMultiDict(refused.headers)
        hint = adapter.retry_hint_ms(headers, refused.body)
        return destination.cooldown_default_ms if hint is None else hint

    def _count(self, outcome: str) -> None:
        counter = self._metrics.upstream_attempts
        labelled(counter, self.destination.pool.provider, self.key, outcome).inc()
