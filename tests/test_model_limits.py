"""Per-model rpm/tpm limits (SPEC §15 item 2, docs/limits-and-balance.md) through admit.lua and
settle.lua, the admin store and the gateway's answers.

Every test that takes ``storage`` runs on memory:// and on a real Redis.
"""

from __future__ import annotations

import asyncio
import fnmatch
import uuid
from typing import Any

import aiohttp
import msgspec
import openai
import pytest

from ratelimit_gw import model_limits
from ratelimit_gw.accounts import AccountStore
from ratelimit_gw.keyspace import AccountKeys
from ratelimit_gw.limiter import AdmissionRequest, Limiter, Settlement
from ratelimit_gw.limits import Limits
from ratelimit_gw.management import AccountError
from ratelimit_gw.storage import Storage

from .cli_helpers import cli, cli_json
from .conftest import ADMIN_TOKEN, Gateway
from .test_sdk_e2e import CHAT_MESSAGES, openai_client


@pytest.fixture
def limiter(storage: Storage) -> Limiter:
    return Limiter(storage)


def admission(
    key_id: str, model: str, tokens: int = 10, hold_nano: int = 0, account_id: str = "acme"
) -> AdmissionRequest:
    return AdmissionRequest(
        account_id=account_id,
        key_id=key_id,
        request_id=f"req-{uuid.uuid4().hex}",
        estimated_tokens=tokens,
        hold_nano=hold_nano,
        ttl_ms=60_000,
        model=model,
    )


def settlement(request: AdmissionRequest, actual_tokens: int) -> Settlement:
    return Settlement(
        account_id=request.account_id,
        key_id=request.key_id,
        request_id=request.request_id,
        estimated_tokens=request.estimated_tokens,
        input_tokens=actual_tokens,
        output_tokens=0,
        cost_nano=0,
        model=request.model,
        outcome="ok",
    )


async def new_key(accounts: AccountStore, **limits: Any) -> str:
    await accounts.create_account("acme")
    return (await accounts.create_key("acme", limits=Limits(**limits))).record.id


async def allowed(limiter: Limiter, requests: list[AdmissionRequest]) -> int:
    decisions = await asyncio.gather(*(limiter.admit(r) for r in requests))
    return sum(d.allowed for d in decisions)


# ---------------------------------------------------------------- the patterns


def test_patterns_are_checked_and_canonical() -> None:
    limits = model_limits.checked({"gpt-4o*": {"tpm": 100, "rpm": 60}, "a?c": {"rpm": 1}})
    assert model_limits.encode(limits) == '{"a?c":{"rpm":1},"gpt-4o*":{"rpm":60,"tpm":100}}'
    for bad in (
        [],
        {"": {"rpm": 1}},
        {"gpt-[4]o": {"rpm": 1}},
        {"a|b": {"rpm": 1}},
        {"a#b": {"rpm": 1}},
        {"x": {}},
        {"x": {"rpm": 0}},
        {"x": {"rpm": 1.5}},
        {"x": {"rpm": True}},
        {"x": {"rpm": 1, "rph": 2}},
        {f"m{i}": {"rpm": 1} for i in range(model_limits.MAX_PATTERNS + 1)},
    ):
        with pytest.raises(model_limits.ModelLimitsError):
            model_limits.checked(bad)


def test_matching_is_fnmatchcase_over_both_scopes() -> None:
    account = model_limits.encode(model_limits.checked({"gpt-*": {"rpm": 4}}))
    key = model_limits.encode(model_limits.checked({"gpt-4o*": {"rpm": 6}, "*mini": {"tpm": 9}}))
    shape = model_limits.shape(account, key)
    assert model_limits.matching(shape, "gpt-4o-mini") == (
        ("account", "gpt-*", 4, None),
        ("key", "*mini", None, 9),
        ("key", "gpt-4o*", 6, None),
    )
    assert model_limits.matching(shape, "GPT-4o") == ()  # case matters, as fnmatchcase
    assert model_limits.shape(None, None) == ""
    for model in ("gpt-4o", "gpt-4", "o3-mini", "claude"):
        got = {p for _, p, _, _ in model_limits.matching(shape, model)}
        want = {p for p in ("gpt-*", "gpt-4o*", "*mini") if fnmatch.fnmatchcase(model, p)}
        assert got == want


# ---------------------------------------------------------------- admission


