"""Configuration (§12): TOML validated at start-up, every bad field named by its path.

One test per class of mistake, each asserting the exact message an operator reads; then the
values a valid file resolves to, the defaults, and the CLI's exit code for a bad file.
"""

from __future__ import annotations

import subprocess
import typing
from collections.abc import Mapping
from pathlib import Path

import msgspec
import pytest

from ratelimit_gw.settings import (
    NO_CONFIG,
    NO_STORAGE,
    ConfigError,
    FileSettings,
    ProviderSettings,
    ServerSettings,
    Settings,
    StorageSettings,
    UpstreamKey,
    load_settings,
    load_storage_settings,
    parse_settings,
)
from ratelimit_gw.upstream_pool import Pool, PoolKey, pool_of

from .cli_helpers import cli

OPENAI = """
[[providers]]
name = "openai-main"
protocol = "openai"
base_url = "https://api.openai.com"
api_key_env = "OPENAI_API_KEY"
"""
MODEL = """
[[models]]
id = "gpt-4o-mini"
provider = "openai-main"
"""
ENV = {"OPENAI_API_KEY": "sk-openai-secret"}
STORAGE_SCHEMES = "memory://, redis://, rediss://, unix://, redis+cluster://, redis+sentinel://"


def config_error(text: str, environ: Mapping[str, str] = ENV) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, environ)
    return str(caught.value)


def allowed_fields(section: type[msgspec.Struct]) -> str:
    return ", ".join(f.name for f in msgspec.structs.fields(section))


# --- one test per class of mistake ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[server\nport = 1\n",
            "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 8)",
        ),
        ("[server]\nport = \n", "invalid TOML: Invalid value (at line 2, column 8)"),
        (
            '[server]\nhost = "a"\nhost = "b"\n',
            "invalid TOML: Cannot overwrite a value (at line 3, column 11)",
        ),
    ],
)
def test_toml_syntax_error_names_line_and_column(text: str, message: str) -> None:
    assert config_error(text) == message


def test_unknown_top_level_field_is_named_with_the_allowed_ones() -> None:
    assert config_error("bogus = 1\n") == (
        f"bogus: unknown field (allowed: {allowed_fields(FileSettings)})"
    )


def test_unknown_nested_field_carries_its_full_path() -> None:
    assert config_error("[server]\nhots = '0.0.0.0'\n") == (
        f"server.hots: unknown field (allowed: {allowed_fields(ServerSettings)})"
    )
    assert config_error(OPENAI + "api_key = 'sk-literal'\n") == (
        f"providers[0].api_key: unknown field (allowed: {allowed_fields(ProviderSettings)})"
    )


def test_the_unknown_field_messages_list_the_real_schema() -> None:
    # The helper above reads the schema; pin the parts an operator relies on.
    assert allowed_fields(FileSettings).startswith("server, storage, admin, providers, models")
    assert allowed_fields(ServerSettings).startswith("host, port, max_body_bytes")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = 'eighty'\n", "server.port: Expected `int`, got `str`"),
        ("[server]\nport = 80.5\n", "server.port: Expected `int`, got `float`"),
        ("models = 3\n", "models: Expected `array`, got `int`"),
        ("[providers]\nname = 'x'\n", "providers: Expected `array`, got `object`"),
        (OPENAI + "rpm = '100'\n", "providers[0].rpm: Expected `int | null`, got `str`"),
        (
            OPENAI + MODEL + "input_per_mtok = true\n",
            "models[0].input_per_mtok: Expected `float | str`, got `bool`",
        ),
    ],
)
def test_wrong_type_names_the_field_and_both_types(text: str, message: str) -> None:
    assert config_error(text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = 70000\n", "server.port: Expected `int` <= 65535"),
        ("[server]\nport = -1\n", "server.port: Expected `int` >= 0"),
        (OPENAI + "rpm = -5\n", "providers[0].rpm: Expected `int` >= 1"),
        (OPENAI + "tpm = 0\n", "providers[0].tpm: Expected `int` >= 1"),
        (OPENAI + "timeout_s = 0\n", "providers[0].timeout_s: Expected `float` > 0.0"),
        (
            OPENAI + MODEL + "default_max_output = 0\n",
            "models[0].default_max_output: Expected `int` >= 1",
        ),
        (
            "[storage]\nkey_cache_ttl_s = 301\n",
            "storage.key_cache_ttl_s: Expected `float` <= 300.0",
        ),
    ],
)
def test_out_of_range_value_names_the_bound(text: str, message: str) -> None:
    assert config_error(text) == message


