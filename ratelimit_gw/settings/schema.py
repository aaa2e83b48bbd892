"""The configuration file as written (docs/configuration.md): one msgspec Struct per section,
unknown fields errors. Nothing here resolves a secret or checks a reference between sections
(:mod:`.loading` does, with :mod:`.providers`, :mod:`.endpoints` and :mod:`.admin_tokens`).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ..protocols import ProtocolName

# unix:///path/redis.sock[?db=N]: a Redis on the same host, over its socket file.
STORAGE_SCHEMES = ("memory", "redis", "rediss", "unix", "redis+cluster", "redis+sentinel")

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Price = Annotated[float, msgspec.Meta(ge=0)] | str  # USD per million tokens
TokenCount = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
ChatCapField = Literal["max_completion_tokens", "max_tokens"]
DEFAULT_MAX_OUTPUT_TOKENS = 4096


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    max_body_bytes: PositiveInt = 32 * 1024 * 1024
    # Requests one process serves at once; beyond it new ones get 529 overloaded_error
    # (probes and /metrics are never refused).
    max_inflight: PositiveInt = 1024
    # On SIGTERM: how long in-flight requests and streams may run on before they are cut
    # (and settled with the usage relayed so far).
    shutdown_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    # A body must arrive whole this long after the gateway starts reading it, else 408
    # body_timeout: a slow sender holds an in-flight slot no longer. 30 s takes the largest
    # body (32 MiB) at ~9 Mbit/s and a 1 MiB prompt at ~280 kbit/s.
    body_timeout_s: PositiveFloat = 30.0
    # Request body bytes one process holds at once (a request holds its body until it
    # ends); a body that does not fit gets 529 overloaded_error. 8 bodies of the maximum
    # size, or ~650 prompts of 400 KB, in a bounded amount of memory.
    max_buffered_body_bytes: PositiveInt = 256 * 1024 * 1024
    # An idle keep-alive connection is closed after this long. Above the 60 s idle timeout
    # of common load balancers (AWS ALB, GCP), so they, not the gateway, close first and
    # never send a request on a connection the gateway is closing.
    keepalive_timeout_s: PositiveFloat = 75.0
    # Addresses or networks of the proxies and load balancers in front of the gateway
    # ("10.0.0.0/8", "127.0.0.1"): a request from one of them is logged with the caller's
    # address from X-Forwarded-For (docs/operations.md#access-log). Empty: the header is ignored.
    trusted_proxies: list[str] = []


class StorageSettings(_Section):
    url: str = "memory://"
    # What to do when storage fails (docs/failure-modes.md): "reject" answers 503
    # storage_unavailable with
    # retry-after; "allow" serves keys this process already knows without limits or balance,
    # counted in rlgw_storage_bypass_total (see README "Failure modes").
    on_error: Literal["reject", "allow"] = "reject"
    connect_timeout_s: PositiveFloat = 1.0
    command_timeout_s: PositiveFloat = 1.0
    max_connections: PositiveInt = 64  # per gateway process
    # Consecutive failures that open the circuit breaker, and how long it stays open.
    breaker_failures: PositiveInt = 5
    breaker_cooldown_s: PositiveFloat = 2.0
    # How long a gateway may reuse a key lookup. Revocation does not wait for it: the
    # admission script reads the key's revoked flag from storage on every request (docs/admin.md).
    key_cache_ttl_s: Annotated[float, msgspec.Meta(ge=0, le=300)] = 300.0
    # Settlements and top-ups count as done only once this many replicas acknowledged them
    # (Redis WAIT), so a failover cannot lose a charge. Unset: 1 on redis+sentinel://, else 0.
    wait_replicas: Annotated[int, msgspec.Meta(ge=0, le=16)] | None = None
    # A Redis master whose maxmemory-policy is anything but noeviction deletes keys when
    # memory fills: accounts, API keys and balances vanish. The gateway refuses to start on
    # one unless this is true; a running gateway re-reads the policy every
    # eviction_check_interval_s (a failover or CONFIG SET can change it) into a metric.
    allow_eviction: bool = False
    eviction_check_interval_s: PositiveFloat = 60.0


class UpstreamKeySettings(_Section):
    """``[[providers.keys]]``: one upstream key of a provider's pool (SPEC §14)."""

    name: str  # in storage, metrics and logs; never the secret
    api_key_env: str
    rpm: PositiveInt | None = None  # this key's own ceiling at the provider
    tpm: PositiveInt | None = None


