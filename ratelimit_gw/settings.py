"""The typed, validated configuration (docs/configuration.md) and the only reader of ``os.environ``.

A TOML file is decoded into msgspec Structs (unknown fields are errors), then checked for
what a schema cannot express: references between sections, ranges, env references. Every
failure is a :class:`ConfigError` whose message starts with the path of the bad field, so an
operator can fix the file without reading code.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .client_address import trusted_network
from .client_headers import NEVER_FORWARDED, ClientHeaderPolicy, client_header_policy
from .keyspace import ID_PATTERN
from .money import MoneyError, parse_usd
from .protocols import ADAPTERS, CREDENTIAL_HEADERS, ProtocolName

# unix:///path/redis.sock[?db=N]: a Redis on the same host, over its socket file.
STORAGE_SCHEMES = ("memory", "redis", "rediss", "unix", "redis+cluster", "redis+sentinel")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# RFC 9110 token characters: what an HTTP header name may be made of.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Price = Annotated[float, msgspec.Meta(ge=0)] | str  # USD per million tokens
TokenCount = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
ChatCapField = Literal["max_completion_tokens", "max_tokens"]
DEFAULT_MAX_OUTPUT_TOKENS = 4096


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the offending field."""


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

    @property
    def admin_token(self) -> str | None:
        """The ``default`` token (``RLGW_ADMIN_TOKEN``), if set."""
        return next(
            (t.token for t in self.admin_tokens if t.name == DEFAULT_ADMIN_TOKEN_NAME), None
        )


def usd_to_nano(value: float | str, path: str) -> int:
    """A price from the file → integer nano-USD; floats go through their shortest repr."""
    try:
        return parse_usd(str(value))
    except MoneyError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def expand_env(value: str, path: str, environ: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"{path}: environment variable {name} is not set")
        return environ[name]

    return _ENV_REF.sub(replace, value)


def _check_url(url: str, path: str, schemes: tuple[str, ...]) -> None:
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in schemes:
        expected = ", ".join(f"{s}://" for s in schemes)
        # Only the scheme is shown: the rest of a storage URL may hold a password.
        head, colon, _ = url.partition(":")
        shown = repr(head[:24] + colon + ("…" if len(url) > len(head) + 1 else ""))
        raise ConfigError(f"{path}: must start with one of {expected}, not {shown}")


def _check_trusted_proxies(entries: list[str]) -> None:
    for i, entry in enumerate(entries):
        try:
            trusted_network(entry)
        except ValueError as exc:
            raise ConfigError(
                f"server.trusted_proxies[{i}]: {exc}; write an address like 10.0.0.5 or a "
                "network like 10.0.0.0/8"
            ) from None


def _check_header_value(value: str, path: str) -> None:
    # Caught here, at start-up, rather than as a 502 on every request: the usual cause is a
    # secret file or variable that ends with a newline.
    if "\r" in value or "\n" in value or "\0" in value:
        raise ConfigError(f"{path}: the value contains CR, LF or NUL (a trailing newline?)")


def _resolve_headers(
    raw: Mapping[str, str],
    path: str,
    environ: Mapping[str, str],
    *,
    all_credentials: bool = False,
) -> dict[str, str]:
    """Upstream headers with ``${ENV}`` expanded; a credential header (with
    ``all_credentials``, every header) must be a reference."""
    headers: dict[str, str] = {}
    for name, value in raw.items():
        hpath = f"{path}.headers.{name}"
        credential = all_credentials or name.lower() in CREDENTIAL_HEADERS
        if credential and not _ENV_REF.search(value):
            raise ConfigError(f"{hpath}: credentials must be an env reference like ${{NAME}}")
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{hpath}: {name!r} is not a valid HTTP header name")
        headers[name] = expand_env(value, hpath, environ)
        _check_header_value(headers[name], hpath)
    return headers


