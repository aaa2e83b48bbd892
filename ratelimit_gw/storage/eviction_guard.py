"""Redis must not evict: every master's ``maxmemory-policy`` is checked.

A Redis that evicts under memory pressure deletes keys without a trace: accounts, API keys
and prepaid balances vanish, and their keys answer 401. What this module promises:

- At start-up, before the gateway listens, a master whose policy is anything but
  ``noeviction`` stops it with :class:`EvictionPolicyError` (the node, the policy, the way
  out), unless ``storage.allow_eviction = true``. A policy that cannot be read (``unknown``)
  is a warning, not a refusal; storage that cannot be reached is no refusal either (``/readyz``
  reports it) and is checked again.
- Every ``storage.eviction_check_interval_s`` the policies are read again (a sentinel failover
  or a CONFIG SET can change them): ``rlgw_storage_eviction_policy{policy}`` counts the masters
  per policy, and each master that turns to anything but ``noeviction`` is logged as a
  warning. A running gateway never stops or turns unready for it: one Redis setting must not
  take every replica out of the load balancer; the alert ``RlgwRedisMayEvict`` reports it.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from ..metrics import Metrics, labelled
from ..settings import ConfigError, StorageSettings
from .backends import open_storage
from .front import Storage, StorageError

log = logging.getLogger("ratelimit_gw.storage")

SAFE_POLICY = "noeviction"
UNKNOWN_POLICY = "unknown"
# Redis's own values; a reply outside them (an odd server or proxy) counts as unknown.
REDIS_POLICIES = (
    SAFE_POLICY,
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
)


class EvictionPolicyError(ConfigError):
    """A Redis master may evict keys and ``storage.allow_eviction`` is not set."""


class EvictionGuard:
    """Reads the masters' policies for one app: at start-up, then in :meth:`watch`."""

    def __init__(self, storage: Storage, settings: StorageSettings, metrics: Metrics) -> None:
        self._storage = storage
        self._settings = settings
        self._metrics = metrics
        self._policies: dict[str, str] = {}  # the last reading, by node

    async def check_at_startup(self) -> None:
        policies = await _read(self._storage, self._settings)
        if policies is not None:
            _refuse_eviction(policies, self._settings)
            self._record(policies)

    async def watch(self) -> None:
        """Read the policies again every interval, until cancelled."""
        while True:
            await asyncio.sleep(self._settings.eviction_check_interval_s)
            policies = await _read(self._storage, self._settings)
            if policies is not None:
                self._record(policies)

    def _record(self, policies: dict[str, str]) -> None:
        if not policies:
            return  # memory://: no Redis, nothing to report
        # Every policy is set, zeros included: a master that changed policy leaves no stale 1.
        counts = collections.Counter(policies.values())
        for policy in (*REDIS_POLICIES, UNKNOWN_POLICY):
            labelled(self._metrics.eviction_policy, policy).set(counts[policy])
        for node, policy in sorted(policies.items()):
            if self._policies.get(node, SAFE_POLICY) != policy:
                _log_policy(node, policy, self._settings.allow_eviction)
        self._policies = policies


async def check_before_serving(settings: StorageSettings) -> None:
    """The start-up refusal on a storage of its own: ``serve --workers`` runs it once, before
    the workers start, so a refusal is one message and a failed command, not one per worker."""
    storage = open_storage(settings)
    try:
        policies = await _read(storage, settings)
    finally:
        await storage.close()
    if policies is not None:
        _refuse_eviction(policies, settings)


async def _read(storage: Storage, settings: StorageSettings) -> dict[str, str] | None:
    """Every master's policy (``unknown`` where it cannot be read); None while storage is
    unreachable (``/readyz`` and the storage metrics already say so)."""
    try:
        found = await storage.eviction_policies()
    except StorageError as exc:
        log.info(
            "maxmemory-policy not checked (%s); checking again in %gs",
            exc,
            settings.eviction_check_interval_s,
        )
        return None
    return {
        node: policy if policy in REDIS_POLICIES else UNKNOWN_POLICY
        for node, policy in found.items()
    }


def _refuse_eviction(policies: dict[str, str], settings: StorageSettings) -> None:
    if settings.allow_eviction:
        return
    for node, policy in sorted(policies.items()):
        if policy not in (SAFE_POLICY, UNKNOWN_POLICY):
            raise EvictionPolicyError(
                f"storage.url: Redis {node} has maxmemory-policy {policy}: when its memory "
                "fills it deletes keys, and with them accounts, API keys and balances. Set "
                "maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction, and in "
                "redis.conf), or set storage.allow_eviction = true to accept the risk"
            )


def _log_policy(node: str, policy: str, allowed: bool) -> None:
    if policy == SAFE_POLICY:
        log.info("Redis %s has maxmemory-policy noeviction again", node)
    elif policy == UNKNOWN_POLICY:
        log.warning(
            "cannot read maxmemory-policy of Redis %s (CONFIG GET and INFO memory refused): "
            "make sure it is noeviction, or keys, accounts and balances may vanish",
            node,
        )
    else:
        log.warning(
            "Redis %s has maxmemory-policy %s: when its memory fills it deletes keys, "
            "accounts and balances%s",
            node,
            policy,
            " (storage.allow_eviction = true)"
            if allowed
            else "; set it to noeviction (CONFIG SET maxmemory-policy noeviction)",
        )
