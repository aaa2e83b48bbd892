"""The bench account every section's keys belong to, created on the Redis a gateway uses."""

from __future__ import annotations


async def create_keys(storage_url: str, count: int) -> list[str]:
    """One bench account with generous limits (so every check runs and passes), and keys."""
    from ratelimit_gw.accounts import AccountStore
    from ratelimit_gw.limits import Limits
    from ratelimit_gw.settings import StorageSettings
    from ratelimit_gw.storage import open_storage

    storage = open_storage(StorageSettings(url=storage_url, command_timeout_s=30))
    try:
        store = AccountStore(storage)
        generous = Limits(rpm=10**9, tpm=10**12, concurrency=10**6)
        await store.create_account("bench", balance_nano=10**15, limits=generous)
        return await store.create_keys("bench", count, generous)
    finally:
        await storage.close()
