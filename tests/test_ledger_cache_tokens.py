"""Cache tokens in the settlement record: a settlement carries the prompt-cache reads and
writes the provider reported, and its ledger entry shows them (left out when there were
none, like every optional field). Both backends."""

from __future__ import annotations

import msgspec

from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.limiter import AdmissionRequest, Limiter, Settlement
from ratelimit_gw.storage import Storage


async def test_the_ledger_entry_shows_the_cache_tokens_a_settlement_carries(
    storage: Storage, accounts: AccountStore
) -> None:
    limiter = Limiter(storage)
    await accounts.create_account("acme", balance_nano=10**9)
    key_id = (await accounts.create_key("acme")).record.id
    for request_id in ("req_cached", "req_plain"):
        assert (
            await limiter.admit(AdmissionRequest("acme", key_id, request_id, 100, 1000, 60_000))
        ).allowed
    cached = Settlement(
        "acme", key_id, "req_cached", 100, 40, 10, 500, "m", "ok",
        cache_read_tokens=30, cache_write_tokens=8,
    )  # fmt: skip
    plain = Settlement("acme", key_id, "req_plain", 100, 40, 10, 500, "m", "ok")
    assert (await limiter.settle(cached)).settled
    assert (await limiter.settle(plain)).settled

    newest, older = (await accounts.ledger("acme"))[:2]
    assert (older.settlement_id, older.cache_read_tokens, older.cache_write_tokens) == (
        "req_cached",
        30,
        8,
    )
    assert (newest.settlement_id, newest.cache_read_tokens, newest.cache_write_tokens) == (
        "req_plain",
        None,
        None,
    )
    shown = msgspec.json.decode(msgspec.json.encode(newest))
    assert "cache_read_tokens" not in shown and "cache_write_tokens" not in shown
