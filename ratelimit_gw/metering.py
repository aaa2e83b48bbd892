"""One request's admit → relay → settle, around one :class:`MeteredRequest`.

Every metered route (the native routes, the converters, the custom endpoints) parses and
prices its request into a ``MeteredRequest``, then calls :meth:`~MeteredRequest.admit` and
:meth:`~MeteredRequest.relay`; this module owns what happens between: the upstream key and
its ceilings (``failover.py``), the account's limits and balance, the upstream attempts, and
the settlement of what the answering attempt used.

What it promises: a request refused anywhere consumes nothing anywhere; an admitted request
is settled exactly once (whatever the relay's outcome: answered, refused upstream, cut, or
the client gone), unless storage was bypassed and nothing was held; an admission its caller
gave up on is released through the settler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .context import RequestContext, own_headers
from .errors import GatewayError
from .failover import Failover, failure_of
from .itinerary import Destination, Itinerary
from .keys import KeyRecord
from .limiter import AdmissionRequest, Decision, Settlement
from .metrics import labelled
from .protocols import Usage
from .rejections import per_request_rejection_error, rejection_error
from .relay import RelayResult, UpstreamCall, failed_before_answer
from .services import Services
from .settings import Model
from .storage import StorageError
from .worst_case import Hold, protects_money, usage_cost_nano

log = logging.getLogger("ratelimit_gw.storage")
# A hold outlives the longest upstream call by this much before a sweep may release it.
HOLD_MARGIN_MS = 60_000
# The most tokens one count of an upstream's usage report is believed (a protobuf int32).
MAX_REPORTED_TOKENS = 2**31 - 1


@dataclass(slots=True)
class MeteredRequest:
    """One request on its way through admission, the upstream and settlement.

    Priced by ``model`` (its usage at the model's prices), or, with no model, charged the
    hold's price whole (a custom endpoint's per-request price).
    """

    ctx: RequestContext  # carries the decision, for the answer's headers and the access log
    key: KeyRecord
    hold: Hold  # the worst case held, its token-bucket estimate and its output cap
    model: Model | None
    charged_as: str  # the model the ledger names: the model's id, or the endpoint's
    itinerary: Itinerary  # where its upstream attempts may go
    failover: Failover | None = None  # set by admit: the key each attempt uses

    @property
    def decision(self) -> Decision | None:
        return self.ctx.decision

    def upstream_output_cap(self) -> int | None:
        """The cap to send upstream when the caller's body gives none: whatever the hold
        assumed is what the upstream is allowed (docs/limits-and-balance.md); metered accounts
        keep their bytes."""
        return self.hold.output_cap if protects_money(self.ctx.decision) else None

    async def admit(self, svc: Services) -> None:
        """The first attempt's upstream key and its ceilings (docs/upstream-pools.md), then
        the account's limits and balance (docs/limits-and-balance.md).

        Picking a key is one more storage round trip, before admit.lua, unless there is
        nothing to pick (one key, no ceilings, no fallback); if the account then refuses, the
        key's reservation is given back, so a rejected request consumes nothing anywhere.
        Raises the 429/402/401 (or 503: every upstream key unhealthy) to answer. An
        admission whose caller gives up on it (cancelled, or a storage failure after the call
        was sent) is released through the settler, whether or not it ran.

        Storage failing raises StorageError (503), unless ``storage.on_error = "allow"``
        (docs/failure-modes.md): then the request goes on without limits or balance,
        ``ctx.storage_bypassed`` is set (it is not settled: nothing was held) and it is
        counted and logged.
        """
        admission = AdmissionRequest(
            account_id=self.key.account,
            key_id=self.key.id,
            request_id=self.ctx.settlement_id,
            estimated_tokens=self.hold.tokens,
            hold_nano=self.hold.nano,
            # Holds and leases outlive every upstream attempt: only a dead gateway's expire.
            ttl_ms=int(self.itinerary.hold_ttl_s * 1000) + HOLD_MARGIN_MS,
            model=self.charged_as,
        )
        self.failover = Failover(self.itinerary, self.hold.tokens, svc.pools, svc.metrics)
        try:
            await self._admit(svc, admission)
            return
        except StorageError as exc:
            if svc.config.settings.storage.on_error != "allow":
                raise
            failure = exc
        self.ctx.storage_bypassed = True
        svc.metrics.storage_bypass.inc()
        log.warning(
            "storage failed; serving %s for account %s without limits or balance "
            '(storage.on_error = "allow"): %s',
            self.ctx.request_id,
            admission.account_id,
            failure,
        )

    async def _admit(self, svc: Services, admission: AdmissionRequest) -> None:
        ctx = self.ctx
        failover = self.failover
        assert failover is not None  # set by admit
        await failover.pick_first()
        try:
            try:
                decision = await svc.limiter.admit(admission)
            except asyncio.CancelledError:
                # The client hung up (or shutdown cut the handler) while admit.lua was on its
                # way: it runs anyway, and nobody would settle what it places before its TTL.
                release = admission.abandoned(ctx.model, ctx.request_id)
                svc.settler.abandon(release, "client_disconnect")
                raise
            except StorageError as exc:
                if not exc.never_sent:  # it may have run, its reply lost
                    release = admission.abandoned(ctx.model, ctx.request_id)
                    svc.settler.abandon(release, "storage_error")
                raise
            ctx.decision = decision
            if decision.holds_expired:
                labelled(svc.metrics.holds, "expired").inc(decision.holds_expired)
            if not decision.allowed:
                raise self._refusal(decision)
        except BaseException:
            with contextlib.suppress(StorageError):  # the error being raised says more
                await failover.give_back()
            raise
        if admission.hold_nano:  # admit.lua records a hold on every account, prepaid or not
            labelled(svc.metrics.holds, "placed").inc()

    def _refusal(self, decision: Decision) -> GatewayError:
        hold = self.hold
        if self.model is not None:
            return rejection_error(decision, self.model, hold)
        return per_request_rejection_error(
            decision, self.charged_as, hold.estimated_input_tokens, hold.output_cap, hold.nano
        )

    async def relay(
        self,
        svc: Services,
        request: web.Request,
        upstream_call: Callable[[Destination, str], UpstreamCall],
    ) -> web.StreamResponse:
        """Make the upstream attempts (``upstream_call`` builds one for a destination and a
        key name) and relay the answer, then settle what the request used, however it ended
        (building a call included: a body that cannot be sent is settled too)."""
        result = RelayResult()
        failover = self.failover
        if failover is None:  # admit was not called: nothing held, one attempt as configured
            failover = self.failover = Failover(self.itinerary, 0, svc.pools, svc.metrics)
        try:
            return await self._attempts(svc, request, upstream_call, failover, result)
        except asyncio.CancelledError:
            result.outcome = "client_disconnect"  # the handler is cancelled when the client leaves
            raise
        finally:
            if result.outcome == "pending":
                result.outcome = "upstream_error"
            self._settle(svc, result)

    async def _attempts(
        self,
        svc: Services,
        request: web.Request,
        upstream_call: Callable[[Destination, str], UpstreamCall],
        failover: Failover,
        result: RelayResult,
    ) -> web.StreamResponse:
        """Attempts until one answers, or none is left (failover.py): decided by each
        answer's status line, before any of it reaches the caller."""
        relay, own = svc.relay, own_headers(self.ctx)
        while True:
            call = upstream_call(failover.destination, failover.key)
            try:
                upstream = await relay.open(call, result)
            except GatewayError as exc:
                if not failed_before_answer(exc):
                    raise
                await failover.failed("timeout" if exc.status == 504 else "unreachable")
                if await failover.move_on():
                    continue
                raise
            outcome = failure_of(upstream.status)
            if outcome is None:
                failover.answered()
                return await relay.deliver(request, call, upstream, result, own)
            refused = await relay.refuse(call, upstream)
            await failover.failed(outcome, refused)
            if await failover.move_on():
                continue
            return relay.deliver_refused(call, refused, result, own)

    def _settle(self, svc: Services, result: RelayResult) -> None:
        """Note what the request used (for the access log) and hand it to settlement."""
        usage, cost = self._charge(result)
        ctx = self.ctx
        ctx.input_tokens, ctx.output_tokens = usage.input_tokens, usage.output_tokens
        ctx.cost_nano = cost
        ctx.upstream_ttfb_s = result.ttfb_s
        failover = self.failover
        if failover is not None:
            ctx.upstream, ctx.upstream_key = failover.pool.provider, failover.key
            ctx.attempts = failover.attempts
        if ctx.storage_bypassed:  # on_error = "allow": nothing was held
            return
        svc.settler.submit(
            Settlement(
                account_id=self.key.account,
                key_id=self.key.id,
                request_id=ctx.settlement_id,
                client_request_id=ctx.request_id,
                estimated_tokens=self.hold.tokens,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_nano=cost,
                model=self.charged_as,
                outcome=result.outcome,
                cache_read_tokens=usage.cache_read_tokens,
                cache_write_tokens=usage.cache_write_tokens,
            ),
            None if self.failover is None else self.failover.reservation(),
        )

    def _charge(self, result: RelayResult) -> tuple[Usage, int]:
        """The usage to record and the nano-USD to charge for what the relay saw."""
        if self.model is not None:
            usage = billable_usage(result, self.hold)
            return usage, usage_cost_nano(usage, self.model)
        if result.outcome == "upstream_error":
            return Usage(0, 0), 0  # refused or unreachable: nothing delivered
        return Usage(self.hold.input_tokens, self.hold.output_tokens), self.hold.nano


