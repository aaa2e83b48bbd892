"""The configuration with its secrets resolved and its references checked: what the rest of
the gateway reads (a :class:`Settings`, built by :func:`.loading.build_settings`)."""

from __future__ import annotations

from fnmatch import fnmatchcase

import msgspec

from ..client_headers import ClientHeaderPolicy
from .schema import (
    AccountSettings,
    AdminAccess,
    ArchiveSettings,
    LogSettings,
    MetricsSettings,
    ServerSettings,
    StorageSettings,
    WebhookDeliverySettings,
)


class UpstreamKey(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream key of a provider's or custom endpoint's pool, its secret resolved."""

    name: str
    # What this key adds to each upstream request: a provider key's credential in its
    # protocol's header ({"Authorization": "Bearer sk-…"}), an endpoint key's configured
    # headers. Empty when the provider's or endpoint's own headers carry the credential
    # (or there is none).
    headers: dict[str, str]
    rpm: int | None = None
    tpm: int | None = None


class Provider(msgspec.Struct, frozen=True, kw_only=True):
    """A provider with its secrets resolved: what the relay uses."""

    name: str
    protocol: str
    base_url: str
    # Sent on every attempt, whichever key it uses; never a pool key's credential (each
    # attempt adds its key's own headers).
    upstream_headers: dict[str, str]
    # Which of a caller's headers reach the upstream: never one that these or any key's
    # headers set.
    client_headers: ClientHeaderPolicy
    rpm: int | None
    tpm: int | None
    timeout_s: float
    connect_timeout_s: float
    chat_cap_field: str
    # The pool (SPEC §14): today's api_key_env alone is one key named after the provider.
    keys: tuple[UpstreamKey, ...] = ()
    max_attempts: int = 2
    cooldown_default_s: float = 60.0
    probe_interval_s: float = 30.0


class Fallback(msgspec.Struct, frozen=True, kw_only=True):
    """Where a model's request may go once its own provider's keys are spent."""

    provider: Provider
    upstream_id: str


class Model(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    provider: Provider
    upstream_id: str
    display_name: str
    input_nano_usd_per_mtok: int
    output_nano_usd_per_mtok: int
    cache_read_nano_usd_per_mtok: int
    cache_write_nano_usd_per_mtok: int
    max_output_tokens: int
    reference_allowance_tokens: int | None
    created: int
    fallbacks: tuple[Fallback, ...] = ()

    @property
    def protocol(self) -> str:
        return self.provider.protocol


class CustomEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A custom endpoint with its secrets resolved: what the proxy route uses."""

    provider_account: str
    name: str
    base_url: str
    # Sent on every attempt, whichever key it uses; never a pool key's headers.
    upstream_headers: dict[str, str]
    # All but credentials, hop-by-hop, and whatever these or any key's headers set
    # (transparent).
    client_headers: ClientHeaderPolicy
    accounts: tuple[str, ...]
    rpm: int | None  # the whole pool's ceiling, as a provider's
    tpm: int | None
    price_per_request_nano: int  # charged when the body names no priced model
    timeout_s: float
    connect_timeout_s: float
    chat_cap_field: str
    # The pool (SPEC §14): an endpoint without [[custom_endpoints.keys]] is one key named
    # after the endpoint that adds no headers (its credential is in upstream_headers).
    keys: tuple[UpstreamKey, ...] = ()
    max_attempts: int = 2
    cooldown_default_s: float = 60.0
    probe_interval_s: float = 30.0  # a key a 401 marked unhealthy cools down this long

    @property
    def id(self) -> str:
        return f"{self.provider_account}/{self.name}"

    def allows_account(self, account_id: str) -> bool:
        return any(fnmatchcase(account_id, pattern) for pattern in self.accounts)


class AdminToken(msgspec.Struct, frozen=True, kw_only=True):
    """An admin bearer token with its secret resolved: what the admin guard compares."""

    name: str
    token: str
    access: AdminAccess


class Webhook(msgspec.Struct, frozen=True, kw_only=True):
    """One receiver: global (from the file; ``account`` None) or an account's own (admin API).
    ``name`` tells deliveries apart in storage: ``global:<hash of the URL>`` or
    ``account:<id>``."""

    name: str
    url: str
    secret: bytes  # the HMAC key
    events: frozenset[str]
    balance_below_nano: int | None = None
    key_expiring_within_s: float | None = None
    account: str | None = None

    def wants(self, event_type: str, account: str | None) -> bool:
        """Whether this webhook receives an event of ``event_type`` about ``account``."""
        if event_type not in self.events:
            return False
        return self.account is None or self.account == account


DEFAULT_ADMIN_TOKEN_NAME = "default"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    server: ServerSettings
    storage: StorageSettings
    providers: dict[str, Provider]
    models: dict[str, Model]
    # Every token the admin API takes; none: the admin API is off.
    admin_tokens: tuple[AdminToken, ...] = ()
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    custom_endpoints: dict[tuple[str, str], CustomEndpoint] = msgspec.field(default_factory=dict)
    webhooks: tuple[Webhook, ...] = ()  # the global ones (an account's own are in storage)
    webhook_delivery: WebhookDeliverySettings = msgspec.field(
        default_factory=WebhookDeliverySettings
    )
    accounts: AccountSettings = msgspec.field(default_factory=AccountSettings)
    archive: ArchiveSettings | None = None  # no section: no archive (docs/archive.md)

    @property
    def admin_token(self) -> str | None:
        """The ``default`` token (``RLGW_ADMIN_TOKEN``), if set."""
        return next(
            (t.token for t in self.admin_tokens if t.name == DEFAULT_ADMIN_TOKEN_NAME), None
        )
