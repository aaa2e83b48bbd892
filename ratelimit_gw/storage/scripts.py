"""The Lua scripts: their names and sources, package data of ``ratelimit_gw.lua``.

Each script is one ``.lua`` file whose header states its contract (KEYS, ARGV, units, reply);
:class:`~ratelimit_gw.storage.front.Storage` registers them once per client.
"""

from __future__ import annotations

from importlib import resources

SCRIPT_NAMES = (
    "admit",
    "settle",
    "topup",
    "create_account",
    "account_status",
    "delete_account",
    "rotate_key",
    "pool_pick",
    "webhook_raise",
    "webhook_claim",
    "archive_lease",
)


def load_script(name: str) -> str:
    """A script's source, read from the package (a checkout and a wheel alike)."""
    return resources.files("ratelimit_gw.lua").joinpath(f"{name}.lua").read_text("utf-8")


def script_sources() -> dict[str, str]:
    """Every script's source, by name."""
    return {name: load_script(name) for name in SCRIPT_NAMES}