def test_bad_enum_value_lists_the_accepted_values() -> None:
    assert config_error(OPENAI.replace('"openai"\n', '"azure"\n')) == (
        "providers[0].protocol: 'azure' is not one of anthropic, gemini, openai"
    )
    # The storage-failure policies are still growing (§11): read the accepted ones off the schema.
    on_error = next(f.type for f in msgspec.structs.fields(StorageSettings) if f.name == "on_error")
    policies = ", ".join(sorted(typing.get_args(on_error)))
    assert "reject" in policies
    assert config_error("[storage]\non_error = 'ignore'\n") == (
        f"storage.on_error: 'ignore' is not one of {policies}"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[providers]]\nname = 'x'\nprotocol = 'openai'\n",
            "providers[0].base_url: required field is missing",
        ),
        (OPENAI + "[[models]]\nid = 'm'\n", "models[0].provider: required field is missing"),
        (
            OPENAI + "[[models]]\nprovider = 'openai-main'\n",
            "models[0].id: required field is missing",
        ),
    ],
)
def test_missing_required_field_carries_its_path(text: str, message: str) -> None:
    assert config_error(text) == message


def test_model_naming_an_unknown_provider_lists_the_known_ones() -> None:
    text = OPENAI + "[[models]]\nid = 'm'\nprovider = 'opeanai-main'\n"
    assert config_error(text) == (
        "models[0].provider: unknown provider 'opeanai-main' (openai-main)"
    )
    assert config_error("[[models]]\nid = 'm'\nprovider = 'p'\n") == (
        "models[0].provider: unknown provider 'p' (none defined)"
    )


def test_duplicate_provider_name_points_at_the_second_one() -> None:
    assert config_error(OPENAI + OPENAI) == "providers[1].name: duplicate provider 'openai-main'"


def test_duplicate_model_id_points_at_the_second_one() -> None:
    assert config_error(OPENAI + MODEL + MODEL) == "models[1].id: duplicate model 'gpt-4o-mini'"


@pytest.mark.parametrize(
    ("url", "shown"),
    [("mysql://db:3306", "'mysql:…'"), ("localhost:6379", "'localhost:…'"), ("", "''")],
)
def test_storage_url_with_unsupported_scheme(url: str, shown: str) -> None:
    assert config_error(f"[storage]\nurl = '{url}'\n") == (
        f"storage.url: must start with one of {STORAGE_SCHEMES}, not {shown}"
    )


def test_a_mistyped_storage_url_is_not_echoed_with_its_password() -> None:
    error = config_error("[storage]\nurl = 'redis:/user:hunter2@db:6379'\n")
    assert error == f"storage.url: must start with one of {STORAGE_SCHEMES}, not 'redis:…'"


@pytest.mark.parametrize(
    ("url", "shown"), [("ftp://api.openai.com", "'ftp:…'"), ("api.openai.com", "'api.openai.com'")]
)
def test_provider_base_url_must_be_http(url: str, shown: str) -> None:
    assert config_error(OPENAI.replace("https://api.openai.com", url)) == (
        f"providers[0].base_url: must start with one of http://, https://, not {shown}"
    )


@pytest.mark.parametrize(
    "header",
    [
        "Authorization",
        "authorization",
        "x-api-key",
        "X-Goog-Api-Key",
        "api-key",
        "Proxy-Authorization",
    ],
)
def test_credential_header_must_be_an_env_reference(header: str) -> None:
    text = OPENAI + f'headers = {{ {header} = "Bearer sk-live-literal" }}\n'
    assert config_error(text) == (
        f"providers[0].headers.{header}: credentials must be an env reference like ${{NAME}}"
    )


def test_unset_api_key_env_is_named() -> None:
    assert config_error(OPENAI, environ={}) == (
        "providers[0].api_key_env: environment variable OPENAI_API_KEY is not set"
    )


