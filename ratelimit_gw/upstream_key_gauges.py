"""The key-state gauges of upstream key pools (SPEC §14): each configured key as storage has it.

What :meth:`KeyStateGauges.refresh` promises, for every key of every configured provider
(a single ``api_key_env`` key included: an upstream 401 marks it unhealthy too):

- ``rlgw_upstream_key_state{provider,key,state}`` is 1 for the key's state (``ok``,
  ``cooling``, ``unhealthy``) and 0 for the other two, as one read-only peek of the pool
  (``PoolStore.states``) found it.
- ``rlgw_upstream_key_headroom{provider,key,ceiling}`` is the fraction (0-1) of the key's own
  ``rpm`` or ``tpm`` ceiling left, only for a key that has that ceiling.
- ``rlgw_upstream_attempts_total{provider,key,outcome}`` exists at 0 for every outcome, so
  ``increase()`` sees a key's first failure and the dashboard shows 0, not "no data".
- A key (or a key's ceiling) that a reload removed loses its gauge series; with worker
  processes, whose shared files prometheus_client cannot remove a series from, they turn NaN
  (no value: never 1, so no alert holds on a key that is gone).
- A peek that fails (storage down) leaves the last values; the storage metrics say why.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from prometheus_client import Gauge

from .metrics import UPSTREAM_ATTEMPT_OUTCOMES, UPSTREAM_KEY_STATES, Metrics
from .settings import Provider
from .upstream_pool import KeyState, PoolStore, pool_of

Series = tuple[str, ...]  # a gauge's label values


class KeyStateGauges:
    """Sets the key-state and headroom gauges from storage; remembers which series it made."""

    def __init__(self, metrics: Metrics, pools: PoolStore) -> None:
        self._metrics = metrics
        self._pools = pools
        self._states: set[Series] = set()  # (provider, key, state) series set so far
        self._headroom: set[Series] = set()  # (provider, key, ceiling)

    async def refresh(self, providers: Iterable[Provider]) -> None:
        """Read every pool of ``providers`` (the configuration now) and set the gauges; drop
        the series of keys and ceilings no longer configured first, which needs no storage.
        Raises the first StorageError, leaving the pools not yet read at their last values."""
        pools = [pool_of(provider) for provider in providers if provider.keys]
        self._drop_unconfigured(
            {(p.provider, k.name, s) for p in pools for k in p.keys for s in UPSTREAM_KEY_STATES},
            {
                (p.provider, k.name, ceiling)
                for p in pools
                for k in p.keys
                for ceiling, limit in (("rpm", k.rpm), ("tpm", k.tpm))
                if limit is not None
            },
        )
        for pool in pools:
            for state in await self._pools.states(pool):
                self._show(pool.provider, state)

    def _show(self, provider: str, key: KeyState) -> None:
        for state in UPSTREAM_KEY_STATES:
            # Not metrics.labelled: its cached children outlive a removed series.
            self._metrics.upstream_key_state.labels(provider, key.name, state).set(
                1 if key.state == state else 0
            )
            self._states.add((provider, key.name, state))
        for ceiling, fraction in (("rpm", key.rpm_headroom), ("tpm", key.tpm_headroom)):
            if fraction is not None:
                gauge = self._metrics.upstream_key_headroom.labels(provider, key.name, ceiling)
                gauge.set(fraction)
                self._headroom.add((provider, key.name, ceiling))
        for outcome in UPSTREAM_ATTEMPT_OUTCOMES:
            self._metrics.upstream_attempts.labels(provider, key.name, outcome)

    def _drop_unconfigured(self, states: set[Series], headroom: set[Series]) -> None:
        for series in self._states - states:
            _drop(self._metrics.upstream_key_state, series)
        for series in self._headroom - headroom:
            _drop(self._metrics.upstream_key_headroom, series)
        self._states &= states
        self._headroom &= headroom


def _drop(gauge: Gauge, series: Series) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        gauge.labels(*series).set(math.nan)  # remove() is not implemented across processes
    else:
        gauge.remove(*series)