def _believed(count: int) -> int:
    # A broken upstream may report any integer: a negative count must not credit the
    # account, nor a huge one overflow storage arithmetic (settle.lua would fail halfway).
    return min(max(count, 0), MAX_REPORTED_TOKENS)


def billable_usage(result: RelayResult, hold: Hold) -> Usage:
    """The usage to charge for what the relay saw (docs/limits-and-balance.md)."""
    if result.outcome == "upstream_error":
        return Usage(0, 0)  # the provider refused or was unreachable: nothing was produced
    if result.usage is not None:
        usage = result.usage
        reported = Usage(
            _believed(usage.input_tokens),
            _believed(usage.output_tokens),
            _believed(usage.cache_read_tokens),
            _believed(usage.cache_write_tokens),
        )
        if result.outcome == "ok":
            return reported
        # Cut short: the usage seen so far may be a placeholder (Anthropic's message_start).
        relayed = math.ceil(result.output_chars / 4)
        return dataclasses.replace(reported, output_tokens=max(reported.output_tokens, relayed))
    if result.outcome == "ok":
        # A complete answer that reported no usage: the held worst case (relayed text / 4
        # would undercount any script but English, and the upstream bills what it allowed).
        return Usage(hold.input_tokens, hold.output_tokens)
    # Cut short before usage arrived: the prompt was sent (at its usual size: an estimate,
    # not the worst case), and the text relayed so far.
    return Usage(hold.estimated_input_tokens, math.ceil(result.output_chars / 4))
