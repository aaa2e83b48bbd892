"""The typed, validated configuration (docs/configuration.md) and the only reader of ``os.environ``.

A TOML file is decoded into msgspec Structs (unknown fields are errors), then checked for
what a schema cannot express: references between sections, ranges, env references. Every
failure is a :class:`ConfigError` whose message starts with the path of the bad field, so an
operator can fix the file without reading code.

One module per concern: :mod:`.schema` (the file as written), :mod:`.resolved` (what the
gateway reads), :mod:`.checks` (the error and the checks sections share), :mod:`.providers`
(providers, their key pools, models), :mod:`.endpoints` (custom endpoints),
:mod:`.admin_tokens`, :mod:`.webhooks` (global webhooks, event types), :mod:`.archive` (the
ledger archive's URL) and :mod:`.loading` (file → :class:`Settings`). Import from here.
"""

from .checks import ConfigError, expand_env, usd_to_nano
from .loading import (
    NO_CONFIG,
    NO_STORAGE,
    build_settings,
    config_path,
    load_account_settings,
    load_archive_settings,
    load_settings,
    load_storage_settings,
    parse_settings,
    read_config_text,
)
from .resolved import (
    DEFAULT_ADMIN_TOKEN_NAME,
    AdminToken,
    CustomEndpoint,
    Fallback,
    Model,
    Provider,
    Settings,
    UpstreamKey,
    Webhook,
)
from .schema import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    STORAGE_SCHEMES,
    AdminAccess,
    AdminSettings,
    AdminTokenSettings,
    ArchiveSettings,
    ChatCapField,
    CustomEndpointSettings,
    EndpointKeySettings,
    FallbackSettings,
    FileSettings,
    LogSettings,
    MetricsSettings,
    ModelSettings,
    Port,
    PositiveFloat,
    PositiveInt,
    Price,
    ProviderSettings,
    ServerSettings,
    StorageSettings,
    TokenCount,
    UpstreamKeySettings,
    WebhookDeliverySettings,
    WebhookSettings,
)

__all__ = [
    "DEFAULT_ADMIN_TOKEN_NAME",
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "NO_CONFIG",
    "NO_STORAGE",
    "STORAGE_SCHEMES",
    "AdminAccess",
    "AdminSettings",
    "AdminToken",
    "AdminTokenSettings",
    "ArchiveSettings",
    "ChatCapField",
    "ConfigError",
    "CustomEndpoint",
    "CustomEndpointSettings",
    "EndpointKeySettings",
    "Fallback",
    "FallbackSettings",
    "FileSettings",
    "LogSettings",
    "MetricsSettings",
    "Model",
    "ModelSettings",
    "Port",
    "PositiveFloat",
    "PositiveInt",
    "Price",
    "Provider",
    "ProviderSettings",
    "ServerSettings",
    "Settings",
    "StorageSettings",
    "TokenCount",
    "UpstreamKey",
    "UpstreamKeySettings",
    "Webhook",
    "WebhookDeliverySettings",
    "WebhookSettings",
    "build_settings",
    "config_path",
    "expand_env",
    "load_account_settings",
    "load_archive_settings",
    "load_settings",
    "load_storage_settings",
    "parse_settings",
    "read_config_text",
    "usd_to_nano",
]
