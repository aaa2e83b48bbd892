"""The error every configuration mistake raises, and the checks several sections share:
ids, URLs, header names and values, ``${ENV}`` references, prices."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..client_address import trusted_network
from ..keyspace import ID_PATTERN
from ..money import MoneyError, parse_usd
from ..protocols import CREDENTIAL_HEADERS
from .resolved import UpstreamKey

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# RFC 9110 token characters: what an HTTP header name may be made of.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the offending field."""


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

    return ENV_REF.sub(replace, value)


def check_url(url: str, path: str, schemes: tuple[str, ...]) -> None:
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in schemes:
        expected = ", ".join(f"{s}://" for s in schemes)
        # Only the scheme is shown: the rest of a storage URL may hold a password.
        head, colon, _ = url.partition(":")
        shown = repr(head[:24] + colon + ("…" if len(url) > len(head) + 1 else ""))
        raise ConfigError(f"{path}: must start with one of {expected}, not {shown}")


def check_trusted_proxies(entries: list[str]) -> None:
    for i, entry in enumerate(entries):
        try:
            trusted_network(entry)
        except ValueError as exc:
            raise ConfigError(
                f"server.trusted_proxies[{i}]: {exc}; write an address like 10.0.0.5 or a "
                "network like 10.0.0.0/8"
            ) from None


def check_header_value(value: str, path: str) -> None:
    # Caught here, at start-up, rather than as a 502 on every request: the usual cause is a
    # secret file or variable that ends with a newline.
    if "\r" in value or "\n" in value or "\0" in value:
        raise ConfigError(f"{path}: the value contains CR, LF or NUL (a trailing newline?)")


def resolve_headers(
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
        if credential and not ENV_REF.search(value):
            raise ConfigError(f"{hpath}: credentials must be an env reference like ${{NAME}}")
        if not HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{hpath}: {name!r} is not a valid HTTP header name")
        headers[name] = expand_env(value, hpath, environ)
        check_header_value(headers[name], hpath)
    return headers


def check_id(value: str, path: str) -> None:
    # Both appear as URL path segments and inside storage key names: keep them plain.
    if not ID_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{path}: {value!r} must be 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def own_header_names(
    upstream_headers: Mapping[str, str], keys: Iterable[UpstreamKey]
) -> frozenset[str]:
    """Every header the gateway itself may send this upstream, lower-case: its own headers and
    every pool key's, whichever key an attempt picks (none may come from the caller)."""
    names = {name.lower() for name in upstream_headers}
    for key in keys:
        names.update(name.lower() for name in key.headers)
    return frozenset(names)
