"""Brings upstream keys back to health (SPEC §14), and keeps the key-state gauges current.

An upstream 401 marks a pool key unhealthy (``PoolStore.mark_unhealthy``): no request picks it
again until a probe finds it answers. What :class:`UpstreamProbe` promises, in every gateway
process:

- Every :data:`TICK_S` it reads which keys of each configured provider are unhealthy. Each
  such key is probed at most once per its provider's ``probe_interval_s`` across every gateway
  instance: the instance whose claim in storage succeeds probes it (the claim expires by
  itself). The first probe follows the 401 within a tick.
- A probe is a free request: ``GET`` of the protocol's model list, with that key's own
  credential and the provider's headers. A 2xx marks the key healthy, for every instance at
  once. Anything else (401, 403, another status, a time-out, no connection) leaves it
  unhealthy until the next interval. A probe connects within the provider's
  ``connect_timeout_s`` and ends within ``min(timeout_s, PROBE_TIMEOUT_S)``.
- It reads the configuration at each tick: a key a reload removed is no longer probed (its
  stored mark is left alone), a key it added is.
- Every :data:`STATE_REFRESH_S` it refreshes the key-state gauges (upstream_key_gauges.py).
- Storage failing only delays it, logged at most once per :data:`FAILURE_LOG_INTERVAL_S`;
  an unexpected error is logged as well and never ends the loop.
- Logs name the provider, the key and the URL (without query or user info), never a secret.

Custom endpoints have no model list to ask for free: their keys are not probed here (a key an
upstream 401 marks unhealthy cools down for ``probe_interval_s`` instead).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial

from .itinerary import key_headers
from .protocols import ADAPTERS
from .relay import shown_url
from .settings import Provider, UpstreamKey
from .storage import StorageError
from .upstream_client import UpstreamClient, UpstreamError
from .upstream_key_gauges import KeyStateGauges
from .upstream_pool import PoolStore, pool_of

log = logging.getLogger("ratelimit_gw.upstream")

TICK_S = 1.0  # how soon a key marked unhealthy is first probed; one SMEMBERS per provider
STATE_REFRESH_S = 5.0  # how old the key-state gauges may be; one peek script per provider
PROBE_TIMEOUT_S = 10.0  # a model list answers in well under a second; no need to wait longer
FAILURE_LOG_INTERVAL_S = 60.0


def probe_request(provider: Provider, key: UpstreamKey) -> tuple[str, dict[str, str]]:
    """The URL and headers of the probe of ``key``: what the protocol's upstream requires,
    then the provider's own headers, then the key's credential (over any the provider's
    headers carry), each replacing an earlier header of the same name in any letter case."""
    adapter = ADAPTERS[provider.protocol]
    headers: dict[str, str] = {}
    for layer in (
        adapter.upstream_required_headers,
        provider.upstream_headers,
        key_headers(key),
    ):
        for name, value in layer.items():
            for same in [n for n in headers if n.lower() == name.lower()]:
                del headers[same]
            headers[name] = value
    return adapter.models_url(provider.base_url), headers


async def probe_status(client: UpstreamClient, provider: Provider, key: UpstreamKey) -> int:
    """The status the provider's model list answers ``key`` with. Raises TimeoutError or
    UpstreamError when there is no answer in time."""
    url, headers = probe_request(provider, key)
    timeout_s = min(provider.timeout_s, PROBE_TIMEOUT_S)
    deadline = asyncio.get_running_loop().time() + timeout_s
    response = await client.request(
        "GET", url, headers, b"", connect_timeout_s=provider.connect_timeout_s, deadline=deadline
    )
    response.release()  # the status is the answer; an unread body only closes the connection
    return response.status


class UpstreamProbe:
    """One process's probe loop: :meth:`run` until :meth:`stop` (or cancelled)."""

    def __init__(
        self,
        providers: Callable[[], Iterable[Provider]],
        pools: PoolStore,
        client: UpstreamClient,
        gauges: KeyStateGauges,
    ) -> None:
        self._providers = providers  # the configuration now: read at every tick
        self._pools = pools
        self._client = client
        self._gauges = gauges
        self._running = True  # until stop(), even one called before run() starts
        self._probing: dict[tuple[str, str], asyncio.Task[None]] = {}  # (provider, key)
        self._next_refresh = 0.0  # monotonic
        self._quiet_until = 0.0  # no failure logged before this (monotonic)

    async def run(self) -> None:
        try:
            while self._running:
                providers = list(self._providers())
                await self._guarded("reading unhealthy upstream keys", self._probe_due(providers))
                if time.monotonic() >= self._next_refresh:
                    self._next_refresh = time.monotonic() + STATE_REFRESH_S
                    await self._guarded(
                        "reading upstream key states", self._gauges.refresh(providers)
                    )
                await asyncio.sleep(TICK_S)
        finally:
            probes = list(self._probing.values())
            for probe in probes:
                probe.cancel()
            if probes:
                await asyncio.wait(probes)

    def stop(self) -> None:
        """End :meth:`run` at its next turn (as ``KeyCache.stop_following``: shutdown calls
        it before cancelling, in case a storage client swallows the cancellation)."""
        self._running = False

    async def _guarded(self, doing: str, step: Awaitable[None]) -> None:
        try:
            await step
        except StorageError as exc:
            self._log_failure(logging.INFO, "%s failed (%s); trying again", doing, exc)
        except Exception:  # never stop over a bug: unhealthy keys would stay out for good
            self._log_failure(logging.ERROR, "%s failed", doing, exc_info=True)

    def _log_failure(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + FAILURE_LOG_INTERVAL_S
            log.log(level, message, *args, exc_info=exc_info)

    async def _probe_due(self, providers: list[Provider]) -> None:
        """Start a probe of every unhealthy configured key this instance claims."""
        for provider in providers:
            if not provider.keys:
                continue
            pool = pool_of(provider)
            unhealthy = await self._pools.unhealthy(pool)
            for key in provider.keys:
                if key.name not in unhealthy or (provider.name, key.name) in self._probing:
                    continue
                interval_ms = int(provider.probe_interval_s * 1000)
                if await self._pools.claim_probe(pool, key.name, interval_ms):
                    held = (provider.name, key.name)
                    self._probing[held] = task = asyncio.create_task(self._probe(provider, key))
                    task.add_done_callback(partial(self._probe_done, held))

    def _probe_done(self, held: tuple[str, str], task: asyncio.Task[None]) -> None:
        del self._probing[held]
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "probing upstream key %s of %s failed", held[1], held[0], exc_info=task.exception()
            )

    async def _probe(self, provider: Provider, key: UpstreamKey) -> None:
        url = shown_url(probe_request(provider, key)[0])
        try:
            status = await probe_status(self._client, provider, key)
        except TimeoutError:
            outcome = "timed out"
        except UpstreamError as exc:
            outcome = f"failed ({exc})"
        else:
            outcome = f"answered {status}"
            if 200 <= status < 300:
                try:
                    await self._pools.mark_healthy(pool_of(provider), key.name)
                except StorageError as exc:
                    outcome += f", but the key could not be marked healthy ({exc})"
                else:
                    log.info(
                        "upstream key %s of %s is healthy again: its probe (GET %s) %s",
                        key.name,
                        provider.name,
                        url,
                        outcome,
                    )
                    return
        log.info(
            "upstream key %s of %s still unhealthy: its probe (GET %s) %s; probing again in %gs",
            key.name,
            provider.name,
            url,
            outcome,
            provider.probe_interval_s,
        )
