"""The Settler's branches without a gateway around it: a first attempt that succeeds, one that
fails on storage (retried), and one that fails for another reason (counted, not retried)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from ratelimit_gw import settler as settler_module
from ratelimit_gw.limiter import Limiter, Settlement, SettleResult
from ratelimit_gw.metrics import create_metrics
from ratelimit_gw.settler import Settler
from ratelimit_gw.storage import StorageError
from ratelimit_gw.upstream_pool import PoolStore

SETTLEMENT = Settlement(
    account_id="acct",
    key_id="key_1",
    request_id="req_1",
    estimated_tokens=100,
    input_tokens=3,
    output_tokens=20,
    cost_nano=12_450,
    model="gpt-4o-mini",
    outcome="ok",
)
SETTLED_REPLY = [1, 0, "999", "42150"]


class ScriptedLimiter:
    """Stands in for Limiter: the first attempt's outcome is given, retries are counted."""

    def __init__(self, first: BaseException | list[Any]) -> None:
        self.first = first
        self.retries = 0

    def start_settle(self, settlement: Settlement) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if isinstance(self.first, BaseException):
            future.set_exception(self.first)
        else:
            future.set_result(self.first)
        return future

    async def settle(self, settlement: Settlement) -> SettleResult:
        self.retries += 1
        return SettleResult(settled=True, overrun=False, balance_nano=999, released_nano=42150)


def make_settler(limiter: ScriptedLimiter) -> tuple[Settler, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = create_metrics(registry)
    pools = cast(PoolStore, object())  # not reached: no settlement here has a tpm ceiling
    return Settler(cast(Limiter, limiter), metrics, pools), registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_first_attempt_that_succeeds_is_recorded_once() -> None:
    limiter = ScriptedLimiter(SETTLED_REPLY)
    settler, registry = make_settler(limiter)
    settler.submit(SETTLEMENT)
    await settler.drain(timeout_s=2)
    assert settler.pending == 0 and limiter.retries == 0
    labels = {"model": "gpt-4o-mini", "direction": "output"}
    assert sample(registry, "rlgw_tokens_total", **labels) == 20
    assert sample(registry, "rlgw_holds_total", event="settled") == 1
    assert sample(registry, "rlgw_settlement_failures_total") == 0


async def test_a_storage_failure_is_retried_and_then_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settler_module, "RETRY_DELAYS_S", (0.0,))
    limiter = ScriptedLimiter(StorageError("storage call settle failed: ConnectionError"))
    settler, registry = make_settler(limiter)
    settler.submit(SETTLEMENT)
    await settler.drain(timeout_s=2)
    assert settler.pending == 0 and limiter.retries == 1
    assert sample(registry, "rlgw_holds_total", event="settled") == 1
    assert sample(registry, "rlgw_settlement_failures_total") == 0


async def test_an_unexpected_failure_is_counted_logged_and_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = ScriptedLimiter(ValueError("a reply of the wrong shape"))
    settler, registry = make_settler(limiter)
    with caplog.at_level("ERROR", logger="ratelimit_gw.settle"):
        settler.submit(SETTLEMENT)
        await settler.drain(timeout_s=2)
    assert settler.pending == 0 and limiter.retries == 0
    assert sample(registry, "rlgw_settlement_failures_total") == 1
    assert sample(registry, "rlgw_holds_total", event="settled") == 0
    assert any(
        "req_1" in record.getMessage() and record.exc_info is not None for record in caplog.records
    )