def _resolve_provider(p: ProviderSettings, i: int, environ: Mapping[str, str]) -> Provider:
    path = f"providers[{i}]"
    _check_url(p.base_url, f"{path}.base_url", ("http", "https"))
    if p.chat_cap_field is not None and not ADAPTERS[p.protocol].has_chat_cap_field:
        takers = " or ".join(f'"{a.name}"' for a in ADAPTERS.values() if a.has_chat_cap_field)
        raise ConfigError(
            f"{path}.chat_cap_field: applies only to protocol {takers} (this provider "
            f"speaks {p.protocol}); remove it"
        )
    headers = _resolve_headers(p.headers, path, environ)
    keys = _resolve_keys(p, path, environ, headers)
    return Provider(
        name=p.name,
        protocol=p.protocol,
        base_url=p.base_url.rstrip("/"),
        upstream_headers=headers,
        client_headers=_client_header_policy(p, path, _own_header_names(headers, keys)),
        rpm=p.rpm,
        tpm=p.tpm,
        timeout_s=p.timeout_s,
        connect_timeout_s=p.connect_timeout_s,
        chat_cap_field=p.chat_cap_field or "max_completion_tokens",
        keys=keys,
        max_attempts=p.max_attempts,
        cooldown_default_s=p.cooldown_default_s,
        probe_interval_s=p.probe_interval_s,
    )


def _api_key(env_name: str, path: str, environ: Mapping[str, str]) -> str:
    if env_name not in environ:
        raise ConfigError(f"{path}: environment variable {env_name} is not set")
    key = environ[env_name]
    _check_header_value(key, f"{path} ({env_name})")
    return key


def _resolve_keys(
    p: ProviderSettings, path: str, environ: Mapping[str, str], headers: Mapping[str, str]
) -> tuple[UpstreamKey, ...]:
    """The provider's pool: its ``[[providers.keys]]``, or one key named after the provider
    (``api_key_env``, or a credential written in ``headers``)."""
    adapter = ADAPTERS[p.protocol]
    if not p.keys:
        if p.api_key_env is None:
            return (UpstreamKey(name=p.name, headers={}),)
        header, value = adapter.upstream_credential(
            _api_key(p.api_key_env, f"{path}.api_key_env", environ)
        )
        # Each protocol's upstream expects its credential in its own header; one written in
        # `headers` wins, whatever its letter case (two would both be sent).
        if header.lower() in {name.lower() for name in headers}:
            return (UpstreamKey(name=p.name, headers={}),)
        return (UpstreamKey(name=p.name, headers={header: value}),)
    if p.api_key_env is not None:
        raise ConfigError(
            f"{path}.api_key_env: a provider has one key (api_key_env) or a pool "
            "([[providers.keys]]), not both; move it into a keys entry"
        )
    for name in headers:
        if name.lower() in CREDENTIAL_HEADERS:  # a second credential beside each key's
            raise ConfigError(
                f"{path}.headers.{name}: the pool's keys carry the credential (sent as "
                f"{adapter.upstream_credential('')[0]}); remove this header"
            )
    keys: list[UpstreamKey] = []
    secrets: dict[str, str] = {}  # secret -> the key that has it
    for j, k in enumerate(p.keys):
        kpath = f"{path}.keys[{j}]"
        _check_id(k.name, f"{kpath}.name")  # in storage key names and metric labels
        if any(key.name == k.name for key in keys):
            raise ConfigError(f"{kpath}.name: duplicate key {k.name!r} in this provider's pool")
        secret = _api_key(k.api_key_env, f"{kpath}.api_key_env", environ)
        if secret in secrets:
            # One upstream key under two names would be spent twice over its real ceiling.
            raise ConfigError(
                f"{kpath}.api_key_env: {k.api_key_env} holds the same key as key "
                f"{secrets[secret]!r}; list each upstream key once"
            )
        secrets[secret] = k.name
        header, value = adapter.upstream_credential(secret)
        keys.append(UpstreamKey(name=k.name, headers={header: value}, rpm=k.rpm, tpm=k.tpm))
    return tuple(keys)


def _own_header_names(
    upstream_headers: Mapping[str, str], keys: Iterable[UpstreamKey]
) -> frozenset[str]:
    """Every header the gateway itself may send this upstream, lower-case: its own headers and
    every pool key's, whichever key an attempt picks (none may come from the caller)."""
    names = {name.lower() for name in upstream_headers}
    for key in keys:
        names.update(name.lower() for name in key.headers)
    return frozenset(names)


