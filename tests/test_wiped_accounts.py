"""A wiped or evicted account is not resurrected (issue 17, item 3).

Storage loses an account (FLUSHALL, a restart without persistence, eviction) while one of
its requests streams. Its settlement must not re-create the account as a stub hash: it is
counted, logged and kept in the orphan-settlements stream. A stub an older build left reads
as no account (404 everywhere, never 500) and the id can be created again. Top-ups never
credit a missing account. Both backends.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from ratelimit_gw.keyspace import ORPHAN_SETTLEMENTS, AccountKeys
from ratelimit_gw.services import SERVICES

from .conftest import ADMIN_TOKEN, Gateway

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {
    "model": "gpt-4o-mini",
    "stream": True,
    "messages": [{"role": "user", "content": "Hello there"}],
}


async def admin(
    http: aiohttp.ClientSession, gw: Gateway, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, gw.url + path, json=body, headers=ADMIN) as response:
        return response.status, await response.json()


async def account_keys(gw: Gateway, account: str) -> list[str]:
    keys: list[str] = await gw.storage.call("KEYS", AccountKeys(account).base + "*")
    return keys


async def test_a_settlement_after_the_account_was_wiped_is_an_orphan_not_a_stub(
    gateway: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    gw, svc = gateway, gateway.app[SERVICES]
    key = await gw.new_key("acme", balance_usd="5.00")
    headers = {
        "Authorization": f"Bearer {key}",
        "x-mock-chunks": "3",
        "x-mock-chunk-delay-ms": "300",
    }
    async with http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers) as stream:
        assert stream.status == 200
        await stream.content.readline()  # the stream is under way: the request was admitted
        await gw.storage.call("FLUSHALL")  # storage loses everything mid-stream
        rest = await stream.read()
    assert b"data: [DONE]" in rest
    await svc.settler.drain(timeout_s=30)

    assert await account_keys(gw, "acme") == [], "settlement re-created the wiped account"
    orphans = await gw.storage.call("XRANGE", ORPHAN_SETTLEMENTS, "-", "+")
    assert len(orphans) == 1
    orphan = orphans[0][1]
    assert (orphan["account_id"], orphan["outcome"], orphan["model"]) == (
        "acme",
        "ok",
        "gpt-4o-mini",
    )
    assert int(orphan["cost_nano"]) > 0 and int(orphan["output_tokens"]) > 0
    assert orphan["request_id"].startswith("req_")  # the gateway's own settlement id
    assert svc.registry.get_sample_value("rlgw_orphan_settlements_total") == 1
    assert any(
        "acme" in r.getMessage() and orphan["request_id"] in r.getMessage()
        for r in caplog.records
        if (r.name, r.levelname) == ("ratelimit_gw.settle", "WARNING")
    )

    assert (await admin(http, gw, "GET", "/admin/accounts/acme"))[0] == 404
    assert (await admin(http, gw, "GET", "/admin/accounts/acme/ledger"))[0] == 404
    status, body = await admin(
        http, gw, "POST", "/admin/accounts/acme/topup", {"amount_usd": "1", "idempotency_key": "t"}
    )
    assert (status, body["error"]["reason"]) == (404, "account_not_found")
    assert await account_keys(gw, "acme") == [], "a top-up credited a missing account"
    status, created = await admin(
        http, gw, "POST", "/admin/accounts", {"id": "acme", "balance_usd": "2.00"}
    )
    assert (status, created["balance_usd"], created["spent_usd"]) == (201, "2.00", "0.00")


async def test_a_stub_account_reads_as_not_found_and_can_be_created_again(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    gw = gateway
    keys = AccountKeys("acme")
    # What an older build's settlement left after the account was wiped: no created_ms.
    stub = {"spent_nano": "150", "tpm_level": "900", "tpm_ts": "1700000000000"}
    await gw.storage.call("HSET", keys.account, *(part for item in stub.items() for part in item))

    for method, path, body in (
        ("GET", "/admin/accounts/acme", None),
        ("GET", "/admin/accounts/acme/ledger", None),
        ("PATCH", "/admin/accounts/acme", {"rpm": 5}),
        ("POST", "/admin/accounts/acme/topup", {"amount_usd": "1", "idempotency_key": "t"}),
        ("POST", "/admin/keys", {"account": "acme"}),
        ("GET", "/admin/keys?account=acme", None),
    ):
        status, answer = await admin(http, gw, method, path, body)
        assert (status, answer["error"]["reason"]) == (404, "account_not_found"), (method, path)
    assert await gw.storage.call("HGETALL", keys.account) == stub  # refused, not written

    status, created = await admin(
        http, gw, "POST", "/admin/accounts", {"id": "acme", "balance_usd": "3.00", "rpm": 7}
    )
    assert status == 201
    assert (created["balance_usd"], created["spent_usd"], created["rpm"]) == ("3.00", "0.00", 7)
    stored = await gw.storage.call("HGETALL", keys.account)
    assert "tpm_level" not in stored  # the stub's fields are gone, not merged
    key = await gw.new_key("acme", create_account=False)
    async with http.post(
        gw.url + "/v1/chat/completions",
        json={**CHAT, "stream": False},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        assert response.status == 200