class ProviderSettings(_Section):
    name: str
    protocol: ProtocolName
    base_url: str
    api_key_env: str | None = None
    # A pool of upstream keys instead of api_key_env (SPEC §14; parsed and validated, the
    # relay's failover lands next): attempts per request over all keys and fallbacks, the
    # cool-down after an upstream 429 without a retry hint, and how often a key an upstream
    # 401 marked unhealthy is probed.
    keys: list[UpstreamKeySettings] = []
    max_attempts: PositiveInt = 2
    cooldown_default_s: PositiveFloat = 60.0
    probe_interval_s: PositiveFloat = 30.0
    headers: dict[str, str] = {}
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    timeout_s: PositiveFloat = 600.0
    connect_timeout_s: PositiveFloat = 10.0
    # protocol "openai" only: the chat field that carries the output cap the gateway sends
    # (docs/limits-and-balance.md). OpenAI's o-series refuse max_tokens; some compatible servers
    # ignore the newer one.
    chat_cap_field: ChatCapField | None = None
    # Which client request headers reach this upstream (docs/relay.md#request-headers): only
    # those named in forward_headers, or all but those in drop_headers (default:
    # OpenAI-Organization and OpenAI-Project, which pick the upstream account). Not both.
    forward_headers: list[str] | None = None
    drop_headers: list[str] | None = None


class FallbackSettings(_Section):
    """A model's fallback written as a table: another provider, under its own model id."""

    provider: str
    upstream_id: str | None = None


class ModelSettings(_Section):
    id: str
    provider: str
    upstream_id: str | None = None
    # Providers of the same protocol tried in order once the model's own pool is spent
    # (SPEC §14): a provider name (same upstream_id) or {provider, upstream_id}.
    fallbacks: list[str | FallbackSettings] = []
    display_name: str | None = None
    input_per_mtok: Price = 0.0
    output_per_mtok: Price = 0.0
    # Cached input read from / written to the provider's prompt cache; unset: input price.
    cache_read_per_mtok: Price | None = None
    cache_write_per_mtok: Price | None = None
    # The model's own output limit: the cap held for, and sent to the upstream for a
    # prepaid account, when the request sets none. default_max_output is its older name.
    max_output_tokens: TokenCount | None = None
    default_max_output: TokenCount | None = None
    # Input tokens held per image, file, stored-state reference or server tool (input the
    # bytes do not bound). Unset: prepaid accounts may not send such input to this model.
    reference_allowance_tokens: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    created: int = 0


class EndpointKeySettings(_Section):
    """``[[custom_endpoints.keys]]``: one upstream key of an endpoint's pool."""

    name: str  # in storage, metrics and logs; never the secret
    # What this key adds to each upstream request (its credential): every value an env
    # reference, e.g. { Authorization = "Bearer ${PIPESHIFT_KEY_A}" }.
    headers: dict[str, str]
    rpm: PositiveInt | None = None  # this key's own ceiling at the upstream
    tpm: PositiveInt | None = None


class CustomEndpointSettings(_Section):
    """``[[custom_endpoints]]``: ``/proxy-api/{provider_account}/{name}/…`` → ``base_url``
    (docs/custom-endpoints.md)."""

    provider_account: str
    name: str
    base_url: str
    headers: dict[str, str] = {}  # sent upstream, ${ENV} expanded; credentials only by reference
    # A pool of upstream keys, each with its own credential headers (SPEC §14); none: one key
    # named after the endpoint, its credential in `headers`.
    keys: list[EndpointKeySettings] = []
    # Upstream attempts per request, over the pool's keys.
    max_attempts: PositiveInt = 2
    # A key's cool-down after an upstream 429 that carries no retry hint.
    cooldown_default_s: PositiveFloat = 60.0
    # A key an upstream 401 marked unhealthy: unlike a provider's (probed with a free model
    # list request), an endpoint's has no free request to probe it with, so it cools down for
    # this long and is then tried again.
    probe_interval_s: PositiveFloat = 30.0
    accounts: list[str] = msgspec.field(default_factory=lambda: ["*"])  # account ids or globs
    rpm: PositiveInt | None = None  # shared upstream-key quotas, across all accounts and instances
    tpm: PositiveInt | None = None
    price_per_request_usd: Annotated[float, msgspec.Meta(ge=0)] | str | None = None
    timeout_s: PositiveFloat = 600.0
    connect_timeout_s: PositiveFloat = 10.0
    # The chat field that carries the output cap sent for a priced model (as a provider's).
    chat_cap_field: ChatCapField = "max_completion_tokens"


