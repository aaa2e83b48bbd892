"""``[[custom_endpoints]]`` resolved: headers, key pool (SPEC §14), price and access."""

from __future__ import annotations

from collections.abc import Mapping

from ..client_headers import client_header_policy
from .checks import (
    ConfigError,
    check_id,
    check_url,
    own_header_names,
    resolve_headers,
    usd_to_nano,
)
from .resolved import CustomEndpoint, UpstreamKey
from .schema import CustomEndpointSettings


def resolve_custom_endpoint(
    e: CustomEndpointSettings, i: int, environ: Mapping[str, str]
) -> CustomEndpoint:
    path = f"custom_endpoints[{i}]"
    check_id(e.provider_account, f"{path}.provider_account")
    check_id(e.name, f"{path}.name")
    check_url(e.base_url, f"{path}.base_url", ("http", "https"))
    for j, pattern in enumerate(e.accounts):
        if not pattern.strip():
            raise ConfigError(
                f"{path}.accounts[{j}]: must be an account id or a glob like 'team-*'"
            )
    price = e.price_per_request_usd
    upstream_headers = resolve_headers(e.headers, path, environ)
    keys = _resolve_endpoint_keys(e, path, environ, upstream_headers)
    return CustomEndpoint(
        provider_account=e.provider_account,
        name=e.name,
        base_url=e.base_url.rstrip("/"),
        upstream_headers=upstream_headers,
        client_headers=client_header_policy(own_header_names(upstream_headers, keys), drop=()),
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
        check_id(k.name, f"{kpath}.name")  # in storage key names and metric labels
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
        key_headers = resolve_headers(k.headers, kpath, environ, all_credentials=True)
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
