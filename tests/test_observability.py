"""Observability (SPEC §13, §1 health routes): /metrics, /healthz, /readyz and the access log.

Metric values are read back from the ``/metrics`` exposition after real traffic through the
gateway; the dashboard and the alert rules in ``deploy/`` are checked against that
exposition and, at the end, against a real Prometheus scraping a real gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from ratelimit_gw.money import cost_nano, format_usd, parse_usd
from ratelimit_gw.protocols import input_token_bound
from ratelimit_gw.services import SERVICES
from ratelimit_gw.settings import StorageSettings
from ratelimit_gw.storage import Storage, open_storage

from .conftest import (
    ADMIN_TOKEN,
    MODELS,
    UPSTREAM_KEY,
    Gateway,
    Upstream,
    gateway_config,
    start_gateway,
)
from .processes import serve_env, start_serve, stop_all, wait_ready
from .redis_process import free_port, start_redis

pytestmark = pytest.mark.ops  # runs promtool and a real Prometheus against gateway processes

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMPT = "Count the tokens of this prompt, please."
CHAT = [{"role": "user", "content": PROMPT}]
GEMINI = "gemini-2.5-flash"
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
PRICES = {name: (parse_usd(inp), parse_usd(out)) for name, _proto, inp, out in MODELS}
# Labels Prometheus adds at scrape time; the gateway never exports them itself.
TARGET_LABELS = {"instance", "job"}

Samples = dict[str, list[tuple[dict[str, str], float]]]


# --- helpers ---------------------------------------------------------------------------------


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    """GET /metrics and index every sample by its name."""
    async with http.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels`` (0 if none)."""
    return sum(v for have, v in samples.get(name, []) if labels.items() <= have.items())


async def quiesce(gw: Gateway) -> None:
    """Wait until no request is in flight and every settlement has been written."""
    svc = gw.app[SERVICES]
    deadline = time.monotonic() + 10
    while svc.registry.get_sample_value("rlgw_inflight_requests") != 0:
        assert time.monotonic() < deadline, "requests stayed in flight"
        await asyncio.sleep(0.01)
    await svc.settler.drain()
    assert svc.settler.pending == 0


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, CIMultiDict[str], str]:
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, response.headers.copy(), await response.text()


