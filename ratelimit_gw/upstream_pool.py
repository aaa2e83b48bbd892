"""Upstream key pools (SPEC §14): which of a provider's upstream keys serves the next attempt.

Promises, on every gateway instance alike (the state is in storage, never in a process):

- :meth:`PoolStore.pick` takes a key that is healthy, not cooling down, and whose own rpm/tpm
  ceilings and the provider's both have room for the request — the one with the most
  headroom, ties in turn — and reserves those ceilings in the same atomic step
  (``lua/pool_pick.lua``). No key ever serves more than its ceiling, nor the pool more than
  the provider's, however many instances pick at once.
- When none can be picked, :class:`Exhausted` says why and the soonest real time a key frees
  up (a cool-down ending, a bucket refilling enough for this request).
- A failed attempt gives its reservation back (:meth:`PoolStore.refund`); settlement corrects
  the token reservation to the real usage the same way.
- An upstream 429 cools a key down for the upstream's hint (:meth:`PoolStore.cool_down`; the
  marker expires by itself); a 401 marks it unhealthy until a probe marks it healthy
  (upstream_probe.py), which one instance per interval claims (:meth:`PoolStore.claim_probe`).

Knows no HTTP: a :class:`Pool` (:func:`pool_of` a provider) is what it needs of one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from .keyspace import PoolKeys
from .settings import Provider
from .storage import Storage

KeyStateName = Literal["ok", "cooling", "unhealthy"]
ExhaustedReason = Literal[
    "all_unhealthy",
    "all_cooling",
    "all_full",
    "provider_full",
    "request_exceeds_limit",
    "all_tried",  # every key was tried by this request already (not the script's)
]


@dataclass(frozen=True, slots=True)
class PoolKey:
    """One upstream key of a pool: its name (in storage, metrics and logs; never the secret)
    and its own ceilings at the provider (None: none)."""

    name: str
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class Pool:
    """A provider's upstream keys, and the provider's own ceiling shared by all of them."""

    provider: str  # the provider's name, or a custom endpoint's id: names it in storage
    keys: tuple[PoolKey, ...]
    rpm: int | None = None
    tpm: int | None = None
    label: str = ""  # how messages name it, e.g. "provider `openai-main`"

    @property
    def needs_storage(self) -> bool:
        """Whether picking needs storage: more than one key to choose from, or a ceiling."""
        return (
            len(self.keys) > 1
            or self.rpm is not None
            or self.tpm is not None
            or any(key.rpm is not None or key.tpm is not None for key in self.keys)
        )

    def key(self, name: str) -> PoolKey:
        for key in self.keys:
            if key.name == name:
                return key
        raise KeyError(f"pool {self.provider!r} has no key {name!r}")


def pool_of(provider: Provider) -> Pool:
    """A provider's pool: its keys with their ceilings; its own rpm/tpm for the whole pool."""
    keys = tuple(PoolKey(key.name, key.rpm, key.tpm) for key in provider.keys)
    return Pool(provider.name, keys, provider.rpm, provider.tpm, f"provider `{provider.name}`")


@dataclass(frozen=True, slots=True)
class Picked:
    """A key picked and its ceilings reserved (give them back with :meth:`PoolStore.refund`
    if the attempt fails)."""

    key_name: str
    headroom: float  # the key's min(rpm, tpm) fraction left before this reservation


@dataclass(frozen=True, slots=True)
class Exhausted:
    """No key can take the request now; ``retry_after_ms`` is the soonest one frees up (0 when
    waiting cannot help: every key unhealthy, or the request larger than every ceiling)."""

    retry_after_ms: int
    reason: ExhaustedReason


@dataclass(frozen=True, slots=True)
class KeyState:
    """One key as metrics show it; headroom fractions are None for a key without that ceiling."""

    name: str
    state: KeyStateName
    cooling_until_ms: int  # Redis time, epoch ms; 0 when not cooling
    rpm_headroom: float | None
    tpm_headroom: float | None


def _ceiling(limit: int | None) -> int:
    return -1 if limit is None else limit


def _fraction(text: str) -> float | None:
    return None if text == "" else float(text)


