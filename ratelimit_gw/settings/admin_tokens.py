"""``[admin]`` resolved: every bearer token of the admin API, each secret from the
environment."""

from __future__ import annotations

from collections.abc import Mapping

from .checks import ENV_REF, ConfigError, check_header_value, check_id, expand_env
from .resolved import DEFAULT_ADMIN_TOKEN_NAME, AdminToken
from .schema import AdminSettings


def resolve_admin_tokens(
    admin: AdminSettings, environ: Mapping[str, str]
) -> tuple[AdminToken, ...]:
    """The default token (if its variable is set) and each ``[[admin.tokens]]`` entry: names
    unique, every secret a set variable, no secret shared by two names (the audit trail could
    not tell them apart)."""
    tokens: list[AdminToken] = []
    default = environ.get(admin.token_env)
    if default:
        _check_admin_secret(default, f"admin.token_env ({admin.token_env})")
        tokens.append(AdminToken(name=DEFAULT_ADMIN_TOKEN_NAME, token=default, access="full"))
    for i, entry in enumerate(admin.tokens):
        path = f"admin.tokens[{i}]"
        check_id(entry.name, f"{path}.name")
        if entry.name == DEFAULT_ADMIN_TOKEN_NAME:
            raise ConfigError(
                f"{path}.name: 'default' is the name of the {admin.token_env} token; choose another"
            )
        if any(t.name == entry.name for t in tokens):
            raise ConfigError(f"{path}.name: duplicate admin token name {entry.name!r}")
        reference = ENV_REF.fullmatch(entry.token.strip())
        if reference is None:
            raise ConfigError(
                f"{path}.token: must be an env reference like ${{RLGW_OPS_TOKEN}}, "
                "never the secret itself"
            )
        secret = expand_env(reference[0], f"{path}.token", environ)
        if not secret:
            raise ConfigError(f"{path}.token: environment variable {reference[1]} is empty")
        _check_admin_secret(secret, f"{path}.token")
        if shared := next((t.name for t in tokens if t.token == secret), None):
            raise ConfigError(f"{path}.token: the same secret as admin token {shared!r}")
        tokens.append(AdminToken(name=entry.name, token=secret, access=entry.access))
    return tuple(tokens)


def _check_admin_secret(secret: str, path: str) -> None:
    # The guard compares the header's value stripped: a secret with outer whitespace (a
    # variable read from a file that ends with a newline) could never match.
    if secret != secret.strip():
        raise ConfigError(
            f"{path}: the secret starts or ends with whitespace (a trailing newline?)"
        )
    check_header_value(secret, path)