def _resolve_fallbacks(
    m: ModelSettings, path: str, providers: Mapping[str, Provider], upstream_id: str
) -> tuple[Fallback, ...]:
    own = providers[m.provider]
    fallbacks: list[Fallback] = []
    for j, entry in enumerate(m.fallbacks):
        fpath = f"{path}.fallbacks[{j}]"
        if isinstance(entry, str):
            name, fallback_id = entry, upstream_id
        else:
            name, fallback_id = entry.provider, entry.upstream_id or upstream_id
            fpath = f"{fpath}.provider"
        if name not in providers:
            known = ", ".join(sorted(providers))
            raise ConfigError(f"{fpath}: unknown provider {name!r} ({known})")
        if name == own.name:
            raise ConfigError(
                f"{fpath}: {name!r} is the model's own provider, whose keys are tried first "
                "anyway; name another provider"
            )
        if any(f.provider.name == name for f in fallbacks):
            raise ConfigError(f"{fpath}: provider {name!r} is already a fallback of this model")
        other = providers[name]
        if other.protocol != own.protocol:
            raise ConfigError(
                f"{fpath}: provider {name!r} speaks {other.protocol} and this model's "
                f"provider {own.name!r} speaks {own.protocol}; a fallback must speak the same "
                "protocol"
            )
        fallbacks.append(Fallback(provider=other, upstream_id=fallback_id))
    return tuple(fallbacks)


def _client_header_policy(
    p: ProviderSettings, path: str, own: frozenset[str]
) -> ClientHeaderPolicy:
    """``own``: the lower-case names of every header the gateway sends this provider."""
    if p.forward_headers is not None and p.drop_headers is not None:
        raise ConfigError(
            f"{path}: forward_headers (an allow list) and drop_headers (a deny list) exclude "
            "each other; keep one"
        )
    for field, names in (("forward_headers", p.forward_headers), ("drop_headers", p.drop_headers)):
        for j, name in enumerate(names or ()):
            npath = f"{path}.{field}[{j}]"
            if not _HEADER_NAME.fullmatch(name):
                raise ConfigError(f"{npath}: {name!r} is not a valid HTTP header name")
            if field == "forward_headers" and name.lower() in NEVER_FORWARDED | own:
                raise ConfigError(
                    f"{npath}: {name} never comes from the client (a credential, a hop-by-hop "
                    "header, or one this provider's configuration sets); remove it"
                )
    if p.drop_headers is not None:
        return client_header_policy(own, drop=p.drop_headers)
    return client_header_policy(own, forward=p.forward_headers)


def _max_output_tokens(m: ModelSettings, path: str) -> int:
    if m.max_output_tokens is None:
        return m.default_max_output or DEFAULT_MAX_OUTPUT_TOKENS
    if m.default_max_output is not None and m.default_max_output != m.max_output_tokens:
        raise ConfigError(
            f"{path}.default_max_output: is the older name of max_output_tokens, and the two "
            f"differ ({m.default_max_output} vs {m.max_output_tokens}); keep one"
        )
    return m.max_output_tokens


def _resolve_model(m: ModelSettings, path: str, providers: Mapping[str, Provider]) -> Model:
    upstream_id = m.upstream_id or m.id
    input_price = usd_to_nano(m.input_per_mtok, f"{path}.input_per_mtok")
    cache_read, cache_write = (
        input_price if price is None else usd_to_nano(price, f"{path}.{name}")
        for name, price in (
            ("cache_read_per_mtok", m.cache_read_per_mtok),
            ("cache_write_per_mtok", m.cache_write_per_mtok),
        )
    )
    return Model(
        id=m.id,
        provider=providers[m.provider],
        upstream_id=upstream_id,
        display_name=m.display_name or m.id,
        input_nano_usd_per_mtok=input_price,
        output_nano_usd_per_mtok=usd_to_nano(m.output_per_mtok, f"{path}.output_per_mtok"),
        cache_read_nano_usd_per_mtok=cache_read,
        cache_write_nano_usd_per_mtok=cache_write,
        max_output_tokens=_max_output_tokens(m, path),
        reference_allowance_tokens=m.reference_allowance_tokens,
        created=m.created,
        fallbacks=_resolve_fallbacks(m, path, providers, upstream_id),
    )


