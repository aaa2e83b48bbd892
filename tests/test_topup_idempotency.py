"""Top-ups that conflict loudly (issue 17, item 5).

An idempotency key names one payment: sent again with the same amount it is a retry
(``credited: false``), with another amount a 409 ``idempotency_conflict`` (CLI: an error
exit), crediting nothing. Keys starting with ``rlgw:`` are the gateway's own (its initial
balances live there): a caller's is refused. Records from builds that kept only the ledger
entry id are judged by that entry's amount. Admin API on both backends; CLI on a real Redis.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from ratelimit_gw.keyspace import AccountKeys

from .cli_helpers import cli
from .conftest import ADMIN_TOKEN, Gateway

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CONFLICT = (
    "idempotency key 'invoice-7' was already used for a top-up of $5.25 on account 'acme', "
    "not $1.00: use a new key for a new top-up"
)
RESERVED = "idempotency keys starting with 'rlgw:' are reserved for the gateway's own top-ups"


async def topup(
    http: aiohttp.ClientSession, gw: Gateway, amount: str, key: str, account: str = "acme"
) -> tuple[int, Any]:
    async with http.post(
        f"{gw.url}/admin/accounts/{account}/topup",
        json={"amount_usd": amount, "idempotency_key": key},
        headers=ADMIN,
    ) as response:
        return response.status, await response.json()


def error(status: int, type_: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "error": {
            "type": type_,
            "code": str(status),
            "reason": reason,
            "message": message,
            "param": None,
        }
    }


async def test_the_same_key_with_another_amount_is_a_409_that_credits_nothing(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await gateway.accounts.create_account("acme", balance_nano=0)
    status, first = await topup(http, gateway, "5.25", "invoice-7")
    assert (status, first["credited"], first["account"]["balance_usd"]) == (200, True, "5.25")
    status, retry = await topup(http, gateway, "5.25", "invoice-7")
    assert (status, retry["credited"], retry["account"]["balance_usd"]) == (200, False, "5.25")

    assert await topup(http, gateway, "1.00", "invoice-7") == (
        409,
        error(409, "conflict_error", "idempotency_conflict", CONFLICT),
    )
    account = await gateway.accounts.get_account("acme")
    assert (account.balance_usd, account.topped_up_usd) == ("5.25", "5.25")
    assert [e.type for e in await gateway.accounts.ledger("acme")] == ["topup"]


async def test_a_key_recorded_by_an_earlier_build_is_judged_by_its_ledger_entry(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await gateway.accounts.create_account("acme", balance_nano=0)
    keys = AccountKeys("acme")
    # Earlier builds kept only the ledger entry id under the idempotency key.
    entry = await gateway.storage.call(
        "XADD", keys.ledger, "*", "type", "topup", "idempotency_key", "invoice-7",
        "cost_nano", "0", "amount_nano", "5250000000", "balance_nano", "5250000000",
    )  # fmt: skip
    await gateway.storage.call("HSET", keys.topups, "invoice-7", entry)
    await gateway.storage.call("HSET", keys.account, "balance_nano", 5_250_000_000)

    status, retry = await topup(http, gateway, "5.25", "invoice-7")
    assert (status, retry["credited"], retry["account"]["balance_usd"]) == (200, False, "5.25")
    assert await topup(http, gateway, "1.00", "invoice-7") == (
        409,
        error(409, "conflict_error", "idempotency_conflict", CONFLICT),
    )
    assert (await gateway.accounts.get_account("acme")).balance_usd == "5.25"


async def test_the_gateways_own_keys_are_out_of_callers_reach(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await gateway.accounts.create_account("acme", balance_nano=2_000_000_000)
    (initial,) = await gateway.accounts.ledger("acme")
    assert (initial.type, initial.idempotency_key) == ("topup", "rlgw:initial-balance:acme")
    for key in ("rlgw:initial-balance:acme", "rlgw:anything"):
        assert await topup(http, gateway, "2.00", key) == (
            400,
            error(400, "invalid_request_error", "invalid_request", RESERVED),
        )
    # What callers used to collide with is an ordinary key now.
    status, body = await topup(http, gateway, "3.00", "initial-balance:acme")
    assert (status, body["credited"], body["account"]["balance_usd"]) == (200, True, "5.00")


# ---------------------------------------------------------------- the CLI


@pytest.mark.slow  # runs the CLI as a subprocess
def test_the_cli_exits_with_an_error_on_a_conflicting_or_reserved_key(redis_url: str) -> None:
    storage = ("--storage", redis_url)
    assert cli("accounts", "create", "acme", "--balance-usd", "0", *storage).returncode == 0
    topup = ("accounts", "topup", "acme", "--idempotency-key")
    assert cli(*topup, "invoice-7", "5.25", *storage).returncode == 0
    again = cli(*topup, "invoice-7", "5.25", "--json", *storage)
    assert (again.returncode, '"credited":false' in again.stdout) == (0, True)

    conflict = cli(*topup, "invoice-7", "1.00", *storage)
    assert (conflict.returncode, conflict.stdout, conflict.stderr) == (
        1,
        "",
        f"error: {CONFLICT}\n",
    )
    reserved = cli(*topup, "rlgw:mine", "1.00", *storage)
    assert (reserved.returncode, reserved.stderr) == (1, f"error: {RESERVED}\n")
    shown = cli("accounts", "show", "acme", "--json", *storage)
    assert '"balance_usd":"5.25"' in shown.stdout
