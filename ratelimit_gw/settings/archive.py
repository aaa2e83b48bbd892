"""``[archive]`` resolved (docs/archive.md): the PostgreSQL URL checked, its password read
from the environment (never written in the file)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

import msgspec

from .checks import ENV_REF, ConfigError, check_url, expand_env
from .schema import ArchiveSettings

ARCHIVE_SCHEMES = ("postgresql", "postgres")


def resolve_archive(
    raw: ArchiveSettings | None, environ: Mapping[str, str]
) -> ArchiveSettings | None:
    """The section with its URL's ``${ENV}`` references expanded; None without a section."""
    if raw is None:
        return None
    check_url(raw.url, "archive.url", ARCHIVE_SCHEMES)
    userinfo = raw.url.partition("://")[2].rpartition("@")
    if userinfo[1] and ":" in userinfo[0]:
        password = userinfo[0].partition(":")[2]
        if password and not ENV_REF.fullmatch(password):
            raise ConfigError(
                "archive.url: the password must be an env reference like "
                "postgresql://rlgw:${RLGW_ARCHIVE_PASSWORD}@host/db, not written in the file"
            )
    url = expand_env(raw.url, "archive.url", environ)
    try:
        urlsplit(url).port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigError(f"archive.url: {exc}") from None
    return msgspec.structs.replace(raw, url=url)


def shown_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}@{host}"