def _check_id(value: str, path: str) -> None:
    # Both appear as URL path segments and inside storage key names: keep them plain.
    if not ID_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{path}: {value!r} must be 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def _resolve_custom_endpoint(
    e: CustomEndpointSettings, i: int, environ: Mapping[str, str]
) -> CustomEndpoint:
    path = f"custom_endpoints[{i}]"
    _check_id(e.provider_account, f"{path}.provider_account")
    _check_id(e.name, f"{path}.name")
    _check_url(e.base_url, f"{path}.base_url", ("http", "https"))
    for j, pattern in enumerate(e.accounts):
        if not pattern.strip():
            raise ConfigError(
                f"{path}.accounts[{j}]: must be an account id or a glob like 'team-*'"
            )
    price = e.price_per_request_usd
    upstream_headers = _resolve_headers(e.headers, path, environ)
    keys = _resolve_endpoint_keys(e, path, environ, upstream_headers)
    return CustomEndpoint(
        provider_account=e.provider_account,
        name=e.name,
        base_url=e.base_url.rstrip("/"),
        upstream_headers=upstream_headers,
        client_headers=client_header_policy(_own_header_names(upstream_headers, keys), drop=()),
        accounts=tuple(e.accounts),
        rpm=e.rpm,
        tpm=e.tpm,
        price_per_request_nano=0
        if price is None
        else usd_to_nano(price, f"{path}.price_per_request_usd"),
        timeout_s=e.timeout_s,
        connect_timeout_s=e.connect_timeout_s,
        chat_cap_field=e.chat_cap_field,
        keys=keys,
        max_attempts=e.max_attempts,
        cooldown_default_s=e.cooldown_default_s,
        probe_interval_s=e.probe_interval_s,
    )


def _resolve_endpoint_keys(
    e: CustomEndpointSettings, path: str, environ: Mapping[str, str], headers: Mapping[str, str]
) -> tuple[UpstreamKey, ...]:
    """The endpoint's pool: its ``[[custom_endpoints.keys]]``, or one key named after the
    endpoint that adds nothing (the credential stays in the endpoint's ``headers``)."""
    if not e.keys:
        return (UpstreamKey(name=e.name, headers={}),)
    endpoint_headers = {name.lower(): name for name in headers}
    keys: list[UpstreamKey] = []
    for j, k in enumerate(e.keys):
        kpath = f"{path}.keys[{j}]"
        _check_id(k.name, f"{kpath}.name")  # in storage key names and metric labels
        if any(key.name == k.name for key in keys):
            raise ConfigError(f"{kpath}.name: duplicate key {k.name!r} in this endpoint's pool")
        if not k.headers:
            raise ConfigError(
                f"{kpath}.headers: empty; a key sends its credential here, e.g. "
                '{ Authorization = "Bearer ${KEY_A}" }'
            )
        for name in k.headers:
            if (shared := endpoint_headers.get(name.lower())) is not None:
                raise ConfigError(
                    f"{kpath}.headers.{name}: {path}.headers sets {shared} too, and every "
                    "request would carry both; set it in the keys only"
                )
        key_headers = _resolve_headers(k.headers, kpath, environ, all_credentials=True)
        sent = _by_lower_name(key_headers)
        if same := next((key.name for key in keys if _by_lower_name(key.headers) == sent), None):
            # One upstream key under two names would be spent twice over its real ceiling.
            raise ConfigError(
                f"{kpath}.headers: the same headers as key {same!r}; list each upstream key once"
            )
        keys.append(UpstreamKey(name=k.name, headers=key_headers, rpm=k.rpm, tpm=k.tpm))
    return tuple(keys)


