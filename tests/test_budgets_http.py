"""Budgets over HTTP: the 429 ``budget_exceeded`` an official SDK sees (a near reset to wait
for, a far one not to retry into), and the admin API that sets, shows and clears budgets."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import openai
import pytest

from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.money import parse_usd
from ratelimit_gw.storage import Storage

from .cli_helpers import cli, cli_json
from .conftest import ADMIN_TOKEN, Gateway
from .test_sdk_e2e import CHAT_MESSAGES, openai_client, settled

HOLD_IN_MESSAGE = re.compile(r"may cost up to \$([0-9.]+)")


async def admin(
    http: aiohttp.ClientSession, gw: Gateway, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.request(method, gw.url + path, json=body, headers=headers) as response:
        return response.status, await response.json()


async def refused(client: openai.AsyncOpenAI, max_tokens: int) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT_MESSAGES, max_tokens=max_tokens
        )
    return caught.value


async def test_a_far_reset_says_do_not_retry_and_when(gateway: Gateway) -> None:
    key = await gateway.new_key()
    await gateway.accounts.update_account(
        "acme", {"budget_usd": "0.000001", "budget_period": "day"}
    )
    async with openai_client(gateway, key, max_retries=0) as client:
        err = await refused(client, 1000)
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert err.status_code == 429
    assert isinstance(err.body, dict) and err.body["reason"] == "budget_exceeded"
    headers = err.response.headers
    assert headers["x-should-retry"] == "false"
    assert "retry-after" not in headers
    reset = midnight.isoformat().replace("+00:00", "Z")
    assert headers["x-ratelimit-reset-budget"] == reset
    message = err.body["message"]
    assert "the account's budget of $0.000001" in message and "$0.00 spent or held" in message
    assert "more than the whole budget" in message  # this hold could never fit
    # A hold that fits a budget already spent: the reset time, still not to retry.
    hold = HOLD_IN_MESSAGE.search(message)
    assert hold is not None
    await gateway.accounts.update_account(
        "acme", {"budget_usd": hold.group(1), "budget_period": "week"}
    )
    async with openai_client(gateway, key, max_retries=0) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT_MESSAGES, max_tokens=1
        )
        await settled(gateway, "acme", 1)
        err = await refused(client, 1000)
    assert err.response.headers["x-should-retry"] == "false"
    resets = err.response.headers["x-ratelimit-reset-budget"]
    assert f"it resets at {resets}" in err.body["message"]  # type: ignore[index]
    assert datetime.fromisoformat(err.response.headers["x-ratelimit-reset-budget"]).weekday() == 0


async def test_a_near_reset_gives_the_real_wait(gateway: Gateway, storage: Storage) -> None:
    key = await gateway.new_key()
    await gateway.accounts.update_account(
        "acme", {"budget_usd": "0.000001", "budget_period": "day"}
    )
    async with openai_client(gateway, key, max_retries=0) as client:
        hold = HOLD_IN_MESSAGE.search((await refused(client, 1000)).body["message"])  # type: ignore[index]
        assert hold is not None
        period = {"budget_usd": hold.group(1), "budget_period": "custom", "budget_period_s": 30}
        await gateway.accounts.update_account("acme", period)
        seconds, _ = await storage.call("TIME")
        if int(seconds) % 30 > 25:  # the period could end between the two requests
            await asyncio.sleep(30 - int(seconds) % 30 + 0.1)
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT_MESSAGES, max_tokens=1
        )
        await settled(gateway, "acme", 1)
        started = time.time()
        err = await refused(client, 1000)
    headers = err.response.headers
    assert err.body["reason"] == "budget_exceeded"  # type: ignore[index]
    assert headers.get("x-should-retry") != "false"
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 30_000
    reset = datetime.fromisoformat(headers["x-ratelimit-reset-budget"]).timestamp()
    assert reset % 30 == 0 and abs(reset - (started + wait_ms / 1000)) < 2


async def test_admin_api_sets_shows_and_clears_budgets(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await gateway.new_key()
    [record] = await gateway.accounts.list_keys("acme")
    status, account = await admin(
        http,
        gateway,
        "PATCH",
        "/admin/accounts/acme",
        {"budget_usd": "25.00", "budget_period": "month", "timezone": "Europe/Paris"},
    )
    assert status == 200
    budget = account["budget"]
    assert (budget["usd"], budget["period"], budget["timezone"]) == (
        "25.00",
        "month",
        "Europe/Paris",
    )
    assert budget["spent_usd"] == "0.00" and budget["remaining_usd"] == "25.00"
    start = datetime.fromisoformat(budget["period_start"]).astimezone(ZoneInfo("Europe/Paris"))
    assert (start.day, start.hour, start.minute) == (1, 0, 0)
    assert account["timezone"] == "Europe/Paris"
    status, key = await admin(
        http,
        gateway,
        "PATCH",
        f"/admin/keys/{record.id}",
        {"budget_usd": "1.50", "budget_period": "custom", "budget_period_s": 3600},
    )
    assert status == 200 and key["budget"]["period_s"] == 3600
    status, page = await admin(http, gateway, "GET", "/admin/keys?account=acme")
    assert status == 200 and page["data"][0]["budget"]["usd"] == "1.50"
    status, error = await admin(
        http, gateway, "PATCH", "/admin/accounts/acme", {"timezone": "Mars/Olympus"}
    )
    assert status == 400 and "IANA" in error["error"]["message"]
    status, error = await admin(
        http, gateway, "PATCH", "/admin/accounts/acme", {"budget_usd": "5.00"}
    )
    assert status == 400 and "budget_period" in error["error"]["message"]
    status, account = await admin(
        http, gateway, "PATCH", "/admin/accounts/acme", {"budget_usd": None, "timezone": None}
    )
    assert status == 200 and account["budget"] is None and account["timezone"] == "UTC"
    status, key = await admin(
        http, gateway, "PATCH", f"/admin/keys/{record.id}", {"budget_usd": None}
    )
    assert status == 200 and key["budget"] is None


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_sets_shows_and_clears_budgets(redis_url: str) -> None:
    storage = ("--storage", redis_url)
    cli_json("accounts", "create", "acme", *storage)
    account = cli_json(
        "accounts",
        "update",
        "acme",
        "--budget-usd",
        "5.00",
        "--budget-period",
        "week",
        "--timezone",
        "Asia/Tokyo",
        *storage,
    )
    assert account["budget"]["usd"] == "5.00" and account["budget"]["timezone"] == "Asia/Tokyo"
    shown = cli("accounts", "show", "acme", *storage)
    assert shown.returncode == 0, shown.stderr
    # The budget is indented under its name, with the current period's spend and reset.
    assert "\nbudget\n  usd            5.00\n  period         week\n" in shown.stdout
    assert "\n  spent_usd      0.00\n" in shown.stdout and "\n  resets_at      " in shown.stdout
    key = cli_json("keys", "create", "acme", *storage)
    updated = cli_json(
        "keys",
        "update",
        key["id"],
        "--budget-usd",
        "0.50",
        "--budget-period",
        "custom",
        "--budget-period-s",
        "600",
        *storage,
    )
    assert updated["budget"]["period_s"] == 600
    listed = cli("keys", "list", "acme", *storage)
    assert "\nbudget\n  usd            0.50\n" in listed.stdout
    refused = cli("keys", "update", key["id"], "--budget-usd", "1.00", *storage)
    assert refused.returncode != 0 and "budget_period" in refused.stderr
    cleared = cli_json("accounts", "update", "acme", "--no-budget", "--timezone", "", *storage)
    assert cleared["budget"] is None and cleared["timezone"] == "UTC"
    assert cli_json("keys", "update", key["id"], "--no-budget", *storage)["budget"] is None


async def test_a_stream_admitted_before_the_boundary_settles_into_its_own_period(
    gateway: Gateway, storage: Storage
) -> None:
    key = await gateway.new_key()
    await gateway.accounts.update_account(
        "acme", {"budget_usd": "0.000001", "budget_period": "day"}
    )
    async with openai_client(gateway, key, max_retries=0) as client:

        async def slow_stream() -> None:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=CHAT_MESSAGES,
                max_tokens=1000,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"x-mock-chunks": "4", "x-mock-chunk-delay-ms": "1200"},
            )
            async for _ in stream:
                pass

        with pytest.raises(openai.RateLimitError) as caught:
            await slow_stream()
        hold = HOLD_IN_MESSAGE.search(caught.value.body["message"])  # type: ignore[index]
        assert hold is not None
        # Room for one such stream per 3-second period (a custom period, from the epoch).
        period = {"budget_usd": hold.group(1), "budget_period": "custom", "budget_period_s": 3}
        await gateway.accounts.update_account("acme", period)
        seconds, micros = await storage.call("TIME")
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        await asyncio.sleep((3000 - now_ms % 3000 + 100) / 1000)  # just after a boundary
        first_start = (now_ms // 3000 + 1) * 3000
        streaming = asyncio.create_task(slow_stream())
        await asyncio.sleep(0.5)
        err = await refused(client, 1000)  # the stream's hold fills this period
        wait_ms = int(err.response.headers["retry-after-ms"])
        await asyncio.sleep(wait_ms / 1000 + 0.1)
        assert not streaming.done()  # still running in the next period
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT_MESSAGES, max_tokens=1
        )
        await streaming
    entries = await settled(gateway, "acme", 2)
    costs = {e.output_tokens: parse_usd(e.cost_usd or "0") for e in entries}
    keys = AccountKeys("acme")
    old = await storage.call("HGETALL", keys.account_spend(f"custom:3:{first_start}"))
    new = await storage.call("HGETALL", keys.account_spend(f"custom:3:{first_start + 3000}"))
    assert old == {"spent_nano": str(costs[20]), "held_nano": "0"}
    assert new == {"spent_nano": str(costs[1]), "held_nano": "0"}