def test_unset_variable_in_a_header_reference_is_named() -> None:
    text = OPENAI + 'headers = { Authorization = "Bearer ${ORG_KEY}", X-Org = "${ORG_ID}" }\n'
    assert config_error(text, {**ENV, "ORG_ID": "org-1"}) == (
        "providers[0].headers.Authorization: environment variable ORG_KEY is not set"
    )
    assert config_error(text, {**ENV, "ORG_KEY": "k"}) == (
        "providers[0].headers.X-Org: environment variable ORG_ID is not set"
    )


def test_a_secret_ending_in_a_newline_is_a_config_error_not_a_502_per_request() -> None:
    assert config_error(OPENAI, {"OPENAI_API_KEY": "sk-live\n"}) == (
        "providers[0].api_key_env (OPENAI_API_KEY): the value contains CR, LF or NUL"
        " (a trailing newline?)"
    )
    text = OPENAI + 'headers = { X-Org = "${ORG_ID}" }\n'
    assert config_error(text, {**ENV, "ORG_ID": "org-1\r\nX-Injected: 1"}) == (
        "providers[0].headers.X-Org: the value contains CR, LF or NUL (a trailing newline?)"
    )


def test_a_header_name_that_is_not_an_http_token_is_a_config_error() -> None:
    text = OPENAI + 'headers = { "X Org" = "org-1" }\n'
    assert config_error(text) == (
        "providers[0].headers.X Org: 'X Org' is not a valid HTTP header name"
    )


@pytest.mark.parametrize(
    ("price", "message"),
    [
        ("-1.0", "models[0].input_per_mtok: Expected `float` >= 0.0"),
        ("'-1'", "models[0].input_per_mtok: '-1' must be ≥ 0"),
        (
            "0.1234567891",
            "models[0].input_per_mtok: '0.1234567891' must have at most 9 decimal places",
        ),
        (
            "'0.1234567891'",
            "models[0].input_per_mtok: '0.1234567891' must have at most 9 decimal places",
        ),
        ("1e-10", "models[0].input_per_mtok: '1e-10' must have at most 9 decimal places"),
        ("'cheap'", "models[0].input_per_mtok: 'cheap' is not a decimal amount"),
        ("''", "models[0].input_per_mtok: '' is not a decimal amount"),
        ("inf", "models[0].input_per_mtok: 'inf' is not a decimal amount"),
        ("'Infinity'", "models[0].input_per_mtok: 'Infinity' is not a decimal amount"),
        ("'NaN'", "models[0].input_per_mtok: 'NaN' is not a decimal amount"),
        ("'sNaN'", "models[0].input_per_mtok: 'sNaN' is not a decimal amount"),
    ],
)
def test_bad_price_is_named(price: str, message: str) -> None:
    assert config_error(OPENAI + MODEL + f"input_per_mtok = {price}\n") == message


def test_bad_output_price_names_the_output_field() -> None:
    assert config_error(OPENAI + MODEL + "output_per_mtok = '1.2.3'\n") == (
        "models[0].output_per_mtok: '1.2.3' is not a decimal amount"
    )


def test_unreadable_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(missing)
    assert str(caught.value) == f"cannot read config file {missing}: No such file or directory"

    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path)
    assert str(caught.value) == f"cannot read config file {tmp_path}: Is a directory"

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[server]\nhost = '\xff'\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(binary)
    assert str(caught.value) == f"cannot read config file {binary}: not UTF-8 text (byte 17)"