class PoolStore:
    """Picks, refunds and marks the keys of upstream pools in storage."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def _run(
        self, mode: str, pool: Pool, keys: tuple[PoolKey, ...], requests: int, tokens: int
    ) -> list[str]:
        args: list[str | int] = [mode, requests, tokens, _ceiling(pool.rpm), _ceiling(pool.tpm)]
        for key in keys:
            args += [key.name, _ceiling(key.rpm), _ceiling(key.tpm)]
        script_keys = PoolKeys(pool.provider).script_keys([key.name for key in keys])
        reply: list[str] = await self._storage.run("pool_pick", script_keys, args)
        return reply

    async def pick(
        self, pool: Pool, tokens: int, skip: frozenset[str] = frozenset()
    ) -> Picked | Exhausted:
        """Pick a key for one request of ``tokens`` (estimated) and reserve its ceilings;
        ``skip``: keys this request already tried (a failover does not go back to them)."""
        keys = tuple(key for key in pool.keys if key.name not in skip) if skip else pool.keys
        if not keys:
            return Exhausted(retry_after_ms=0, reason="all_tried")
        reply = await self._run("pick", pool, keys, 1, tokens)
        if int(reply[0]) == 1:
            return Picked(key_name=str(reply[1]), headroom=float(reply[4]))
        reason: ExhaustedReason = reply[2]  # type: ignore[assignment]  # the script's contract
        return Exhausted(retry_after_ms=int(reply[3]), reason=reason)

    async def refund(self, pool: Pool, key_name: str, requests: int, tokens: int) -> None:
        """Give ``requests`` and ``tokens`` back to the key and the pool, never above their
        ceilings: ``(1, estimate)`` for a failed attempt; ``(0, estimate - actual)`` to settle
        the tpm reservation to the real usage (negative: an extra debit)."""
        if requests == 0 and tokens == 0:
            return
        await self._run("refund", pool, (pool.key(key_name),), requests, tokens)

    async def cool_down(self, pool: Pool, key_name: str, ms: int) -> None:
        """Skip the key for ``ms`` on every instance (an upstream 429 and its retry hint).
        The latest hint wins: an upstream's newer answer is the better guess."""
        pool.key(key_name)  # a name outside the pool is a caller's bug, not a new key
        await self._storage.call(
            "SET", PoolKeys(pool.provider).cooling(key_name), 1, "PX", max(ms, 1)
        )

    async def mark_unhealthy(self, pool: Pool, key_name: str) -> None:
        """Skip the key until :meth:`mark_healthy` (an upstream 401; a probe brings it back)."""
        pool.key(key_name)
        keys = PoolKeys(pool.provider)
        # With the time of the mark, set once per episode: its webhook event's name.
        since_ms = int(time.time() * 1000)
        await self._storage.call_many(
            [
                ("SADD", keys.unhealthy, key_name),
                ("SET", keys.unhealthy_since(key_name), since_ms, "NX"),
            ],
            atomic=True,
        )

    async def mark_healthy(self, pool: Pool, key_name: str) -> None:
        pool.key(key_name)
        keys = PoolKeys(pool.provider)
        await self._storage.call_many(
            [("SREM", keys.unhealthy, key_name), ("DEL", keys.unhealthy_since(key_name))],
            atomic=True,
        )

    async def unhealthy_since(self, pool: Pool, key_names: list[str]) -> dict[str, int]:
        """When each of these keys was marked unhealthy (ms); 0 for one marked without the
        time (by an older build)."""
        if not key_names:
            return {}
        keys = PoolKeys(pool.provider)
        found = await self._storage.call_many(
            [("GET", keys.unhealthy_since(name)) for name in key_names]
        )
        return {name: int(ms or 0) for name, ms in zip(key_names, found, strict=True)}

    async def unhealthy(self, pool: Pool) -> set[str]:
        """The names an upstream 401 marked unhealthy, as stored: a name the pool no longer
        has (removed by a reload) is the caller's to ignore."""
        names = await self._storage.call("SMEMBERS", PoolKeys(pool.provider).unhealthy)
        return {str(name) for name in names}

    async def claim_probe(self, pool: Pool, key_name: str, ms: int) -> bool:
        """Whether this instance probes the key now: True for one caller per ``ms`` across
        every instance, until the claim expires by itself."""
        pool.key(key_name)
        claimed = await self._storage.call(
            "SET", PoolKeys(pool.provider).probe(key_name), 1, "NX", "PX", max(ms, 1)
        )
        return bool(claimed)  # redis-py: True when set, None when someone holds the claim

    async def states(self, pool: Pool) -> list[KeyState]:
        """Every key's state and headroom now, in the pool's order; writes nothing."""
        reply = await self._run("peek", pool, pool.keys, 0, 0)
        return [
            KeyState(
                name=str(reply[i]),
                state=reply[i + 1],  # type: ignore[arg-type]  # the script's contract
                cooling_until_ms=int(reply[i + 2]),
                rpm_headroom=_fraction(reply[i + 3]),
                tpm_headroom=_fraction(reply[i + 4]),
            )
            for i in range(0, len(reply), 5)
        ]
