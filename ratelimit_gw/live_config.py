"""The reloadable configuration: one immutable object, swapped whole (docs/configuration.md).

What it promises: a request reads ``Services.config`` once, at its start, and uses that object
to its end, so it (a stream included) finishes on the providers, models, prices, custom
endpoints and upstream credentials it started with, whatever reload happens meanwhile. A
reload replaces the reference in one assignment: no request ever sees half of one file and
half of another. The upstream key pools and where each model's requests may go (its
itinerary) are part of the same object.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from .catalog import Catalog
from .itinerary import Itineraries
from .settings import Settings, parse_settings, read_config_text

# Sections a running process cannot take over (its listening socket, its storage client, the
# label set of its metrics, the default time zone its limiter and account store were built
# with): a reload keeps the running ones and names the change as needing a restart.
RESTART_ONLY = ("server", "storage", "metrics", "accounts", "archive")


@dataclass(frozen=True, slots=True)
class LiveConfig:
    settings: Settings
    catalog: Catalog  # built from settings.models
    itineraries: Itineraries  # built from settings.models and settings.custom_endpoints
    # The first 12 hex digits of the file's SHA-256 (`sha256sum FILE`): equal digests, same
    # file. "" for a gateway built from settings in code (tests, demo).
    digest: str = ""

    @classmethod
    def of(cls, settings: Settings, digest: str = "") -> LiveConfig:
        return cls(
            settings=settings,
            catalog=Catalog(settings.models),
            itineraries=Itineraries(settings.models.values(), settings.custom_endpoints.values()),
            digest=digest,
        )


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """The file a gateway started from, with what it said then: a reload reads it again."""

    path: Path
    started: Settings  # as the file had it at start (before command-line overrides)
    digest: str
    # The variables its ${NAME} and api_key_env references resolve from; None: the
    # process's own, which nothing outside it can change, so a rotated secret must already
    # be in a variable the process has and the file names it.
    environ: Mapping[str, str] | None = None

    @classmethod
    def load(cls, path: Path, environ: Mapping[str, str] | None = None) -> ConfigFile:
        """Read and validate ``path`` (a ConfigError naming the field path when it is invalid)."""
        text = read_config_text(path)
        return cls(
            path=path,
            started=parse_settings(text, environ),
            digest=file_digest(text),
            environ=environ,
        )

    def reread(self) -> ConfigFile:
        """The file as it is now (a ConfigError naming the field path when it is invalid)."""
        return ConfigFile.load(self.path, self.environ)


def file_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def restart_only_changes(started: Settings, loaded: Settings) -> list[str]:
    """The restart-only fields (``server.port``) whose value in ``loaded`` differs from the
    file the process started with."""
    changed = []
    for section in RESTART_ONLY:
        old, new = getattr(started, section), getattr(loaded, section)
        if old is None or new is None:  # an optional section ([archive]) added or removed
            changed += [section] if old is not new else []
            continue
        before, after = msgspec.structs.asdict(old), msgspec.structs.asdict(new)
        changed += [f"{section}.{name}" for name in before if before[name] != after[name]]
    return changed


def pinned(loaded: Settings, running: Settings) -> Settings:
    """``loaded`` with the restart-only sections of the ``running`` process."""
    return msgspec.structs.replace(
        loaded, **{section: getattr(running, section) for section in RESTART_ONLY}
    )