def _by_lower_name(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _resolve_admin_tokens(
    admin: AdminSettings, environ: Mapping[str, str]
) -> tuple[AdminToken, ...]:
    """The default token (if its variable is set) and each ``[[admin.tokens]]`` entry: names
    unique, every secret a set variable, no secret shared by two names (the audit trail could
    not tell them apart)."""
    tokens: list[AdminToken] = []
    default = environ.get(admin.token_env)
    if default:
        _check_admin_secret(default, f"admin.token_env ({admin.token_env})")
        tokens.append(AdminToken(name=DEFAULT_ADMIN_TOKEN_NAME, token=default, access="full"))
    for i, entry in enumerate(admin.tokens):
        path = f"admin.tokens[{i}]"
        _check_id(entry.name, f"{path}.name")
        if entry.name == DEFAULT_ADMIN_TOKEN_NAME:
            raise ConfigError(
                f"{path}.name: 'default' is the name of the {admin.token_env} token; choose another"
            )
        if any(t.name == entry.name for t in tokens):
            raise ConfigError(f"{path}.name: duplicate admin token name {entry.name!r}")
        reference = _ENV_REF.fullmatch(entry.token.strip())
        if reference is None:
            raise ConfigError(
                f"{path}.token: must be an env reference like ${{RLGW_OPS_TOKEN}}, "
                "never the secret itself"
            )
        secret = expand_env(reference[0], f"{path}.token", environ)
        if not secret:
            raise ConfigError(f"{path}.token: environment variable {reference[1]} is empty")
        _check_admin_secret(secret, f"{path}.token")
        if shared := next((t.name for t in tokens if t.token == secret), None):
            raise ConfigError(f"{path}.token: the same secret as admin token {shared!r}")
        tokens.append(AdminToken(name=entry.name, token=secret, access=entry.access))
    return tuple(tokens)


def _check_admin_secret(secret: str, path: str) -> None:
    # The guard compares the header's value stripped: a secret with outer whitespace (a
    # variable read from a file that ends with a newline) could never match.
    if secret != secret.strip():
        raise ConfigError(
            f"{path}: the secret starts or ends with whitespace (a trailing newline?)"
        )
    _check_header_value(secret, path)


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(.+)`")
_MISSING_FIELD = re.compile(r"Object missing required field `(.+)`")
_BAD_ENUM = re.compile(r"Invalid enum value (.+)")


def _type_at(path: str) -> msgspec.inspect.Type:
    """The schema node at a msgspec error path like ``providers[0]``."""
    node: msgspec.inspect.Type = msgspec.inspect.type_info(FileSettings)
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(node, msgspec.inspect.ListType):
            node = node.item_type
            if isinstance(node, msgspec.inspect.UnionType):  # a name or a table: the table
                structs = [t for t in node.types if isinstance(t, msgspec.inspect.StructType)]
                node = structs[0] if structs else node
        elif isinstance(node, msgspec.inspect.StructType):
            node = next((f.type for f in node.fields if f.name == part), node)
    return node


def _msgspec_path(exc: msgspec.ValidationError) -> str:
    """msgspec's "<problem> - at `$.a[0]`" → "a[0].field: <problem>", naming what is allowed."""
    message, _, where = str(exc).rpartition(" - at `$")
    if not message:
        message, where = str(exc), ""
    path = where.rstrip("`").lstrip(".")
    node = _type_at(path)
    field_path = f"{path}." if path else ""
    if (found := _UNKNOWN_FIELD.fullmatch(message)) and isinstance(
        node, msgspec.inspect.StructType
    ):
        allowed = ", ".join(f.name for f in node.fields)
        return f"{field_path}{found[1]}: unknown field (allowed: {allowed})"
    if found := _MISSING_FIELD.fullmatch(message):
        return f"{field_path}{found[1]}: required field is missing"
    if isinstance(node, msgspec.inspect.UnionType):  # an optional choice: Literal[...] | None
        node = next((t for t in node.types if isinstance(t, msgspec.inspect.LiteralType)), node)
    if (found := _BAD_ENUM.fullmatch(message)) and isinstance(node, msgspec.inspect.LiteralType):
        return f"{path}: {found[1]} is not one of {', '.join(map(str, node.values))}"
    return f"{path}: {message}" if path else message


def _decode_file(raw: dict[str, Any]) -> FileSettings:
    """The file's schema checks (every section, unknown fields) and the storage URL; resolves
    no secret."""
    try:
        file = msgspec.convert(raw, FileSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(_msgspec_path(exc)) from None
    _check_url(file.storage.url, "storage.url", STORAGE_SCHEMES)
    _check_trusted_proxies(file.server.trusted_proxies)
    return file


def build_settings(raw: dict[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a decoded TOML document; raise ConfigError naming the first bad field."""
    env = os.environ if environ is None else environ
    file = _decode_file(raw)

    providers: dict[str, Provider] = {}
    for i, p in enumerate(file.providers):
        if p.name in providers:
            raise ConfigError(f"providers[{i}].name: duplicate provider {p.name!r}")
        providers[p.name] = _resolve_provider(p, i, env)

    models: dict[str, Model] = {}
    for i, m in enumerate(file.models):
        path = f"models[{i}]"
        if m.id in models:
            raise ConfigError(f"{path}.id: duplicate model {m.id!r}")
        if m.provider not in providers:
            known = ", ".join(sorted(providers)) or "none defined"
            raise ConfigError(f"{path}.provider: unknown provider {m.provider!r} ({known})")
        models[m.id] = _resolve_model(m, path, providers)

    custom_endpoints: dict[tuple[str, str], CustomEndpoint] = {}
    for i, e in enumerate(file.custom_endpoints):
        endpoint = _resolve_custom_endpoint(e, i, env)
        ident = (endpoint.provider_account, endpoint.name)
        if ident in custom_endpoints:
            raise ConfigError(
                f"custom_endpoints[{i}].name: duplicate custom endpoint {endpoint.id!r}"
            )
        custom_endpoints[ident] = endpoint
    return Settings(
        server=file.server,
        storage=file.storage,
        providers=providers,
        models=models,
        admin_tokens=_resolve_admin_tokens(file.admin, env),
        metrics=file.metrics,
        log=file.log,
        custom_endpoints=custom_endpoints,
    )


def _parse_toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}") from None


def parse_settings(text: str, environ: Mapping[str, str] | None = None) -> Settings:
    return build_settings(_parse_toml(text), environ)


# Serving an empty gateway (no providers, no models) is never what was meant.
NO_CONFIG = (
    "no config file: pass --config FILE or set RLGW_CONFIG=FILE (deploy/gateway.toml in the "
    "repository is an annotated example; docs/configuration.md lists every field). To try the "
    "gateway without one: `ratelimit-gw demo`"
)


NO_STORAGE = (
    "no storage: pass --storage redis://HOST:6379/0, or --config FILE (or set RLGW_CONFIG=FILE) "
    "to use the file's [storage] url"
)


def config_path(path: str | Path | None, missing: str = NO_CONFIG) -> Path:
    """``path``, else ``$RLGW_CONFIG``; ConfigError(``missing``) with neither."""
    chosen = path or os.environ.get("RLGW_CONFIG")
    if not chosen:
        raise ConfigError(missing)
    return Path(chosen)


def read_config_text(path: Path) -> str:
    """The text of the config file at ``path``; a ConfigError saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read config file {path}: not UTF-8 text (byte {exc.start})"
        ) from None


def _read_config(path: str | Path | None, missing: str) -> dict[str, Any]:
    """The TOML document at ``path``, else at ``$RLGW_CONFIG``; ConfigError(``missing``) with
    neither."""
    return _parse_toml(read_config_text(config_path(path, missing)))


def load_settings(path: str | Path | None = None) -> Settings:
    """Load ``path``, else ``$RLGW_CONFIG``; with neither, a ConfigError saying where a config
    comes from."""
    return build_settings(_read_config(path, NO_CONFIG))


def load_storage_settings(path: str | Path | None = None) -> StorageSettings:
    """Only the ``[storage]`` of ``path`` (else ``$RLGW_CONFIG``). The whole file is still
    checked against the schema, but no provider secret or header reference is resolved: the
    account and key commands run where the providers' keys are not set."""
    return _decode_file(_read_config(path, NO_STORAGE)).storage