def test_load_settings_reports_field_errors_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("[server]\nport = 99999\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == "server.port: Expected `int` <= 65535"


# --- what a valid file resolves to ----------------------------------------------------------

FULL_CONFIG = """
[server]
host = "0.0.0.0"
port = 8080
max_body_bytes = 1048576

[storage]
url = "redis://redis.internal:6379/0"
on_error = "reject"
connect_timeout_s = 0.5
command_timeout_s = 0.25
key_cache_ttl_s = 5

[admin]
token_env = "OPS_ADMIN_TOKEN"

[[providers]]
name = "openai-main"
protocol = "openai"            # openai | anthropic | gemini
base_url = "https://api.openai.com/"
api_key_env = "OPENAI_API_KEY"
headers = { OpenAI-Organization = "${OPENAI_ORG}" }
rpm = 10000
timeout_s = 600

[[providers]]
name = "anthropic-main"
protocol = "anthropic"
base_url = "https://api.anthropic.com"
api_key_env = "ANTHROPIC_API_KEY"
headers = { anthropic-beta = "prompt-caching-2024-07-31" }
tpm = 400000
timeout_s = 300
connect_timeout_s = 5

[[providers]]
name = "gemini-main"
protocol = "gemini"
base_url = "https://generativelanguage.googleapis.com"
api_key_env = "GEMINI_API_KEY"

[[models]]
id = "gpt-4o-mini"             # what clients send
provider = "openai-main"
upstream_id = "gpt-4o-mini-2024-07-18"
input_per_mtok = 0.15          # USD per million tokens
output_per_mtok = 0.60
default_max_output = 4096

[[models]]
id = "claude-sonnet-4-6"
provider = "anthropic-main"
display_name = "Claude Sonnet 4.6"
input_per_mtok = "3.00"
output_per_mtok = 15
default_max_output = 8192
created = 1750000000

[[models]]
id = "gemini-2.5-flash"
provider = "gemini-main"
input_per_mtok = 0.075
output_per_mtok = 1e-9
"""
FULL_ENV = {
    "OPENAI_API_KEY": "sk-openai-secret",
    "OPENAI_ORG": "org-42",
    "ANTHROPIC_API_KEY": "sk-ant-secret",
    "GEMINI_API_KEY": "AIza-gemini-secret",
    "OPS_ADMIN_TOKEN": "ops-token",
}


@pytest.fixture
def full() -> Settings:
    return parse_settings(FULL_CONFIG, FULL_ENV)


def test_full_config_resolves_server_storage_and_admin(full: Settings) -> None:
    assert msgspec.to_builtins(full.server) == {
        "host": "0.0.0.0",
        "port": 8080,
        "max_body_bytes": 1048576,
        "max_inflight": 1024,
        "shutdown_timeout_s": 30.0,
        "body_timeout_s": 30.0,
        "max_buffered_body_bytes": 256 * 1024 * 1024,
        "keepalive_timeout_s": 75.0,
        "trusted_proxies": [],
    }
    assert full.storage.url == "redis://redis.internal:6379/0"
    assert full.storage.on_error == "reject"
    assert full.storage.connect_timeout_s == 0.5
    assert full.storage.command_timeout_s == 0.25
    assert full.storage.key_cache_ttl_s == 5.0
    assert full.admin_token == "ops-token"


def test_each_protocols_key_carries_its_credential_header(full: Settings) -> None:
    providers = full.providers
    assert list(providers) == ["openai-main", "anthropic-main", "gemini-main"]
    assert [p.keys[0].headers for p in providers.values()] == [
        {"Authorization": "Bearer sk-openai-secret"},
        {"x-api-key": "sk-ant-secret"},
        # Gemini callers may send their gateway key as ?key=; the upstream's goes in a header.
        {"x-goog-api-key": "AIza-gemini-secret"},
    ]


def test_a_providers_own_headers_never_hold_a_keys_credential(full: Settings) -> None:
    # Each attempt adds the headers of the key it picked: one in the provider's own would be
    # sent with every key.
    assert [p.upstream_headers for p in full.providers.values()] == [
        {"OpenAI-Organization": "org-42"},
        {"anthropic-beta": "prompt-caching-2024-07-31"},
        {},
    ]


def test_full_config_resolves_provider_fields(full: Settings) -> None:
    openai, anthropic, gemini = full.providers.values()
    assert (openai.protocol, openai.base_url, openai.rpm, openai.tpm) == (
        "openai",
        "https://api.openai.com",  # the trailing slash is dropped: paths are appended
        10000,
        None,
    )
    assert (openai.timeout_s, openai.connect_timeout_s) == (600.0, 10.0)
    assert (anthropic.protocol, anthropic.rpm, anthropic.tpm) == ("anthropic", None, 400000)
    assert (anthropic.timeout_s, anthropic.connect_timeout_s) == (300.0, 5.0)
    assert (gemini.protocol, gemini.base_url) == (
        "gemini",
        "https://generativelanguage.googleapis.com",
    )


def test_prices_become_exact_nano_usd_per_mtok(full: Settings) -> None:
    prices = {
        model_id: (m.input_nano_usd_per_mtok, m.output_nano_usd_per_mtok)
        for model_id, m in full.models.items()
    }
    assert prices == {
        "gpt-4o-mini": (150_000_000, 600_000_000),
        "claude-sonnet-4-6": (3_000_000_000, 15_000_000_000),
        "gemini-2.5-flash": (75_000_000, 1),
    }


def test_full_config_resolves_models(full: Settings) -> None:
    mini = full.models["gpt-4o-mini"]
    assert mini.provider is full.providers["openai-main"]
    assert (mini.upstream_id, mini.display_name, mini.max_output_tokens, mini.created) == (
        "gpt-4o-mini-2024-07-18",
        "gpt-4o-mini",
        4096,
        0,
    )
    assert mini.protocol == "openai"
    claude = full.models["claude-sonnet-4-6"]
    assert (claude.upstream_id, claude.display_name, claude.max_output_tokens) == (
        "claude-sonnet-4-6",
        "Claude Sonnet 4.6",
        8192,
    )
    assert (claude.created, claude.protocol) == (1750000000, "anthropic")
    assert full.models["gemini-2.5-flash"].protocol == "gemini"


def test_an_empty_file_gives_the_documented_defaults() -> None:
    settings = parse_settings("", {})
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.server.max_body_bytes == 32 * 1024 * 1024
    assert (settings.storage.url, settings.storage.on_error) == ("memory://", "reject")
    assert (settings.storage.connect_timeout_s, settings.storage.command_timeout_s) == (1.0, 1.0)
    assert settings.storage.key_cache_ttl_s == 300.0
    assert (settings.providers, settings.models, settings.admin_token) == ({}, {}, None)


def test_provider_and_model_defaults() -> None:
    settings = parse_settings(OPENAI + MODEL, ENV)
    provider = settings.providers["openai-main"]
    assert provider.upstream_headers == {}
    assert provider.keys[0].headers == {"Authorization": "Bearer sk-openai-secret"}
    assert (provider.rpm, provider.tpm, provider.timeout_s, provider.connect_timeout_s) == (
        None,
        None,
        600.0,
        10.0,
    )
    model = settings.models["gpt-4o-mini"]
    assert (model.upstream_id, model.display_name) == ("gpt-4o-mini", "gpt-4o-mini")
    assert (model.input_nano_usd_per_mtok, model.output_nano_usd_per_mtok) == (0, 0)
    assert (model.max_output_tokens, model.created) == (4096, 0)


def test_a_provider_without_api_key_env_sends_only_its_configured_headers() -> None:
    text = OPENAI.replace('api_key_env = "OPENAI_API_KEY"\n', "") + (
        'headers = { api-key = "${AZURE_KEY}" }\n'
    )
    provider = parse_settings(text, {"AZURE_KEY": "azure-secret"}).providers["openai-main"]
    assert provider.upstream_headers == {"api-key": "azure-secret"}
    assert provider.keys == (UpstreamKey(name="openai-main", headers={}),)


def test_a_credential_header_written_in_the_file_wins_over_api_key_env_in_any_case() -> None:
    text = OPENAI + 'headers = { authorization = "Bearer ${PROJECT_KEY}" }\n'
    provider = parse_settings(text, {**ENV, "PROJECT_KEY": "sk-project"}).providers["openai-main"]
    # One credential header, not two that differ in letter case.
    assert provider.upstream_headers == {"authorization": "Bearer sk-project"}
    assert provider.keys == (UpstreamKey(name="openai-main", headers={}),)


def test_admin_token_is_read_from_the_environment_and_empty_means_disabled() -> None:
    assert parse_settings("", {"RLGW_ADMIN_TOKEN": "t0k"}).admin_token == "t0k"
    assert parse_settings("", {"RLGW_ADMIN_TOKEN": ""}).admin_token is None


def test_load_settings_reads_the_file_and_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(FULL_CONFIG, encoding="utf-8")
    for name, value in FULL_ENV.items():
        monkeypatch.setenv(name, value)
    assert load_settings(path) == parse_settings(FULL_CONFIG, FULL_ENV)
    monkeypatch.setenv("RLGW_CONFIG", str(path))
    assert load_settings().models.keys() == {"gpt-4o-mini", "claude-sonnet-4-6", "gemini-2.5-flash"}


def test_load_settings_without_a_file_says_where_a_config_comes_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An empty gateway (no providers, no models) is never what was meant."""
    monkeypatch.delenv("RLGW_CONFIG", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == NO_CONFIG
    for pointer in ("--config", "RLGW_CONFIG", "deploy/gateway.toml", "ratelimit-gw demo"):
        assert pointer in NO_CONFIG


def test_storage_settings_load_without_the_providers_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Account and key commands read only [storage]: a provider key that is not set here
    (it lives where the gateway runs) does not stop them."""
    path = tmp_path / "gw.toml"
    path.write_text(FULL_CONFIG, encoding="utf-8")
    for name in FULL_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError):
        load_settings(path)
    assert load_storage_settings(path) == load_settings_with(path, FULL_ENV).storage
    monkeypatch.setenv("RLGW_CONFIG", str(path))
    assert load_storage_settings().url == load_settings_with(path, FULL_ENV).storage.url


