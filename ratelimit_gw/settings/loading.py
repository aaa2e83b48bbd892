"""From a TOML file (or a decoded document) to :class:`Settings`, and the only reader of
``os.environ``: schema errors turned into field paths, then each section resolved in turn."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from .admin_tokens import resolve_admin_tokens
from .archive import resolve_archive
from .checks import ConfigError, check_trusted_proxies, check_url
from .endpoints import resolve_custom_endpoint
from .providers import resolve_model, resolve_provider
from .resolved import CustomEndpoint, Model, Provider, Settings
from .schema import (
    STORAGE_SCHEMES,
    AccountSettings,
    ArchiveSettings,
    FileSettings,
    StorageSettings,
)
from .webhooks import check_delivery, resolve_webhooks

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
    check_url(file.storage.url, "storage.url", STORAGE_SCHEMES)
    check_trusted_proxies(file.server.trusted_proxies)
    check_delivery(file.webhook_delivery)
    zone = file.accounts.default_timezone
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"accounts.default_timezone: {zone!r} is not a known IANA time zone name "
            "(like 'UTC' or 'Europe/Paris')"
        ) from None
    return file


def build_settings(raw: dict[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a decoded TOML document; raise ConfigError naming the first bad field."""
    env = os.environ if environ is None else environ
    file = _decode_file(raw)

    providers: dict[str, Provider] = {}
    for i, p in enumerate(file.providers):
        if p.name in providers:
            raise ConfigError(f"providers[{i}].name: duplicate provider {p.name!r}")
        providers[p.name] = resolve_provider(p, i, env)

    models: dict[str, Model] = {}
    for i, m in enumerate(file.models):
        path = f"models[{i}]"
        if m.id in models:
            raise ConfigError(f"{path}.id: duplicate model {m.id!r}")
        if m.provider not in providers:
            known = ", ".join(sorted(providers)) or "none defined"
            raise ConfigError(f"{path}.provider: unknown provider {m.provider!r} ({known})")
        models[m.id] = resolve_model(m, path, providers)

    custom_endpoints: dict[tuple[str, str], CustomEndpoint] = {}
    for i, e in enumerate(file.custom_endpoints):
        endpoint = resolve_custom_endpoint(e, i, env)
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
        admin_tokens=resolve_admin_tokens(file.admin, env),
        metrics=file.metrics,
        log=file.log,
        custom_endpoints=custom_endpoints,
        webhooks=resolve_webhooks(file.webhooks, env),
        webhook_delivery=file.webhook_delivery,
        accounts=file.accounts,
        archive=resolve_archive(file.archive, env),
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


def load_account_settings(path: str | Path | None = None) -> AccountSettings:
    """Only the ``[accounts]`` of ``path`` (else ``$RLGW_CONFIG``), as
    :func:`load_storage_settings` reads ``[storage]``."""
    return _decode_file(_read_config(path, NO_STORAGE)).accounts


def load_archive_settings(
    path: str | Path | None = None,
) -> tuple[StorageSettings, ArchiveSettings | None]:
    """``[storage]`` and ``[archive]`` (its URL's references expanded) of ``path`` (else
    ``$RLGW_CONFIG``), as :func:`load_storage_settings`: the archive commands need no
    provider secret."""
    file = _decode_file(_read_config(path, NO_STORAGE))
    return file.storage, resolve_archive(file.archive, os.environ)


def load_storage_settings(path: str | Path | None = None) -> StorageSettings:
    """Only the ``[storage]`` of ``path`` (else ``$RLGW_CONFIG``). The whole file is still
    checked against the schema, but no provider secret or header reference is resolved: the
    account and key commands run where the providers' keys are not set."""
    return _decode_file(_read_config(path, NO_STORAGE)).storage