class MetricsSettings(_Section):
    # Adds an ``account`` label to per-request series: one series per account, so only
    # for deployments with a bounded number of accounts.
    account_label: bool = False


class AccountSettings(_Section):
    # The IANA time zone of an account that names none (its ``timezone``): where its budgets'
    # days, weeks and months begin (docs/limits-and-balance.md).
    default_timezone: str = "UTC"


class LogSettings(_Section):
    access_log: bool = True  # one JSON line per request on the ratelimit_gw.access logger


AdminAccess = Literal["full", "read"]  # read: GET routes only


class AdminTokenSettings(_Section):
    """``[[admin.tokens]]``: one more bearer token of the admin API, named in the audit trail."""

    name: str
    token: str  # only an env reference: ``${RLGW_OPS_TOKEN}``
    access: AdminAccess


class AdminSettings(_Section):
    # The full token named ``default``; unset or empty: no such token.
    token_env: str = "RLGW_ADMIN_TOKEN"
    tokens: list[AdminTokenSettings] = []


class WebhookSettings(_Section):
    """``[[webhooks]]``: a receiver of every account's events (docs/webhooks.md)."""

    url: str
    secret_env: str  # the variable holding the HMAC secret (``whsec_<base64>`` or any text)
    events: list[str]
    # Thresholds, each required by its event and only with it.
    balance_below_usd: Annotated[float, msgspec.Meta(ge=0)] | str | None = (
        None  # balance.low: a prepaid balance fell below this
    )
    # key.expiring: expiry this close (at most 30 days: how long a raised event's id is kept).
    key_expiring_within_s: Annotated[float, msgspec.Meta(gt=0, le=2_592_000)] | None = None


class WebhookDeliverySettings(_Section):
    """``[webhook_delivery]``: how every instance delivers the outbox (docs/webhooks.md)."""

    # An event not delivered this long after it was raised is dropped (and counted).
    lifetime_s: PositiveFloat = 86400.0
    timeout_s: PositiveFloat = 10.0  # one POST, connect to answer
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8  # POSTs at once per process
    # Retries wait first_retry_s, doubling each time up to max_retry_s (with jitter).
    first_retry_s: PositiveFloat = 5.0
    max_retry_s: PositiveFloat = 900.0
    poll_interval_s: PositiveFloat = 1.0  # how often an idle deliverer looks for due events
    # How often one instance (whichever claims the scan) looks for keys about to expire.
    key_scan_interval_s: PositiveFloat = 60.0


class ArchiveSettings(_Section):
    """``[archive]``: the ledger's copy in PostgreSQL (docs/archive.md)."""

    # postgresql://user:${RLGW_ARCHIVE_PASSWORD}@host:5432/db: a password only by reference.
    url: str
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000  # entries a read/commit
    # How long archived entries stay in Redis too (recent history, read without Postgres).
    retention_s: Annotated[float, msgspec.Meta(ge=0)] = 86400.0
    interval_s: PositiveFloat = 1.0  # how often the archiver looks for new entries
    # Whether `serve` runs the archiver (one instance at a time holds its lease); false: run
    # `ratelimit-gw archive run` beside the gateways instead.
    in_serve: bool = True
    lease_s: Annotated[float, msgspec.Meta(ge=1, le=600)] = 15.0
    # How often account and key records (hashes only) are copied for `archive restore`.
    snapshot_interval_s: PositiveFloat = 60.0


class FileSettings(_Section):
    """The file as written; :func:`load_settings` turns it into :class:`Settings`."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    providers: list[ProviderSettings] = []
    models: list[ModelSettings] = []
    custom_endpoints: list[CustomEndpointSettings] = []
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    webhooks: list[WebhookSettings] = []
    webhook_delivery: WebhookDeliverySettings = msgspec.field(
        default_factory=WebhookDeliverySettings
    )
    accounts: AccountSettings = msgspec.field(default_factory=AccountSettings)
    archive: ArchiveSettings | None = None