def test_storage_settings_still_check_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(OPENAI + "colour = 'red'\n" + '[storage]\nurl = "redis://h:6379/0"\n')
    with pytest.raises(ConfigError) as caught:
        load_storage_settings(path)
    assert str(caught.value).startswith("providers[0].colour: unknown field")
    path.write_text('[storage]\nurl = "mysql://h"\n')
    with pytest.raises(ConfigError) as caught:
        load_storage_settings(path)
    assert str(caught.value).startswith("storage.url: must start with one of")


def test_storage_settings_without_a_file_name_the_ways_to_give_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RLGW_CONFIG", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_storage_settings()
    assert str(caught.value) == NO_STORAGE


def load_settings_with(path: Path, environ: Mapping[str, str]) -> Settings:
    return parse_settings(path.read_text(encoding="utf-8"), environ)


# --- the CLI ---------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, env={"OPENAI_API_KEY": "sk-openai-secret"})


@pytest.mark.slow  # runs the CLI as a subprocess
def test_serve_with_a_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(OPENAI + MODEL + "input_per_mtok = 'cheap'\n")
    done = run_cli("serve", "--config", str(bad))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "config error: models[0].input_per_mtok: 'cheap' is not a decimal amount\n"
    )


@pytest.mark.slow  # runs the CLI as a subprocess
def test_serve_with_an_unreadable_config_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    done = run_cli("serve", "--config", str(missing))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"config error: cannot read config file {missing}: No such file or directory\n"
    )


