"""``[[providers]]`` and ``[[models]]`` resolved: each provider's key pool (SPEC §14) and
client-header policy, each model's prices, output cap and fallbacks."""

from __future__ import annotations

from collections.abc import Mapping

from ..client_headers import NEVER_FORWARDED, ClientHeaderPolicy, client_header_policy
from ..protocols import ADAPTERS, CREDENTIAL_HEADERS
from .checks import (
    HEADER_NAME,
    ConfigError,
    check_header_value,
    check_id,
    check_url,
    own_header_names,
    resolve_headers,
    usd_to_nano,
)
from .resolved import Fallback, Model, Provider, UpstreamKey
from .schema import DEFAULT_MAX_OUTPUT_TOKENS, ModelSettings, ProviderSettings


def resolve_provider(p: ProviderSettings, i: int, environ: Mapping[str, str]) -> Provider:
    path = f"providers[{i}]"
    check_url(p.base_url, f"{path}.base_url", ("http", "https"))
    if p.chat_cap_field is not None and not ADAPTERS[p.protocol].has_chat_cap_field:
        takers = " or ".join(f'"{a.name}"' for a in ADAPTERS.values() if a.has_chat_cap_field)
        raise ConfigError(
            f"{path}.chat_cap_field: applies only to protocol {takers} (this provider "
            f"speaks {p.protocol}); remove it"
        )
    headers = resolve_headers(p.headers, path, environ)
    keys = _resolve_keys(p, path, environ, headers)
    return Provider(
        name=p.name,
        protocol=p.protocol,
        base_url=p.base_url.rstrip("/"),
        upstream_headers=headers,
        client_headers=_client_header_policy(p, path, own_header_names(headers, keys)),
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
    check_header_value(key, f"{path} ({env_name})")
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
        check_id(k.name, f"{kpath}.name")  # in storage key names and metric labels
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
            if not HEADER_NAME.fullmatch(name):
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


def resolve_model(m: ModelSettings, path: str, providers: Mapping[str, Provider]) -> Model:
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