async def chat(
    http: aiohttp.ClientSession,
    gw: Gateway,
    key: str,
    model: str = "gpt-4o-mini",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[int, CIMultiDict[str], str]:
    return await post(
        http,
        f"{gw.url}/v1/chat/completions",
        {"model": model, "messages": CHAT, **extra},
        {"Authorization": f"Bearer {key}", **(headers or {})},
    )


@dataclass
class Exercise:
    """What :func:`exercise` sent, to compare the metrics with."""

    usage: dict[str, tuple[int, int]]  # model -> settled (input, output) tokens


async def exercise(http: aiohttp.ClientSession, gw: Gateway) -> Exercise:
    """A short, varied workload: every protocol, a stream, a 429, a 402, a 401, an upstream
    error and a balance overrun."""
    usage: dict[str, tuple[int, int]] = {}

    def add(model: str, tokens_in: int, tokens_out: int) -> None:
        before = usage.get(model, (0, 0))
        usage[model] = (before[0] + tokens_in, before[1] + tokens_out)

    key = await gw.new_key("acme", balance_usd="5.00")
    status, _, text = await chat(http, gw, key)
    assert status == 200, text
    reply = json.loads(text)["usage"]
    add("gpt-4o-mini", reply["prompt_tokens"], reply["completion_tokens"])

    status, _, text = await chat(http, gw, key, stream=True, stream_options={"include_usage": True})
    assert status == 200, text
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    streamed = chunks[-1]["usage"]
    add("gpt-4o-mini", streamed["prompt_tokens"], streamed["completion_tokens"])

    status, _, text = await post(
        http,
        f"{gw.url}/v1/messages",
        {"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": CHAT},
        {"x-api-key": key, "anthropic-version": "2023-06-01"},
    )
    assert status == 200, text
    reply = json.loads(text)["usage"]
    add("claude-sonnet-4-6", reply["input_tokens"], reply["output_tokens"])

    status, _, text = await post(
        http,
        f"{gw.url}/v1beta/models/gemini-2.5-flash:generateContent",
        GEMINI_BODY,
        {"x-goog-api-key": key},
    )
    assert status == 200, text
    reply = json.loads(text)["usageMetadata"]
    add("gemini-2.5-flash", reply["promptTokenCount"], reply["candidatesTokenCount"])

    status, _, text = await chat(http, gw, key, headers={"x-mock-error": "500"})
    assert status == 500, text  # the provider's error, relayed; nothing charged

    limited = await gw.new_key("limited", rpm=1)
    status, _, text = await chat(http, gw, limited)
    assert status == 200, text
    reply = json.loads(text)["usage"]
    add("gpt-4o-mini", reply["prompt_tokens"], reply["completion_tokens"])
    assert (await chat(http, gw, limited))[0] == 429

    broke = await gw.new_key("broke", balance_usd="0.000001")
    assert (await chat(http, gw, broke))[0] == 402

    # The balance pays for twice the hold of max_tokens=1 (input estimated from the body
    # size), but the upstream ignores the cap and answers 200 tokens: an overrun.
    body = {"model": "gpt-4o", "messages": CHAT, "max_tokens": 1}
    hold = cost_nano(input_token_bound(len(json.dumps(body))), 1, *PRICES["gpt-4o"])
    tight = await gw.new_key("tight", balance_usd=format_usd(hold * 2))
    status, _, text = await chat(
        http,
        gw,
        tight,
        "gpt-4o",
        headers={"x-mock-ignore-cap": "1", "x-mock-chunks": "40"},
        max_tokens=1,
    )
    assert status == 200, text
    reply = json.loads(text)["usage"]
    add("gpt-4o", reply["prompt_tokens"], reply["completion_tokens"])

    assert (await chat(http, gw, "rlgw-not-a-real-key"))[0] == 401
    await quiesce(gw)
    return Exercise(usage)


# --- metric values ---------------------------------------------------------------------------


async def test_requests_are_counted_by_route_protocol_model_and_status(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await exercise(http, gateway)
    m = await scrape(http, gateway.url)
    chat_route = {"route": "/v1/chat/completions", "protocol": "openai"}
    requests = "rlgw_requests_total"
    assert value(m, requests, **chat_route, model="gpt-4o-mini", status="200") == 3
    assert value(m, requests, **chat_route, model="gpt-4o-mini", status="500") == 1
    assert value(m, requests, **chat_route, model="gpt-4o-mini", status="429") == 1
    assert value(m, requests, **chat_route, model="gpt-4o-mini", status="402") == 1
    assert value(m, requests, **chat_route, model="gpt-4o", status="200") == 1
    assert value(m, requests, **chat_route, model="-", status="401") == 1  # before resolution
    assert value(m, requests, route="/v1/messages", protocol="anthropic", status="200") == 1
    gemini = {"route": "/v1beta/models/{model_action}", "protocol": "gemini"}
    assert value(m, requests, **gemini, model="gemini-2.5-flash", status="200") == 1
    assert value(m, requests) == 10
    # The duration histogram saw each of them, once.
    assert value(m, "rlgw_request_duration_seconds_count", **chat_route) == 8
    assert value(m, "rlgw_request_duration_seconds_count") == 10
    assert value(m, "rlgw_request_duration_seconds_bucket", le="+Inf") == 10


async def test_rejections_are_counted_by_reason(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await exercise(http, gateway)
    m = await scrape(http, gateway.url)
    # Every known reason has a series from start-up; these are the ones that counted.
    rejections = {tuple(labels.items()): v for labels, v in m["rlgw_rejections_total"] if v}
    assert rejections == {
        (("reason", "rpm_exceeded"),): 1,
        (("reason", "balance_exceeded"),): 1,
        (("reason", "invalid_key"),): 1,
    }


async def test_settled_tokens_and_cost_match_the_upstream_usage_times_the_price(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    sent = await exercise(http, gateway)
    m = await scrape(http, gateway.url)
    assert set(sent.usage) == {"gpt-4o-mini", "gpt-4o", "claude-sonnet-4-6", "gemini-2.5-flash"}
    for model, (tokens_in, tokens_out) in sent.usage.items():
        assert value(m, "rlgw_tokens_total", model=model, direction="input") == tokens_in
        assert value(m, "rlgw_tokens_total", model=model, direction="output") == tokens_out
        # Summed per request, each rounded up to a nano-USD: within one nano per request.
        expected_usd = (tokens_in * PRICES[model][0] + tokens_out * PRICES[model][1]) / 1e15
        assert value(m, "rlgw_cost_usd_total", model=model) == pytest.approx(expected_usd, abs=1e-8)
    # The upstream error and the rejected requests cost nothing.
    assert value(m, "rlgw_cost_usd_total") == pytest.approx(
        sum(
            (i * PRICES[model][0] + o * PRICES[model][1]) / 1e15
            for model, (i, o) in sent.usage.items()
        ),
        abs=1e-7,
    )


async def test_holds_overruns_upstream_outcomes_and_storage_calls_are_counted(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await exercise(http, gateway)
    m = await scrape(http, gateway.url)
    # Every admitted request holds its worst-case cost (prepaid or not): 5 on acme (the 500
    # included), 1 on limited, 1 on tight; the 402 and the 429 placed none.
    assert value(m, "rlgw_holds_total", event="placed") == 7
    assert value(m, "rlgw_holds_total", event="settled") == 7
    assert value(m, "rlgw_balance_overruns_total") == 1
    assert value(m, "rlgw_settlement_failures_total") == 0
    assert value(m, "rlgw_upstream_responses_total", provider="mock-openai", outcome="2xx") == 4
    assert value(m, "rlgw_upstream_responses_total", provider="mock-openai", outcome="5xx") == 1
    assert value(m, "rlgw_upstream_responses_total", provider="mock-anthropic") == 1
    assert value(m, "rlgw_upstream_responses_total", provider="mock-gemini") == 1
    assert value(m, "rlgw_upstream_ttfb_seconds_count") == 7
    assert value(m, "rlgw_upstream_ttfb_seconds_count", model="claude-sonnet-4-6") == 1
    # Every admitted or refused request ran admit.lua; every upstream call was settled.
    assert value(m, "rlgw_storage_duration_seconds_count", operation="admit") == 9
    assert value(m, "rlgw_storage_duration_seconds_count", operation="settle") == 7
    assert value(m, "rlgw_storage_duration_seconds_sum", operation="admit") > 0
    assert value(m, "rlgw_storage_errors_total") == 0
    assert value(m, "rlgw_breaker_state") == 0
    assert value(m, "rlgw_inflight_requests") == 0


async def test_inflight_counts_a_request_while_it_streams_and_returns_to_zero(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await gateway.new_key()
    slow = {"Authorization": f"Bearer {key}", "x-mock-latency-ms": "300"}
    body = {"model": "gpt-4o-mini", "messages": CHAT}
    task = asyncio.create_task(post(http, f"{gateway.url}/v1/chat/completions", body, slow))
    deadline = time.monotonic() + 5
    while value(await scrape(http, gateway.url), "rlgw_inflight_requests") != 1:
        assert time.monotonic() < deadline, "the in-flight request was never counted"
        await asyncio.sleep(0.01)
    assert (await task)[0] == 200
    await quiesce(gateway)
    assert value(await scrape(http, gateway.url), "rlgw_inflight_requests") == 0


async def test_no_series_has_an_account_label_by_default(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await exercise(http, gateway)
    m = await scrape(http, gateway.url)
    assert not [name for name, rows in m.items() for labels, _ in rows if "account" in labels]
    # No gateway key either; ``key`` on the upstream series names a provider's own pool key.
    assert not [
        name
        for name, rows in m.items()
        for labels, _ in rows
        if "key" in labels and not name.startswith("rlgw_upstream_")
    ]


async def test_account_label_opt_in_labels_requests_rejections_tokens_and_cost(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession
) -> None:
    runner, gw = await start_gateway(upstream, storage, metrics={"account_label": True})
    try:
        key = await gw.new_key("acme", rpm=1)
        assert (await chat(http, gw, key))[0] == 200
        assert (await chat(http, gw, key))[0] == 429
        assert (await chat(http, gw, "rlgw-unknown"))[0] == 401
        await quiesce(gw)
        m = await scrape(http, gw.url)
    finally:
        await runner.cleanup()
    assert value(m, "rlgw_requests_total", account="acme", status="200") == 1
    assert value(m, "rlgw_requests_total", account="acme", status="429") == 1
    assert value(m, "rlgw_requests_total", account="-", status="401") == 1
    assert value(m, "rlgw_rejections_total", account="acme", reason="rpm_exceeded") == 1
    assert value(m, "rlgw_tokens_total", account="acme", direction="output") == 20
    assert value(m, "rlgw_cost_usd_total", account="acme", model="gpt-4o-mini") > 0
    for name in ("rlgw_requests_total", "rlgw_rejections_total", "rlgw_tokens_total"):
        assert all("account" in labels for labels, _ in m[name]), name


# --- several worker processes ------------------------------------------------------------------


async def test_two_worker_processes_sharing_a_multiproc_dir_report_the_sum(
    upstream: Upstream, storage: Storage, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    config = gateway_config(upstream.url, storage.url)
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(_toml(config))
    multiproc = tmp_path / "metrics"
    multiproc.mkdir()
    env = serve_env(PROMETHEUS_MULTIPROC_DIR=str(multiproc), RLGW_ADMIN_TOKEN=ADMIN_TOKEN)
    ports = [free_port(), free_port()]
    processes = [
        start_serve(
            config_file, port=port, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    per_process = 4
    try:
        for url, process in zip(urls, processes, strict=True):
            await wait_ready([url], path="/healthz", process=process)
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for i, url in enumerate(urls):
            account = f"team-{i}"  # memory:// is per process: each creates its own
            async with http.post(f"{url}/admin/accounts", json={"id": account}, headers=admin) as r:
                assert r.status in (200, 201), await r.text()
            async with http.post(
                f"{url}/admin/keys", json={"account": account}, headers=admin
            ) as r:
                key = (await r.json())["key"]
            for _ in range(per_process):
                status, _, text = await post(
                    http,
                    f"{url}/v1/chat/completions",
                    {"model": "gpt-4o-mini", "messages": CHAT},
                    {"Authorization": f"Bearer {key}"},
                )
                assert status == 200, text
        # Settlement runs after the response: wait for both workers' counters.
        deadline = time.monotonic() + 10
        while True:
            views = [await scrape(http, url) for url in urls]
            if all(value(v, "rlgw_tokens_total", direction="output") == 160 for v in views):
                break
            assert time.monotonic() < deadline, "settled tokens never reached both workers' sum"
            await asyncio.sleep(0.05)
    finally:
        errors = stop_all(processes)
    chat_ok = {"route": "/v1/chat/completions", "status": "200", "model": "gpt-4o-mini"}
    for view in views:
        assert value(view, "rlgw_requests_total", **chat_ok) == 2 * per_process, errors
        route = "/v1/chat/completions"
        assert value(view, "rlgw_request_duration_seconds_count", route=route) == 8
        assert value(view, "rlgw_upstream_responses_total", outcome="2xx") == 8
        assert value(view, "rlgw_holds_total", event="placed") == 8
        assert value(view, "rlgw_holds_total", event="settled") == 8
        assert value(view, "rlgw_inflight_requests") == 0
    # `serve` writes the access log as bare JSON lines (a log shipper parses each whole).
    for stderr in errors:
        access = [line for line in stderr.splitlines() if '"request_id"' in line]
        assert len(access) == 2 + per_process  # two admin calls, then the chat requests
        assert all(json.loads(line)["status"] in (200, 201) for line in access), access
        assert "listening on http://127.0.0.1:" in stderr  # the gateway's own text logs
    # Each worker kept its own value files in the shared directory.
    pids = {p.stem.rpartition("_")[2] for p in multiproc.glob("counter_*.db")}
    assert pids == {str(process.pid) for process in processes}


def _toml(document: dict[str, Any]) -> str:
    """Just enough TOML for :func:`gateway_config`'s shape (tables and arrays of tables)."""
    lines: list[str] = []
    for name, section in document.items():
        for row in section if isinstance(section, list) else [section]:
            lines.append(f"[[{name}]]" if isinstance(section, list) else f"[{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in row.items()]
    return "\n".join(lines) + "\n"


# --- health ------------------------------------------------------------------------------------


async def test_healthz_answers_and_readyz_is_ready_with_storage_up(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/healthz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ok"})
    async with http.get(f"{gateway.url}/readyz") as response:
        assert response.status == 200
        assert await response.json() == {
            "ready": True,
            "config": True,
            "storage": True,
            "draining": False,
        }


async def test_readyz_is_503_while_draining_and_healthz_stays_200(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    gateway.app[SERVICES].draining = True
    async with http.get(f"{gateway.url}/readyz") as response:
        assert response.status == 503
        assert (await response.json())["draining"] is True
    async with http.get(f"{gateway.url}/healthz") as response:
        assert response.status == 200


async def test_readyz_is_503_when_storage_is_unreachable(
    upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # The background tasks (key-change feed, upstream probe, webhook deliverer) fail against
    # it too: a breaker that never opens lets the ping below reach it and count.
    dead = open_storage(
        StorageSettings(
            url=f"redis://127.0.0.1:{free_port()}/0",
            connect_timeout_s=0.2,
            command_timeout_s=0.2,
            breaker_failures=1000,
        )
    )
    runner, gw = await start_gateway(upstream, dead)
    try:
        async with http.get(f"{gw.url}/readyz") as response:
            assert response.status == 503
            assert await response.json() == {
                "ready": False,
                "config": True,
                "storage": False,
                "draining": False,
            }
        async with http.get(f"{gw.url}/healthz") as response:
            assert response.status == 200  # alive: restarting it would not bring Redis back
        m = await scrape(http, gw.url)
    finally:
        await runner.cleanup()
        await dead.close()
    assert value(m, "rlgw_storage_errors_total", operation="ping") == 1
    assert value(m, "rlgw_storage_duration_seconds_count", operation="ping") == 1


async def test_probes_and_scrapes_are_neither_counted_nor_logged(
    gateway: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimit_gw.access")
    for path in ("/healthz", "/readyz", "/metrics", "/healthz"):
        async with http.get(f"{gateway.url}{path}") as response:
            assert response.status == 200
    m = await scrape(http, gateway.url)
    assert value(m, "rlgw_requests_total") == 0
    assert value(m, "rlgw_request_duration_seconds_count") == 0
    assert [r for r in caplog.records if r.name == "ratelimit_gw.access"] == []


async def test_storage_outage_opens_the_breaker_and_counts_errors_and_rejections(
    outage: Gateway, http: aiohttp.ClientSession
) -> None:
    m = await scrape(http, outage.url)
    assert value(m, "rlgw_breaker_state") == 2
    assert value(m, "rlgw_storage_errors_total") == 2  # then the breaker refuses calls
    assert value(m, "rlgw_rejections_total", reason="storage_unavailable") == 2
    assert value(m, "rlgw_requests_total", status="503") == 2


# --- access log ----------------------------------------------------------------------------------


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    lines = []
    for record in caplog.records:
        if record.name == "ratelimit_gw.access":
            message = record.getMessage()
            assert "\n" not in message
            lines.append(json.loads(message))
    return lines


ACCESS_FIELDS = {
    "ts",
    "request_id",
    "settlement_id",
    "method",
    "path",
    "route",
    "protocol",
    "status",
    "reason",
    "key_id",
    "account",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "duration_ms",
    "upstream_ttfb_ms",
    "client",
    "user_agent",
    "upstream",
    "upstream_key",
    "attempts",
}


async def test_access_log_writes_one_json_line_per_request_with_its_outcome(
    gateway: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimit_gw.access")
    key = await gateway.new_key("acme", rpm=1)
    (record,) = await gateway.accounts.list_keys("acme")
    status, headers, text = await chat(http, gateway, key, headers={"x-request-id": "req-ok-1"})
    assert status == 200
    usage = json.loads(text)["usage"]
    status, headers_429, _ = await chat(http, gateway, key)
    assert status == 429
    assert (await chat(http, gateway, "rlgw-no-such-key"))[0] == 401
    await quiesce(gateway)

    ok, limited, refused = access_lines(caplog)
    assert set(ok) == set(limited) == set(refused) == ACCESS_FIELDS
    in_price, out_price = PRICES["gpt-4o-mini"]
    assert ok == {
        **ok,
        "request_id": "req-ok-1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": "/v1/chat/completions",
        "protocol": "openai",
        "status": 200,
        "reason": None,
        "key_id": record.id,
        "account": "acme",
        "model": "gpt-4o-mini",
        "client": "127.0.0.1",
        "input_tokens": usage["prompt_tokens"],
        "output_tokens": usage["completion_tokens"],
        "cost_usd": format_usd(
            cost_nano(usage["prompt_tokens"], usage["completion_tokens"], in_price, out_price)
        ),
    }
    assert headers["x-request-id"] == "req-ok-1"
    assert 0 < ok["upstream_ttfb_ms"] <= ok["duration_ms"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", ok["ts"])
    assert limited == {
        **limited,
        "request_id": headers_429["x-request-id"],
        "status": 429,
        "reason": "rpm_exceeded",
        "key_id": record.id,
        "account": "acme",
        "model": "gpt-4o-mini",
        "input_tokens": 0,
        "output_tokens": 0,
        "cost_usd": "0.00",
        "upstream_ttfb_ms": None,
    }
    assert limited["duration_ms"] > 0
    assert refused == {
        **refused,
        "status": 401,
        "reason": "invalid_key",
        "key_id": None,
        "account": None,
        "model": None,
        "upstream_ttfb_ms": None,
    }


async def test_access_log_covers_streams_every_protocol_and_upstream_errors(
    gateway: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimit_gw.access")
    sent = await exercise(http, gateway)
    lines = access_lines(caplog)
    assert len(lines) == 10
    assert len({line["request_id"] for line in lines}) == 10
    by_model: dict[str, tuple[int, int]] = {}
    for line in lines:
        if line["model"] and line["status"] == 200:
            before = by_model.get(line["model"], (0, 0))
            by_model[line["model"]] = (
                before[0] + line["input_tokens"],
                before[1] + line["output_tokens"],
            )
    assert by_model == sent.usage  # the log's tokens are what was settled
    protocols = {(line["protocol"], line["route"]) for line in lines}
    assert {
        ("openai", "/v1/chat/completions"),
        ("anthropic", "/v1/messages"),
        ("gemini", "/v1beta/models/{model_action}"),
    } <= protocols
    (upstream_error,) = [line for line in lines if line["status"] == 500]
    assert (upstream_error["input_tokens"], upstream_error["cost_usd"]) == (0, "0.00")
    assert upstream_error["upstream_ttfb_ms"] is not None
    statuses = sorted(line["status"] for line in lines)
    assert statuses == [200] * 6 + [401, 402, 429, 500]


async def test_no_credential_appears_in_any_log_record_or_error_body(
    gateway: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level
    key = await gateway.new_key("acme", balance_usd="1.00")
    limited = await gateway.new_key("limited", rpm=1)
    wrong_key = "rlgw-" + "W" * 43  # shaped like a real key, but unknown
    wrong_admin = "admin-token-that-is-wrong-123"
    bodies: list[str] = []
    v1beta = f"{gateway.url}/v1beta/models/gemini-2.5-flash:generateContent"
    attempts: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        (f"{gateway.url}/v1/chat/completions", {"model": "gpt-4o-mini", "messages": CHAT}, {}),
        (
            f"{gateway.url}/v1/messages",
            {"model": "claude-sonnet-4-6", "max_tokens": 20, "messages": CHAT},
            {"anthropic-version": "2023-06-01"},
        ),
        (v1beta, GEMINI_BODY, {}),
        (f"{v1beta}?key={{key}}", GEMINI_BODY, {}),
    ]
    auth_forms = [
        lambda k: {"Authorization": f"Bearer {k}"},
        lambda k: {"x-api-key": k},
        lambda k: {"x-goog-api-key": k},
        lambda k: {},
    ]
    for secret in (key, wrong_key):
        for (url, body, extra), form in zip(attempts, auth_forms, strict=True):
            for more in ({}, {"x-mock-error": "503"}):
                status, headers, text = await post(
                    http, url.replace("{key}", secret), body, {**form(secret), **extra, **more}
                )
                bodies.append(f"{status} {headers} {text}")
    # Past the rpm limit (429), and a model of another protocol (the protocol guard).
    for secret, model in ((limited, "gpt-4o-mini"), (limited, "gpt-4o-mini"), (key, GEMINI)):
        status, headers, text = await chat(http, gateway, secret, model)
        bodies.append(f"{status} {headers} {text}")
    for token in (ADMIN_TOKEN, wrong_admin):
        async with http.get(
            f"{gateway.url}/admin/keys?account=acme", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            bodies.append(f"{response.status} {dict(response.headers)} {await response.text()}")
    await quiesce(gateway)
    # The upstream did receive its credential: the gateway had it in hand.
    assert any(
        UPSTREAM_KEY in r.headers.get("authorization", "") for r in gateway.upstream.state.requests
    )

    secrets = [key, key[-24:], limited, wrong_key, ADMIN_TOKEN, wrong_admin, UPSTREAM_KEY]
    formatter = logging.Formatter()
    assert caplog.records, "nothing was logged at all"
    for record in caplog.records:
        rendered = " ".join(
            [
                record.getMessage(),
                formatter.formatException(record.exc_info) if record.exc_info else "",
                repr(record.__dict__),
            ]
        )
        for secret in secrets:
            assert secret not in rendered, f"{secret!r} logged by {record.name}: {rendered}"
    # What went back to the callers (error bodies and headers) never echoes a credential either.
    for body in bodies:
        for secret in secrets:
            assert secret not in body
    assert {200, 400, 401, 429, 503} <= {int(body[:3]) for body in bodies}


# --- the dashboard and the alert rules against real metrics --------------------------------------


@pytest.fixture
async def outage(upstream: Upstream, http: aiohttp.ClientSession) -> AsyncIterator[Gateway]:
    """A gateway on a private Redis that served :func:`exercise`, then lost its Redis: every
    metric has series (storage errors and an open breaker included)."""
    server = start_redis()
    store = open_storage(
        StorageSettings(
            url=server.url,
            connect_timeout_s=0.2,
            command_timeout_s=0.2,
            breaker_failures=2,
            breaker_cooldown_s=60,
        )
    )
    # Beside the usual providers, a pool with ceilings that no model uses: its keys' state
    # and headroom gauges have series too.
    pool = {
        "name": "mock-pool",
        "protocol": "openai",
        "base_url": upstream.url,
        "keys": [
            {"name": "team-a", "api_key_env": "POOL_KEY_A", "rpm": 100, "tpm": 100000},
            {"name": "team-b", "api_key_env": "POOL_KEY_B"},
        ],
    }
    runner, gw = await start_gateway(
        upstream,
        store,
        {"POOL_KEY_A": "sk-pool-key-a", "POOL_KEY_B": "sk-pool-key-b"},
        providers=[*gateway_config(upstream.url, server.url)["providers"], pool],
    )
    try:
        await exercise(http, gw)
        key = await gw.new_key("after")  # never used: its lookup needs Redis
        server.stop()
        for _ in range(2):
            status, _, text = await chat(http, gw, key)
            assert status == 503, text
        yield gw
    finally:
        await runner.cleanup()
        await store.close()
        server.stop()


# Exported only with [metrics] account_label = true (one series per budget).
OPT_IN_METRICS = ("rlgw_budget_spent_ratio",)


def promql_documents() -> Iterator[tuple[str, str]]:
    """(where, expression) for every PromQL query in the dashboard and the alert rules."""
    dashboard = json.loads((DEPLOY / "grafana/dashboards/ratelimit-gw.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"dashboard panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        yield f"dashboard variable {variable['name']}", variable["definition"]
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]


SELECTOR = re.compile(r"\b(rlgw_[a-z_]+)\s*(?:\{([^}]*)\})?")
MATCHER = re.compile(r'([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|ignoring|on)\s*\(([^)]*)\)")


def check_expression(where: str, expr: str, m: Samples) -> list[str]:
    """Problems with one query against a real exposition: unknown metrics, labels, values."""
    problems = []
    used = SELECTOR.findall(expr)
    if not used and "up{" not in expr and "ALERTS" not in expr:
        problems.append(f"{where}: no rlgw_ metric in {expr!r}")
    label_sets: list[set[str]] = []
    for name, matchers in used:
        if name not in m:
            problems.append(f"{where}: {name} is not in /metrics")
            continue
        have = set().union(*(labels.keys() for labels, _ in m[name]))
        label_sets.append(have)
        for label, op, wanted in MATCHER.findall(matchers):
            if label in TARGET_LABELS:
                continue
            if label not in have:
                problems.append(f"{where}: {name} has no label {label!r}")
                continue
            seen = {labels.get(label, "") for labels, _ in m[name]}
            pattern = re.compile(wanted) if op in ("=~", "!~") else None
            if op == "=" and wanted not in seen:
                problems.append(f"{where}: {name}{{{label}={wanted!r}}} never occurs")
            if pattern and not any(pattern.fullmatch(s) for s in seen):
                problems.append(f"{where}: {name}{{{label}=~{wanted!r}}} matches nothing")
    for group in GROUPING.findall(expr):
        for label in (part.strip() for part in group.split(",") if part.strip()):
            if label not in TARGET_LABELS and not any(label in s for s in label_sets):
                problems.append(f"{where}: no metric of {expr!r} has the label {label!r}")
    return problems


async def test_every_metric_and_label_the_dashboard_and_alerts_query_is_exported(
    outage: Gateway, http: aiohttp.ClientSession
) -> None:
    m = await scrape(http, outage.url)
    documents = list(promql_documents())
    assert len(documents) >= 30
    # Opt-in metrics are not exported by this gateway: tests/test_budget_watch.py checks
    # their queries against one that exports them.
    documents = [(w, e) for w, e in documents if not any(name in e for name in OPT_IN_METRICS)]
    problems = [p for where, expr in documents for p in check_expression(where, expr, m)]
    assert problems == []
    # Every metric the gateway exports is on the dashboard (nothing exported goes unseen).
    dashboard = (DEPLOY / "grafana/dashboards/ratelimit-gw.json").read_text()
    families = {re.sub(r"_(bucket|sum|count|created|total)$", "", name) for name in m}
    assert {f for f in families if f.startswith("rlgw_") and f not in dashboard} == set()


def test_check_expression_reports_unknown_metrics_labels_and_values() -> None:
    m: Samples = {"rlgw_requests_total": [({"status": "200", "route": "/x"}, 1.0)]}
    assert (
        check_expression("t", 'sum by (route) (rate(rlgw_requests_total{status="200"}[1m]))', m)
        == []
    )
    assert check_expression("t", "rate(rlgw_nope_total[1m])", m) == [
        "t: rlgw_nope_total is not in /metrics"
    ]
    assert check_expression("t", 'rlgw_requests_total{reason="x"}', m) == [
        "t: rlgw_requests_total has no label 'reason'"
    ]
    assert check_expression("t", 'rlgw_requests_total{status=~"5.."}', m) == [
        "t: rlgw_requests_total{status=~'5..'} matches nothing"
    ]
    assert check_expression("t", "sum by (model) (rlgw_requests_total)", m) == [
        "t: no metric of 'sum by (model) (rlgw_requests_total)' has the label 'model'"
    ]


# --- a real Prometheus ---------------------------------------------------------------------------


def binary(name: str) -> str:
    from shutil import which

    found = which(name)
    assert found, (
        f"{name} not found: `make test` installs it (Debian package `prometheus`, which "
        "provides both prometheus and promtool)"
    )
    return found


def grafana_to_promql(expr: str) -> str:
    """The dashboard's Grafana variables, as Grafana would expand them."""
    return (
        expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$instance", ".*")
    )


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(DEPLOY / "prometheus/alerts.yml")],
            "scrape_configs": [
                {"job_name": "ratelimit-gw", "static_configs": [{"targets": [target]}]}
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("wb")
        started.append(
            subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
        return f"http://127.0.0.1:{port}"

    yield start
    stop_all(started)


async def query(http: aiohttp.ClientSession, prom: str, expr: str) -> list[dict[str, Any]]:
    async with http.get(f"{prom}/api/v1/query", params={"query": expr}) as response:
        document = await response.json()
    assert document["status"] == "success", (expr, document)
    result: list[dict[str, Any]] = document["data"]["result"]
    return result


async def test_a_real_prometheus_scrapes_the_gateway_and_every_query_returns_data(
    outage: Gateway, http: aiohttp.ClientSession, prometheus_for: Any, tmp_path: Path
) -> None:
    target = outage.url.removeprefix("http://")
    prom = prometheus_for(target)
    deadline = time.monotonic() + 30

    async def until(what: str, ready: Any) -> Any:
        while True:
            with contextlib.suppress(aiohttp.ClientError, AssertionError):
                found = await ready()
                if found:
                    return found
            if time.monotonic() > deadline:
                log = (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"Prometheus never {what} within 30 s; its log:\n{log}")
            await asyncio.sleep(0.2)

    series = await until(
        "returned rlgw_requests_total", lambda: query(http, prom, "rlgw_requests_total")
    )
    labels = {frozenset(s["metric"].items()) for s in series}
    assert (
        frozenset(
            {
                "__name__": "rlgw_requests_total",
                "job": "ratelimit-gw",
                "instance": target,
                "route": "/v1/chat/completions",
                "protocol": "openai",
                "model": "gpt-4o-mini",
                "status": "200",
            }.items()
        )
        in labels
    )
    (ok,) = [
        s
        for s in series
        if (s["metric"]["status"], s["metric"]["model"]) == ("200", "gpt-4o-mini")
        and s["metric"]["route"] == "/v1/chat/completions"
    ]
    assert float(ok["value"][1]) == 3

    # Every dashboard query, as Grafana sends it, returns series once rates have two samples.
    dashboard = json.loads((DEPLOY / "grafana/dashboards/ratelimit-gw.json").read_text())
    exprs = [
        grafana_to_promql(t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])
    ]
    # The instance variable's label_values(metric, label), as the PromQL Grafana runs for it.
    for variable in dashboard["templating"]["list"]:
        metric, label = re.fullmatch(
            r"label_values\((\w+), (\w+)\)", variable["definition"]
        ).groups()
        exprs.append(f"group by ({label}) ({metric})")

    # An opt-in metric's queries must parse (query() fails at once otherwise); this gateway
    # does not export it, so they have no data.
    opt_in = [e for e in exprs if any(name in e for name in OPT_IN_METRICS)]
    for expr in opt_in:
        await query(http, prom, expr)
    without_data = [e for e in exprs if e not in opt_in]
    while without_data:  # a query Prometheus rejects fails at once, in query()
        without_data = [e for e in without_data if not await query(http, prom, e)]
        if without_data:
            assert time.monotonic() < deadline, f"dashboard queries without data: {without_data}"
            await asyncio.sleep(0.2)

    # Every alert rule evaluates without error; the outage's open breaker is already pending.
    async def rules_evaluated() -> list[dict[str, Any]] | None:
        async with http.get(f"{prom}/api/v1/rules") as response:
            groups = (await response.json())["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = await until("evaluated the alert rules", rules_evaluated)
    alerts_file = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    names = {r["alert"] for g in alerts_file["groups"] for r in g["rules"]}
    assert {r["name"] for r in rules} == names
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules] == [
        (r["name"], "ok", "") for r in rules
    ]
    breaker = await until(
        "made RlgwStorageBreakerOpen pending",
        lambda: query(http, prom, 'ALERTS{alertname="RlgwStorageBreakerOpen"}'),
    )
    assert [(a["metric"]["alertstate"], a["metric"]["instance"]) for a in breaker] == [
        ("pending", target)
    ]