@pytest.mark.slow  # runs the CLI as a subprocess
def test_serve_without_a_config_stops_and_points_to_one() -> None:
    done = run_cli("serve")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"config error: {NO_CONFIG}\n"


# --- upstream key pools and fallbacks (§14): parsed and validated; failover lands next -------

AZURE = """
[[providers]]
name = "azure-east"
protocol = "openai"
base_url = "https://east.example.azure.com"
api_key_env = "AZURE_KEY"
"""
CLAUDE = """
[[providers]]
name = "anthropic-main"
protocol = "anthropic"
base_url = "https://api.anthropic.com"
api_key_env = "ANTHROPIC_API_KEY"
"""
POOL = """
[[providers]]
name = "openai-main"
protocol = "openai"
base_url = "https://api.openai.com"
rpm = 900
max_attempts = 3
cooldown_default_s = 20
probe_interval_s = 15
[[providers.keys]]
name = "team-a"
api_key_env = "OPENAI_KEY_A"
rpm = 500
tpm = 200000
[[providers.keys]]
name = "team-b"
api_key_env = "OPENAI_KEY_B"
"""
POOL_ENV = {
    "OPENAI_KEY_A": "sk-a",
    "OPENAI_KEY_B": "sk-b",
    "AZURE_KEY": "az",
    "ANTHROPIC_API_KEY": "sk-ant",
}


