"""The worst case one LLM request is held for (docs/limits-and-balance.md), and what keeps the
upstream inside it.

Guarantee for an account whose money is protected (prepaid): the hold covers everything the
upstream is allowed to bill. Input is bounded by the body's bytes (see
``estimate_input_tokens``); input the bytes do not bound (media, stored state, server tools)
is refused unless the model gives an allowance per part; output is bounded by the cap the
request was held for, which the upstream is sent whenever the caller's body gives it none —
times the number of answers asked for. Overspend is then possible only if the upstream
exceeds the cap it was sent, a part costs more than the model's allowance, or the provider
adds prompt tokens of its own (tool-use system prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

from .keys import KeyRecord
from .limiter import Decision
from .money import cost_nano
from .protocols import (
    ProtocolAdapter,
    RequestInfo,
    Route,
    UnboundedInput,
    UpstreamEdits,
    Usage,
    estimate_input_tokens,
    input_token_bound,
)
from .rejections import unbounded_input_error
from .services import Services
from .settings import Model, Provider
from .storage import StorageError


@dataclass(frozen=True, slots=True)
class Hold:
    """One request's worst case, in tokens and nano-USD, and its token-bucket estimate."""

    input_tokens: int  # the body's bound, plus the allowance of each unbounded part
    # What the token buckets are charged for input (the heuristic of docs/limits-and-balance.md,
    # plus the allowances).
    estimated_input_tokens: int
    output_cap: int  # per answer: the caller's cap, else the model's maximum
    choices: int
    nano: int  # the balance hold: input_tokens and output_tokens at the model's prices

    @property
    def output_tokens(self) -> int:
        return self.output_cap * self.choices

    @property
    def tokens(self) -> int:
        """The tokens-per-minute estimate admission charges (docs/limits-and-balance.md)."""
        return self.estimated_input_tokens + self.output_tokens


def plan_hold(
    adapter: ProtocolAdapter, route: Route, body: bytes, info: RequestInfo, model: Model
) -> tuple[Hold, list[UnboundedInput]]:
    """The hold for ``body`` on ``model``, and the parts of it whose cost the bytes do not
    bound and the model gives no allowance for: a protected account may not send those
    (:func:`refuse_unbounded_input`). No storage call: the caller makes the one it needs
    only when that list is not empty."""
    input_tokens = input_token_bound(len(body))
    estimated_input_tokens = estimate_input_tokens(len(body))
    refused: list[UnboundedInput] = []
    unbounded = adapter.unbounded_inputs(route, body)
    if unbounded:
        allowance = model.reference_allowance_tokens
        if allowance is None:
            refused = unbounded
        else:
            input_tokens += len(unbounded) * allowance
            estimated_input_tokens += len(unbounded) * allowance
    output_cap = info.max_output_tokens
    if output_cap is None:
        output_cap = model.max_output_tokens
    nano = cost_nano(
        input_tokens,
        output_cap * info.choices,
        model.input_nano_usd_per_mtok,
        model.output_nano_usd_per_mtok,
    )
    return Hold(input_tokens, estimated_input_tokens, output_cap, info.choices, nano), refused


async def refuse_unbounded_input(
    svc: Services, key: KeyRecord, model: Model, parts: list[UnboundedInput]
) -> None:
    """Raise the 400 for ``parts`` if the key's account is protected (one storage read)."""
    if await _is_prepaid(svc, key):
        raise unbounded_input_error(model, parts)


async def _is_prepaid(svc: Services, key: KeyRecord) -> bool:
    try:
        return await svc.accounts.is_prepaid(key.account)
    except StorageError:
        if svc.config.settings.storage.on_error != "allow":
            raise
        return False  # admission will be bypassed too: nothing is held or charged


def protects_money(decision: Decision | None) -> bool:
    """Whether admission held this request against money that must not be overspent.

    ``available_nano`` is reported for prepaid accounts only. None (storage bypassed under
    ``on_error = "allow"``): nothing was held, so there is nothing to keep inside.
    """
    return decision is not None and decision.available_nano is not None


def upstream_edits(
    model: Model, output_cap: int | None, provider: Provider, upstream_id: str
) -> UpstreamEdits:
    """The body changes a native call to ``model`` at ``provider`` needs: the model's id
    there (``upstream_id``; a fallback may give its own), and the cap to send when the
    caller's body gives the upstream none (None: keep the caller's bytes)."""
    return UpstreamEdits(
        model=upstream_id if upstream_id != model.id else None,
        output_cap=output_cap,
        chat_cap_field=provider.chat_cap_field,
    )


def usage_cost_nano(usage: Usage, model: Model) -> int:
    return cost_nano(
        usage.input_tokens,
        usage.output_tokens,
        model.input_nano_usd_per_mtok,
        model.output_nano_usd_per_mtok,
        cache_read_tokens=usage.cache_read_tokens,
        cache_read_per_mtok_nano=model.cache_read_nano_usd_per_mtok,
        cache_write_tokens=usage.cache_write_tokens,
        cache_write_per_mtok_nano=model.cache_write_nano_usd_per_mtok,
    )
