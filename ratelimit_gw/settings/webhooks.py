"""``[[webhooks]]`` and ``[webhook_delivery]`` resolved (docs/webhooks.md): each global
webhook's URL checked, its secret read from the environment, its events known and each
event's threshold given."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping

from ..money import MoneyError, parse_usd
from .checks import ConfigError
from .resolved import Webhook
from .schema import WebhookDeliverySettings, WebhookSettings

# Every event a webhook may subscribe to, and the threshold field it needs (None: none).
# Adding an event type is one line here (and its raiser). The budget events' thresholds are
# fixed (80 % and 100 % of a period budget): a type each, no field.
EVENT_THRESHOLDS: dict[str, str | None] = {
    "balance.low": "balance_below_usd",
    "key.expiring": "key_expiring_within_s",
    "upstream_key.unhealthy": None,
    "budget.80": None,
    "budget.100": None,
}
# Events about no account: only global webhooks receive them.
GLOBAL_ONLY_EVENTS = frozenset({"upstream_key.unhealthy"})
SECRET_PREFIX = "whsec_"  # Standard Webhooks: the rest is the key, base64


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret as written: ``whsec_<base64>`` (Standard Webhooks) is the
    decoded bytes; anything else its UTF-8 bytes. ValueError for bad base64."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except binascii.Error:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    return secret.encode()


def global_name(url: str) -> str:
    """A global webhook's name in storage: by its URL, so a reload that reorders the list
    still delivers each pending event to the URL it was raised for."""
    return "global:" + hashlib.sha256(url.encode()).hexdigest()[:12]


def check_webhook_url(url: str, path: str) -> None:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest.split("/", 1)[0]:
        raise ConfigError(f"{path}: must be an http:// or https:// URL with a host, not {url!r}")


def check_events(events: list[str], path: str, *, account: bool = False) -> frozenset[str]:
    """The events as a set: each known, none twice, at least one."""
    if not events:
        raise ConfigError(f"{path}: name at least one event ({', '.join(EVENT_THRESHOLDS)})")
    for i, event in enumerate(events):
        if event not in EVENT_THRESHOLDS:
            raise ConfigError(
                f"{path}[{i}]: unknown event {event!r} (known: {', '.join(EVENT_THRESHOLDS)})"
            )
        if account and event in GLOBAL_ONLY_EVENTS:
            raise ConfigError(f"{path}[{i}]: {event!r} is about no account: global webhooks only")
    if len(set(events)) != len(events):
        raise ConfigError(f"{path}: an event is named twice")
    return frozenset(events)


def balance_threshold(value: float | str | None, path: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_usd(str(value))
    except MoneyError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check_thresholds(events: frozenset[str], given: Mapping[str, object], path: str) -> None:
    """Every subscribed event's threshold is set; no threshold without its event."""
    for event, field in EVENT_THRESHOLDS.items():
        if field is None:
            continue
        if event in events and given.get(field) is None:
            raise ConfigError(f"{path}.{field}: required by the event {event!r}")
        if event not in events and given.get(field) is not None:
            raise ConfigError(f"{path}.{field}: set, but the event {event!r} is not in events")


def check_delivery(delivery: WebhookDeliverySettings) -> None:
    if delivery.first_retry_s > delivery.max_retry_s:
        raise ConfigError(
            f"webhook_delivery.first_retry_s: {delivery.first_retry_s:g} is above max_retry_s "
            f"({delivery.max_retry_s:g})"
        )


def resolve_webhooks(
    entries: list[WebhookSettings], environ: Mapping[str, str]
) -> tuple[Webhook, ...]:
    webhooks: list[Webhook] = []
    for i, entry in enumerate(entries):
        path = f"webhooks[{i}]"
        check_webhook_url(entry.url, f"{path}.url")
        name = global_name(entry.url)
        if any(w.name == name for w in webhooks):
            raise ConfigError(f"{path}.url: another webhook has the same URL; merge their events")
        events = check_events(entry.events, f"{path}.events")
        check_thresholds(
            events,
            {
                "balance_below_usd": entry.balance_below_usd,
                "key_expiring_within_s": entry.key_expiring_within_s,
            },
            path,
        )
        secret = environ.get(entry.secret_env)
        if not secret:
            raise ConfigError(
                f"{path}.secret_env: environment variable {entry.secret_env} is not set "
                "(the HMAC secret receivers verify signatures with)"
            )
        try:
            key = secret_key(secret)
        except ValueError as exc:
            raise ConfigError(f"{path}.secret_env ({entry.secret_env}): {exc}") from None
        webhooks.append(
            Webhook(
                name=name,
                url=entry.url,
                secret=key,
                events=events,
                balance_below_nano=balance_threshold(
                    entry.balance_below_usd, f"{path}.balance_below_usd"
                ),
                key_expiring_within_s=entry.key_expiring_within_s,
            )
        )
    return tuple(webhooks)