def test_a_pool_resolves_each_keys_credential_headers_and_ceilings() -> None:
    provider = parse_settings(POOL, POOL_ENV).providers["openai-main"]
    assert provider.keys == (
        UpstreamKey(name="team-a", headers={"Authorization": "Bearer sk-a"}, rpm=500, tpm=200000),
        UpstreamKey(name="team-b", headers={"Authorization": "Bearer sk-b"}),
    )
    assert (provider.max_attempts, provider.cooldown_default_s, provider.probe_interval_s) == (
        3,
        20.0,
        15.0,
    )
    # Each attempt sends the key it picked: no key's credential goes with every attempt.
    assert provider.upstream_headers == {}
    assert pool_of(provider) == Pool(
        "openai-main",
        (PoolKey("team-a", 500, 200000), PoolKey("team-b")),
        rpm=900,
        label="provider `openai-main`",
    )


def test_api_key_env_alone_is_a_pool_of_one_key_named_after_the_provider() -> None:
    provider = parse_settings(OPENAI, ENV).providers["openai-main"]
    assert provider.keys == (
        UpstreamKey(name="openai-main", headers={"Authorization": "Bearer sk-openai-secret"}),
    )
    assert provider.upstream_headers == {}
    assert (provider.max_attempts, provider.cooldown_default_s, provider.probe_interval_s) == (
        2,
        60.0,
        30.0,
    )


def test_a_credential_written_in_headers_is_a_pool_of_one_key_the_headers_carry() -> None:
    text = OPENAI.replace('api_key_env = "OPENAI_API_KEY"\n', 'headers = { api-key = "${AZ}" }\n')
    provider = parse_settings(text, {"AZ": "azure-secret"}).providers["openai-main"]
    assert provider.keys == (UpstreamKey(name="openai-main", headers={}),)
    assert provider.upstream_headers == {"api-key": "azure-secret"}


@pytest.mark.parametrize(
    ("protocol", "header", "value"),
    [
        ("openai", "Authorization", "Bearer sk-a"),
        ("anthropic", "x-api-key", "sk-a"),
        ("gemini", "x-goog-api-key", "sk-a"),
    ],
)
def test_a_pool_keys_headers_are_its_protocols_credential_header(
    protocol: str, header: str, value: str
) -> None:
    provider = parse_settings(POOL.replace('"openai"', f'"{protocol}"'), POOL_ENV).providers[
        "openai-main"
    ]
    assert provider.keys[0].headers == {header: value}
    assert provider.upstream_headers == {}


def test_a_pool_providers_callers_never_send_a_credential_header_a_key_sets() -> None:
    policy = parse_settings(POOL, POOL_ENV).providers["openai-main"].client_headers
    caller = {"Authorization": "Bearer rlgw-caller", "AUTHORIZATION": "x", "X-Trace": "t"}
    assert "authorization" in policy.withheld
    assert policy.forwarded(caller) == {"X-Trace": "t"}


