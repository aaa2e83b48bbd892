"""Reloading the configuration of a running gateway: on SIGHUP, or ``POST /admin/config/reload``.

What it promises: the file the gateway started from is read again and validated exactly as at
start-up. Valid: the new configuration replaces the running one in one assignment (requests
already running finish on theirs, live_config.py), restart-only changes are kept as they run
and named in a WARNING, and the answer says what changed by name, never by secret. Invalid:
nothing changes; ``config reload failed: <field path>: <problem>`` is logged at ERROR and the
ConfigError is raised for the caller to render. Every attempt is counted in
``rlgw_config_reloads_total{outcome}``; ``rlgw_config_info{digest}`` is 1 for the running file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import msgspec

from .live_config import LiveConfig, pinned, restart_only_changes
from .metrics import Metrics, labelled
from .services import Services
from .settings import ConfigError, Settings

log = logging.getLogger("ratelimit_gw")


class NoConfigFile(Exception):
    """The gateway was built from settings in code, with no file to read again."""


class ConfigReload(msgspec.Struct, kw_only=True):
    """What a reload changed, by name (``models/gpt-4o``), never by value or secret."""

    previous_digest: str
    digest: str
    added: list[str]
    changed: list[str]
    removed: list[str]
    # Restart-only fields (``server.port``) the file changed: still running as they were.
    needs_restart: list[str]


def reload_config(svc: Services) -> ConfigReload:
    """Read the start-up file again and, if it is valid, run on it from now on."""
    if svc.config_file is None:
        raise NoConfigFile
    running = svc.config
    try:
        file = svc.config_file.reread()
    except ConfigError as exc:
        labelled(svc.metrics.config_reloads, "failed").inc()
        log.error("config reload failed: %s (the running configuration is kept)", exc)
        raise
    if file.digest == running.digest:
        # The same bytes (a pool's worker asked again after answering the admin API, or a
        # SIGHUP without an edit): nothing to swap, and nothing worth a second log line.
        labelled(svc.metrics.config_reloads, "ok").inc()
        return ConfigReload(
            previous_digest=running.digest,
            digest=file.digest,
            added=[],
            changed=[],
            removed=[],
            needs_restart=[],
        )
    needs_restart = restart_only_changes(svc.config_file.started, file.started)
    for field in needs_restart:
        log.warning(
            "config reload: %s changed in the file but needs a restart; the running value is "
            "kept until then",
            field,
        )
    svc.config = LiveConfig.of(pinned(file.started, running.settings), file.digest)
    show_config(svc.metrics, file.digest, previous=running.digest)
    labelled(svc.metrics.config_reloads, "ok").inc()
    reload = ConfigReload(
        previous_digest=running.digest,
        digest=file.digest,
        needs_restart=needs_restart,
        **_differences(running.settings, svc.config.settings),
    )
    log.info(
        "config reloaded from %s (digest %s, was %s): added %s, changed %s, removed %s",
        file.path,
        reload.digest,
        reload.previous_digest,
        reload.added or "nothing",
        reload.changed or "nothing",
        reload.removed or "nothing",
    )
    return reload


def show_config(metrics: Metrics, digest: str, *, previous: str | None = None) -> None:
    """``rlgw_config_info{digest}``: 1 for the configuration running now, 0 for the one before."""
    if previous is not None and previous != digest:
        labelled(metrics.config_info, previous).set(0)
    labelled(metrics.config_info, digest).set(1)


def _differences(before: Settings, after: Settings) -> dict[str, list[str]]:
    """Every named entry of the reloadable sections, as added, changed or removed."""
    sections: dict[str, tuple[Mapping[str, object], Mapping[str, object]]] = {
        "providers": (before.providers, after.providers),
        "models": (before.models, after.models),
        "custom_endpoints": (
            {e.id: e for e in before.custom_endpoints.values()},
            {e.id: e for e in after.custom_endpoints.values()},
        ),
        "admin.tokens": (
            {t.name: t for t in before.admin_tokens},
            {t.name: t for t in after.admin_tokens},
        ),
        "log": ({"": before.log}, {"": after.log}),
    }
    found: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
    for section, (old, new) in sections.items():
        found["added"] += [f"{section}/{k}" for k in new if k not in old]
        found["removed"] += [f"{section}/{k}" for k in old if k not in new]
        found["changed"] += [
            f"{section}/{k}".rstrip("/") for k in new if k in old and new[k] != old[k]
        ]
    return found
