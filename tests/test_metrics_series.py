"""Metric series from start-up, and admin calls in the metrics (issue 17, item 10).

The labelled series whose label values are few and known at start-up (rejection reasons,
storage operations and their errors, hold events, the breaker) exist at zero on a fresh
gateway, so a dashboard shows 0 and ``increase()`` sees the first event. Admin calls count
as ``protocol="admin"`` requests, never as rejections; a wrong admin token has its own
counter. Read back from ``/metrics`` of a real gateway on memory:// and on a real Redis.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ratelimit_gw.errors import REJECTION_REASONS
from ratelimit_gw.metrics import HOLD_EVENTS, STORAGE_OPERATIONS
from ratelimit_gw.storage import Storage
from ratelimit_gw.storage.scripts import SCRIPT_NAMES

from .conftest import ADMIN_TOKEN, Gateway, Upstream, start_gateway

PACKAGE = Path(__file__).resolve().parent.parent / "ratelimit_gw"
Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def series(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {labels[label]: value for labels, value in samples.get(name, [])}


async def call(
    gw: Gateway, method: str, path: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, gw.url + path, data=body, headers=headers) as response,
    ):
        return response.status, await response.json()


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


# --- series from start-up ----------------------------------------------------------------------


async def test_a_fresh_gateway_exports_its_bounded_series_at_zero(gateway: Gateway) -> None:
    m = await scrape(gateway.url)
    assert series(m, "rlgw_rejections_total", "reason") == dict.fromkeys(REJECTION_REASONS, 0)
    errors = series(m, "rlgw_storage_errors_total", "operation")
    assert errors == dict.fromkeys(STORAGE_OPERATIONS, 0)
    calls = series(m, "rlgw_storage_duration_seconds_count", "operation")
    assert set(calls) == set(STORAGE_OPERATIONS)  # (a start-up check may have made a call)
    assert set(SCRIPT_NAMES) | {"get", "ping", "pipeline"} <= set(STORAGE_OPERATIONS)
    assert series(m, "rlgw_holds_total", "event") == dict.fromkeys(HOLD_EVENTS, 0)
    assert set(HOLD_EVENTS) == {"placed", "settled", "expired"}
    assert series(m, "rlgw_config_reloads_total", "outcome") == {"ok": 0, "failed": 0}
    assert series(m, "rlgw_config_info", "digest") == {"": 1}  # built in code: no file
    for name in (
        "rlgw_breaker_state",
        "rlgw_admin_auth_failures_total",
        "rlgw_buffered_body_bytes",
        "rlgw_inflight_requests",
    ):
        assert m[name] == [({}, 0.0)], name
    # Not the route × model × status cross-product: those appear with traffic.
    assert "rlgw_requests_total" not in m


async def test_with_the_account_label_the_start_up_series_carry_no_account(
    upstream: Upstream, storage: Storage
) -> None:
    runner, gw = await start_gateway(upstream, storage, metrics={"account_label": True})
    try:
        m = await scrape(gw.url)
    finally:
        await runner.cleanup()
    rejections = m["rlgw_rejections_total"]
    assert {labels["reason"] for labels, _ in rejections} == set(REJECTION_REASONS)
    assert {(labels["account"], value) for labels, value in rejections} == {("-", 0.0)}


def test_every_reason_the_gateway_answers_with_is_in_the_rejection_reasons() -> None:
    """Each literal reason a GatewayError is raised with (the admin modules' aside: an admin
    answer is never a rejection)."""
    raised: dict[str, str] = {}
    for module in PACKAGE.rglob("*.py"):
        if module.name.startswith("admin"):  # admin.py, admin_routes.py, …
            continue
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "GatewayError"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                raised[node.args[1].value] = module.name
    assert len(raised) >= 15
    assert {
        reason: where for reason, where in raised.items() if reason not in REJECTION_REASONS
    } == {}


# --- admin calls -------------------------------------------------------------------------------


async def test_admin_calls_are_labelled_admin_and_their_errors_are_not_rejections(
    gateway: Gateway,
) -> None:
    assert (await call(gateway, "POST", "/admin/accounts", ADMIN, b'{"id": "acme"}'))[0] == 201
    status, answer = await call(gateway, "POST", "/admin/accounts", ADMIN, b"{not json")
    # The OpenAI envelope (§7), though the protocol label says admin.
    assert (status, set(answer), answer["error"]["reason"]) == (400, {"error"}, "invalid_json")
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["code"] == "400" and "param" in answer["error"]
    assert (await call(gateway, "GET", "/admin/accounts/ghost", ADMIN))[0] == 404
    assert (await call(gateway, "POST", "/admin/accounts", ADMIN, b'{"id": "acme"}'))[0] == 409

    m = await scrape(gateway.url)
    requests = {
        (labels["route"], labels["status"]): value
        for labels, value in m["rlgw_requests_total"]
        if labels["protocol"] == "admin"
    }
    assert requests == {
        ("/admin/accounts", "201"): 1,
        ("/admin/accounts", "400"): 1,
        ("/admin/accounts/{id}", "404"): 1,
        ("/admin/accounts", "409"): 1,
    }
    assert {labels["protocol"] for labels, _ in m["rlgw_requests_total"]} == {"admin"}
    assert sum(value for _, value in m["rlgw_rejections_total"]) == 0


async def test_admin_authentication_failures_have_their_own_counter(gateway: Gateway) -> None:
    wrong = {"Authorization": "Bearer not-the-token"}
    for headers in (wrong, wrong, {}):
        status, answer = await call(gateway, "GET", "/admin/accounts", headers)
        assert (status, answer["error"]["reason"]) == (401, "invalid_admin_token")
        assert answer["error"]["type"] == "authentication_error"
    assert (await call(gateway, "GET", "/admin/accounts", ADMIN))[0] == 200

    m = await scrape(gateway.url)
    assert m["rlgw_admin_auth_failures_total"] == [({}, 3.0)]
    assert sum(value for _, value in m["rlgw_rejections_total"]) == 0
    statuses = {
        labels["status"]: value
        for labels, value in m["rlgw_requests_total"]
        if labels["protocol"] == "admin"
    }
    assert statuses == {"401": 3, "200": 1}