@pytest.mark.parametrize(
    ("edit", "environ", "message"),
    [
        (
            ("team-b", "team-a"),
            POOL_ENV,
            "providers[0].keys[1].name: duplicate key 'team-a' in this provider's pool",
        ),
        (
            ("", ""),
            {"OPENAI_KEY_A": "sk-a"},
            "providers[0].keys[1].api_key_env: environment variable OPENAI_KEY_B is not set",
        ),
        (
            ("", ""),
            {**POOL_ENV, "OPENAI_KEY_B": "sk-a"},
            "providers[0].keys[1].api_key_env: OPENAI_KEY_B holds the same key as key 'team-a'; "
            "list each upstream key once",
        ),
        (
            ("rpm = 900\n", 'rpm = 900\napi_key_env = "OPENAI_KEY_A"\n'),
            POOL_ENV,
            "providers[0].api_key_env: a provider has one key (api_key_env) or a pool "
            "([[providers.keys]]), not both; move it into a keys entry",
        ),
        (
            ("rpm = 900\n", 'rpm = 900\nheaders = { authorization = "Bearer ${OPENAI_KEY_A}" }\n'),
            POOL_ENV,
            "providers[0].headers.authorization: the pool's keys carry the credential (sent as "
            "Authorization); remove this header",
        ),
        (
            ("rpm = 900\n", 'rpm = 900\nheaders = { api-key = "${OPENAI_KEY_A}" }\n'),
            POOL_ENV,
            "providers[0].headers.api-key: the pool's keys carry the credential (sent as "
            "Authorization); remove this header",
        ),
        (
            ('"team-b"', '"team b"'),
            POOL_ENV,
            "providers[0].keys[1].name: 'team b' must be 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
        ),
        (
            ("max_attempts = 3", "max_attempts = 0"),
            POOL_ENV,
            "providers[0].max_attempts: Expected `int` >= 1",
        ),
        (
            ("cooldown_default_s = 20", "cooldown_default_s = 0"),
            POOL_ENV,
            "providers[0].cooldown_default_s: Expected `float` > 0.0",
        ),
        (
            ("tpm = 200000", "tpm = 0"),
            POOL_ENV,
            "providers[0].keys[0].tpm: Expected `int` >= 1",
        ),
        (
            ("rpm = 500\n", 'rpm = 500\nsecret = "sk-literal"\n'),
            POOL_ENV,
            "providers[0].keys[0].secret: unknown field (allowed: name, api_key_env, rpm, tpm)",
        ),
    ],
)
def test_a_bad_pool_is_named_by_its_field_path(
    edit: tuple[str, str], environ: Mapping[str, str], message: str
) -> None:
    assert config_error(POOL.replace(*edit), environ) == message


def model_with(fallbacks: str) -> str:
    return MODEL + f'upstream_id = "gpt-4o-mini-2024"\nfallbacks = {fallbacks}\n'


def test_fallbacks_resolve_to_providers_of_the_same_protocol() -> None:
    text = (
        POOL
        + AZURE
        + (AZURE.replace("azure-east", "azure-west").replace("AZURE_KEY", "AZURE_WEST_KEY"))
    )
    text += model_with('["azure-east", { provider = "azure-west", upstream_id = "gpt4o-prod" }]')
    settings = parse_settings(text, {**POOL_ENV, "AZURE_WEST_KEY": "az-west"})
    fallbacks = settings.models["gpt-4o-mini"].fallbacks
    assert [(f.provider.name, f.upstream_id) for f in fallbacks] == [
        ("azure-east", "gpt-4o-mini-2024"),  # a name alone keeps the model's upstream_id
        ("azure-west", "gpt4o-prod"),
    ]
    assert fallbacks[0].provider is settings.providers["azure-east"]
    assert parse_settings(POOL + MODEL, POOL_ENV).models["gpt-4o-mini"].fallbacks == ()


@pytest.mark.parametrize(
    ("fallbacks", "message"),
    [
        (
            '["azure-north"]',
            "models[0].fallbacks[0]: unknown provider 'azure-north' "
            "(anthropic-main, azure-east, openai-main)",
        ),
        (
            '["azure-east", { provider = "nowhere" }]',
            "models[0].fallbacks[1].provider: unknown provider 'nowhere' "
            "(anthropic-main, azure-east, openai-main)",
        ),
        (
            '["anthropic-main"]',
            "models[0].fallbacks[0]: provider 'anthropic-main' speaks anthropic and this "
            "model's provider 'openai-main' speaks openai; a fallback must speak the same "
            "protocol",
        ),
        (
            '["openai-main"]',
            "models[0].fallbacks[0]: 'openai-main' is the model's own provider, whose keys are "
            "tried first anyway; name another provider",
        ),
        (
            '["azure-east", { provider = "azure-east", upstream_id = "x" }]',
            "models[0].fallbacks[1].provider: provider 'azure-east' is already a fallback of "
            "this model",
        ),
        (
            '[{ provider = "azure-east", model = "x" }]',
            "models[0].fallbacks[0].model: unknown field (allowed: provider, upstream_id)",
        ),
    ],
)
def test_a_bad_fallback_is_named_by_its_field_path(fallbacks: str, message: str) -> None:
    assert config_error(POOL + AZURE + CLAUDE + model_with(fallbacks), POOL_ENV) == message
