"""Where a request may go (docs/upstream-pools.md): a model's provider, then its fallbacks in
order, or a custom endpoint; each a pool of upstream keys.

Built once per configuration (``LiveConfig``), so a request looks its itinerary up instead
of assembling pools per request. Knows no HTTP and no storage: ``failover.py`` walks an
itinerary, ``upstream_pool.py`` picks its keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .settings import CustomEndpoint, Model, Provider, UpstreamKey
from .upstream_pool import Pool, PoolKey, pool_of


@dataclass(frozen=True, slots=True)
class Destination:
    """One upstream a request may be sent to, and how its keys are treated there."""

    pool: Pool
    # The provider a model's request goes to (None: a custom endpoint, which the route knows).
    provider: Provider | None
    upstream_id: str  # the model's id at this provider ("" for a custom endpoint)
    key_headers: Mapping[str, Mapping[str, str]]  # by key name: the credential it adds
    timeout_s: float  # bounds one attempt here
    cooldown_default_ms: int  # an upstream 429 without a retry hint cools its key this long
    # An upstream 401 marks a provider's key unhealthy until a probe (a free model-list
    # request) brings it back; a custom endpoint has no free request to probe with, so its
    # key cools down for this long instead and the next request is the probe.
    recheck_ms: int
    probed: bool


@dataclass(frozen=True, slots=True)
class Itinerary:
    """A request's destinations in order, and how many upstream attempts it may make."""

    destinations: tuple[Destination, ...]
    max_attempts: int
    # False for a single key with no ceilings and nowhere to fall back to: there is nothing
    # to choose or to fail over to, so it is relayed with no storage step at all (an upstream
    # 429 reaches the caller with the upstream's own retry hint).
    tracked: bool
    # How long the request's holds and leases must live: every attempt at its longest (the
    # margin for a dead gateway is added by the caller).
    hold_ttl_s: float = 0.0
    first_key: str = ""  # the first destination's first key: an untracked request's

    def __post_init__(self) -> None:
        longest = self.max_attempts * max(d.timeout_s for d in self.destinations)
        object.__setattr__(self, "hold_ttl_s", longest)
        object.__setattr__(self, "first_key", self.destinations[0].pool.keys[0].name)


def key_headers(key: UpstreamKey) -> dict[str, str]:
    """The headers ``key`` adds to a request (its credential): the relay's and the probe's."""
    return dict(key.headers)


def provider_destination(provider: Provider, upstream_id: str) -> Destination:
    return Destination(
        pool=pool_of(provider),
        provider=provider,
        upstream_id=upstream_id,
        key_headers={key.name: key_headers(key) for key in provider.keys},
        timeout_s=provider.timeout_s,
        cooldown_default_ms=round(provider.cooldown_default_s * 1000),
        recheck_ms=round(provider.probe_interval_s * 1000),
        probed=True,
    )


def _tracked(destinations: tuple[Destination, ...]) -> bool:
    return len(destinations) > 1 or destinations[0].pool.needs_storage


def model_itinerary(model: Model) -> Itinerary:
    destinations = (
        provider_destination(model.provider, model.upstream_id),
        *(provider_destination(f.provider, f.upstream_id) for f in model.fallbacks),
    )
    # The model's primary provider says how many attempts a request may make.
    return Itinerary(destinations, model.provider.max_attempts, _tracked(destinations))


def endpoint_itinerary(endpoint: CustomEndpoint) -> Itinerary:
    destination = Destination(
        pool=Pool(
            endpoint.id,
            tuple(PoolKey(key.name, key.rpm, key.tpm) for key in endpoint.keys),
            endpoint.rpm,
            endpoint.tpm,
            f"custom endpoint `{endpoint.id}`",
        ),
        provider=None,
        upstream_id="",
        key_headers={key.name: key_headers(key) for key in endpoint.keys},
        timeout_s=endpoint.timeout_s,
        cooldown_default_ms=round(endpoint.cooldown_default_s * 1000),
        recheck_ms=round(endpoint.probe_interval_s * 1000),
        probed=False,
    )
    return Itinerary((destination,), endpoint.max_attempts, _tracked((destination,)))


class Itineraries:
    """Every model's and custom endpoint's itinerary under one configuration."""

    def __init__(self, models: Iterable[Model], endpoints: Iterable[CustomEndpoint]) -> None:
        self._models = {model.id: (model, model_itinerary(model)) for model in models}
        self._endpoints = {
            endpoint.id: (endpoint, endpoint_itinerary(endpoint)) for endpoint in endpoints
        }

    def of_model(self, model: Model) -> Itinerary:
        """``model``'s itinerary; built anew for a model of another configuration (one a
        request resolved before a reload swapped this one in)."""
        found = self._models.get(model.id)
        return found[1] if found is not None and found[0] is model else model_itinerary(model)

    def of_endpoint(self, endpoint: CustomEndpoint) -> Itinerary:
        found = self._endpoints.get(endpoint.id)
        if found is not None and found[0] is endpoint:
            return found[1]
        return endpoint_itinerary(endpoint)

    def pools(self) -> dict[str, Destination]:
        """Every pool by name, with the destination that describes it (probe and metrics)."""
        found: dict[str, Destination] = {}
        for _, itinerary in (*self._models.values(), *self._endpoints.values()):
            for destination in itinerary.destinations:
                found.setdefault(destination.pool.provider, destination)
        return found