async def test_a_pattern_is_exact_under_concurrency_and_shared_by_its_models(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    key_id = await new_key(accounts)
    await accounts.update_key(key_id, {"model_limits": {"gpt-4o*": {"rpm": 5}}})
    requests = [admission(key_id, "gpt-4o" if i % 2 else "gpt-4o-mini") for i in range(20)]
    assert await allowed(limiter, requests) == 5
    # Another model is not limited by it.
    assert await allowed(limiter, [admission(key_id, "claude-3") for _ in range(20)]) == 20
    # A second gateway (its own limiter, nothing learned) shares the same bucket.
    assert not (await Limiter(storage).admit(admission(key_id, "gpt-4o"))).allowed


async def test_every_matching_pattern_applies(accounts: AccountStore, limiter: Limiter) -> None:
    key_id = await new_key(accounts)
    limits = {"gpt-4o*": {"rpm": 10}, "*mini": {"rpm": 3}}
    await accounts.update_key(key_id, {"model_limits": limits})
    assert await allowed(limiter, [admission(key_id, "gpt-4o-mini") for _ in range(8)]) == 3
    refused = await limiter.admit(admission(key_id, "gpt-4o-mini"))
    assert (refused.reason, refused.model_scope, refused.model_pattern) == (
        "rpm_exceeded",
        "key",
        "*mini",
    )
    assert refused.hit_limit == 3
    # gpt-4o matches only gpt-4o*, which the three took from too: 7 left.
    assert await allowed(limiter, [admission(key_id, "gpt-4o") for _ in range(12)]) == 7


async def test_account_and_key_patterns_both_apply(
    accounts: AccountStore, limiter: Limiter
) -> None:
    key_id = await new_key(accounts)
    await accounts.update_account("acme", {"model_limits": {"gpt-*": {"rpm": 4}}})
    await accounts.update_key(key_id, {"model_limits": {"gpt-4o*": {"rpm": 6}}})
    other = (await accounts.create_key("acme")).record.id
    assert await allowed(limiter, [admission(key_id, "gpt-4o") for _ in range(10)]) == 4
    refused = await limiter.admit(admission(other, "gpt-4"))  # the account's, for every key
    assert (refused.reason, refused.model_scope, refused.model_pattern) == (
        "rpm_exceeded",
        "account",
        "gpt-*",
    )
    await accounts.update_account("acme", {"model_limits": None})  # cleared: the key's stays
    assert await allowed(limiter, [admission(key_id, "gpt-4o") for _ in range(10)]) == 2


async def test_the_headers_report_the_tightest_limit(
    accounts: AccountStore, limiter: Limiter
) -> None:
    key_id = await new_key(accounts, rpm=100, tpm=10_000)
    await accounts.update_key(key_id, {"model_limits": {"gpt-4o*": {"rpm": 7, "tpm": 500}}})
    decision = await limiter.admit(admission(key_id, "gpt-4o", tokens=100))
    assert decision.allowed
    assert decision.requests is not None and decision.tokens is not None
    assert (decision.requests.limit, decision.requests.remaining) == (7, 6)
    assert (decision.tokens.limit, decision.tokens.remaining) == (500, 400)
    plain = await limiter.admit(admission(key_id, "claude-3", tokens=100))
    assert plain.requests is not None and plain.tokens is not None
    assert (plain.requests.limit, plain.tokens.limit) == (100, 10_000)


async def test_a_refusal_consumes_nothing_anywhere(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    key_id = await new_key(accounts, rpm=100, tpm=10_000, concurrency=10)
    await accounts.update_account("acme", {"prepaid": True, "rpm": 100, "concurrency": 10})
    await accounts.topup("acme", 10_000_000_000, "t1")
    await accounts.update_account("acme", {"model_limits": {"gpt-*": {"tpm": 1000}}})
    await accounts.update_key(key_id, {"model_limits": {"gpt-4o*": {"rpm": 1}}})
    assert (await limiter.admit(admission(key_id, "gpt-4o", hold_nano=1000))).allowed
    names = AccountKeys("acme")
    watched = [
        ("HGETALL", names.account),
        ("HGETALL", names.key(key_id)),
        ("HGETALL", names.model_bucket("account", key_id, "gpt-*")),
        ("HGETALL", names.model_bucket("key", key_id, "gpt-4o*")),
        ("ZRANGE", names.inflight, 0, -1),
        ("ZRANGE", names.key_leases(key_id), 0, -1),
        ("HGETALL", names.holds),
    ]
    before = await storage.call_many(watched, atomic=True)
    refused = await limiter.admit(admission(key_id, "gpt-4o", hold_nano=1000))
    assert refused.reason == "rpm_exceeded" and refused.model_pattern == "gpt-4o*"
    assert await storage.call_many(watched, atomic=True) == before


async def test_settlement_corrects_each_patterns_tpm(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    key_id = await new_key(accounts)
    await accounts.update_account("acme", {"model_limits": {"gpt-*": {"tpm": 1000}}})
    await accounts.update_key(key_id, {"model_limits": {"gpt-4o*": {"tpm": 2000}}})
    first = admission(key_id, "gpt-4o", tokens=900)
    assert (await limiter.admit(first)).allowed
    refused = await limiter.admit(admission(key_id, "gpt-4o", tokens=800))
    assert (refused.reason, refused.model_scope) == ("tpm_exceeded", "account")
    assert (await limiter.settle(settlement(first, 100))).settled  # 800 given back to each
    names = AccountKeys("acme")
    for name, capacity in (
        (names.model_bucket("account", key_id, "gpt-*"), 1000),
        (names.model_bucket("key", key_id, "gpt-4o*"), 2000),
    ):
        level = float(await storage.call("HGET", name, "tpm_level"))
        assert capacity - 101 < level <= capacity  # 100 used (and a few ms of refill)
        assert 0 < await storage.call("PTTL", name) <= 61_000
    assert (await limiter.admit(admission(key_id, "gpt-4o", tokens=800))).allowed


async def test_hold_records_with_budgets_and_model_buckets_settle_and_expire(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    # A hold record names its budgets' spend hashes and its model buckets: settle.lua and
    # admit.lua's sweep of expired holds read both parts.
    key_id = await new_key(accounts)
    await accounts.update_account("acme", {"budget_usd": "1.00", "budget_period": "day"})
    await accounts.update_key(key_id, {"budget_usd": "1.00", "budget_period": "day"})
    await accounts.update_key(key_id, {"model_limits": {"gpt-4o*": {"tpm": 1000}}})
    first = admission(key_id, "gpt-4o", tokens=500, hold_nano=20_000_000)
    assert (await limiter.admit(first)).allowed
    done = msgspec.structs.replace(settlement(first, 100), cost_nano=10_000_000)
    assert (await limiter.settle(done)).settled
    account = await accounts.get_account("acme")
    assert account.budget is not None
    assert (account.budget.spent_usd, account.budget.held_usd) == ("0.01", "0.00")
    bucket = AccountKeys("acme").model_bucket("key", key_id, "gpt-4o*")
    assert float(await storage.call("HGET", bucket, "tpm_level")) > 890  # 100 used
    # A hold that outlives its TTL is swept by the next admission: its budgets count it spent.
    short = AdmissionRequest(
        account_id="acme",
        key_id=key_id,
        request_id=f"req-{uuid.uuid4().hex}",
        estimated_tokens=10,
        hold_nano=20_000_000,
        ttl_ms=30,
        model="gpt-4o",
    )
    assert (await limiter.admit(short)).allowed
    await asyncio.sleep(0.1)
    swept = await limiter.admit(admission(key_id, "gpt-4o"))
    assert swept.allowed and swept.holds_expired == 1
    key = await accounts.get_key("acme", key_id)
    assert key.budget is not None
    assert (key.budget.spent_usd, key.budget.held_usd) == ("0.03", "0.00")


async def test_a_request_larger_than_a_pattern_can_ever_allow(
    accounts: AccountStore, limiter: Limiter
) -> None:
    key_id = await new_key(accounts)
    await accounts.update_key(key_id, {"model_limits": {"gpt-4o*": {"tpm": 100}}})
    refused = await limiter.admit(admission(key_id, "gpt-4o", tokens=101))
    assert (refused.reason, refused.hit_limit, refused.model_pattern) == (
        "request_exceeds_limit",
        100,
        "gpt-4o*",
    )


async def test_changes_are_in_force_on_the_next_request(
    storage: Storage, accounts: AccountStore, limiter: Limiter
) -> None:
    key_id = await new_key(accounts)
    assert (await limiter.admit(admission(key_id, "gpt-4o"))).allowed  # learns: none
    await accounts.update_key(key_id, {"model_limits": {"gpt-4o": {"rpm": 1}}})
    assert (await limiter.admit(admission(key_id, "gpt-4o"))).allowed
    assert not (await limiter.admit(admission(key_id, "gpt-4o"))).allowed
    await accounts.update_key(key_id, {"model_limits": {"gpt-4o": {"rpm": 1, "tpm": 50}}})
    assert not (await limiter.admit(admission(key_id, "gpt-4o"))).allowed  # same bucket
    await accounts.update_key(key_id, {"model_limits": {}})
    assert (await limiter.admit(admission(key_id, "gpt-4o"))).allowed


async def test_without_model_limits_the_script_gets_nothing_more(
    storage: Storage, accounts: AccountStore, limiter: Limiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id = await new_key(accounts, rpm=10)
    calls: list[tuple[int, int]] = []
    run = storage.run

    async def counting(name: str, keys: list[str], args: list[Any]) -> Any:
        if name == "admit":
            calls.append((len(keys), len(args)))
        return await run(name, keys, args)

    monkeypatch.setattr(storage, "run", counting)
    assert (await limiter.admit(admission(key_id, "gpt-4o"))).allowed
    assert calls == [(7, 6)]
    scanned = await storage.call("KEYS", "*model-limit*")
    assert scanned == []


# ---------------------------------------------------------------- the admin store


async def test_admin_sets_reads_and_clears_model_limits(accounts: AccountStore) -> None:
    key_id = await new_key(accounts)
    limits = {"gpt-4o*": {"rpm": 60, "tpm": 100_000}}
    account = await accounts.update_account("acme", {"model_limits": limits})
    assert model_limits.encode(account.model_limits) == '{"gpt-4o*":{"rpm":60,"tpm":100000}}'
    key = await accounts.update_key(key_id, {"model_limits": {"o3*": {"tpm": 5}}})
    assert key.model_limits == {"o3*": model_limits.ModelLimit(tpm=5)}
    assert (await accounts.get_key("acme", key_id)).model_limits == key.model_limits
    assert (await accounts.update_key(key_id, {"model_limits": None})).model_limits == {}
    assert (await accounts.update_account("acme", {"model_limits": {}})).model_limits == {}
    with pytest.raises(AccountError, match="positive"):
        await accounts.update_key(key_id, {"model_limits": {"x": {"rpm": 0}}})
    with pytest.raises(AccountError, match="pattern"):
        await accounts.update_account("acme", {"model_limits": {"": {"rpm": 1}}})


# ---------------------------------------------------------------- over HTTP


async def _admin(
    http: aiohttp.ClientSession, gw: Gateway, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.request(method, gw.url + path, json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_the_429_names_the_pattern_and_the_headers_the_tightest(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key(rpm=100)
    record = await gateway.accounts.find_key(key)
    assert record is not None
    status, body = await _admin(
        http,
        gateway,
        "PATCH",
        f"/admin/keys/{record.id}",
        {"model_limits": {"gpt-4o*": {"rpm": 2}}},
    )
    assert status == 200 and body["model_limits"] == {"gpt-4o*": {"rpm": 2}}
    async with openai_client(gateway, key, max_retries=0) as client:
        first = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=CHAT_MESSAGES, max_tokens=5
        )
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        await client.chat.completions.create(model="gpt-4o", messages=CHAT_MESSAGES, max_tokens=5)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=CHAT_MESSAGES, max_tokens=5
            )
    err = caught.value
    assert isinstance(err.body, dict) and err.body["reason"] == "rpm_exceeded"
    assert "key limit for models matching `gpt-4o*` is 2 requests per minute" in err.body["message"]
    assert err.response.headers["x-ratelimit-limit-requests"] == "2"
    # The account's own patterns, shown and cleared through the admin API.
    status, body = await _admin(
        http, gateway, "PATCH", "/admin/accounts/acme", {"model_limits": {"o3*": {"tpm": 500}}}
    )
    assert status == 200 and body["model_limits"] == {"o3*": {"tpm": 500}}
    status, body = await _admin(http, gateway, "GET", "/admin/accounts/acme")
    assert body["model_limits"] == {"o3*": {"tpm": 500}}
    for bad in ({"": {"rpm": 1}}, {"x": {"rpm": 0}}, {"x": {}}, {"x": {"rph": 1}}):
        status, body = await _admin(
            http, gateway, "PATCH", "/admin/accounts/acme", {"model_limits": bad}
        )
        assert status == 400, (bad, body)
    status, body = await _admin(
        http, gateway, "PATCH", "/admin/accounts/acme", {"model_limits": None}
    )
    assert status == 200 and body["model_limits"] == {}


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_sets_shows_and_clears_model_limits(redis_url: str) -> None:
    storage = ("--storage", redis_url)
    cli_json("accounts", "create", "acme", *storage)
    account = cli_json(
        "accounts", "update", "acme", "--model-limits", "gpt-4o*:rpm=60:tpm=100000", *storage
    )
    assert account["model_limits"] == {"gpt-4o*": {"rpm": 60, "tpm": 100000}}
    shown = cli("accounts", "show", "acme", *storage)
    assert shown.returncode == 0 and "gpt-4o*" in shown.stdout, shown
    key = cli_json("keys", "create", "acme", *storage)
    updated = cli_json(
        "keys", "update", key["id"], "--model-limits", "a:b:rpm=1,o3*:tpm=5", *storage
    )
    assert updated["model_limits"] == {"a:b": {"rpm": 1}, "o3*": {"tpm": 5}}
    listed = cli("keys", "list", "acme", *storage)
    assert "o3*" in listed.stdout
    refused = cli("keys", "update", key["id"], "--model-limits", "gpt-4o", *storage)
    assert refused.returncode != 0 and "PATTERN:rpm=N" in refused.stderr
    cleared = cli_json("keys", "update", key["id"], "--no-model-limits", *storage)
    assert cleared["model_limits"] == {}
    assert (
        cli_json("accounts", "update", "acme", "--no-model-limits", *storage)["model_limits"] == {}
    )
