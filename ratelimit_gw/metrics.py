"""Every Prometheus metric the gateway exports (docs/operations.md), declared together.

Labels are low-cardinality by default: route, protocol, configured model, status, reason.
``[metrics] account_label = true`` adds ``account`` to the per-request series, and the budget
utilisation gauge (one series per budget: its cardinality is the budgets', so only with that
opt-in). With several
worker processes, prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by
``serve --workers``) makes ``/metrics`` of any worker report the sum over all of them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .errors import REJECTION_REASONS
from .settings.webhooks import EVENT_THRESHOLDS
from .storage.scripts import SCRIPT_NAMES

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
STORAGE_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
HOLD_EVENTS = ("placed", "settled", "expired")
# Why an admission was released for a caller that gave up on it: the client hung up (or the
# handler was cut at shutdown) while it ran, or storage failed after the call was sent.
ABANDON_CAUSES = ("client_disconnect", "storage_error")
# What rlgw_storage_*{operation} may name: the scripts, and the plain commands the gateway
# sends (a pipeline counts as one). A call not listed here still gets its series, at its first.
STORAGE_OPERATIONS = (
    *SCRIPT_NAMES,
    "pipeline",
    "get",
    "set",
    "hgetall",
    "hset",
    "hdel",
    "sadd",
    "srem",  # a pool key healthy again (upstream_pool.py)
    "smembers",
    "xrevrange",
    "xrange",  # the key-change feed, read four times a second (key_changes.py)
    "ping",
    "config",
    "info",
    "zcard",  # the webhook outbox's depth, every 5 s (webhook_delivery.py)
)

RELOAD_OUTCOMES = ("ok", "failed")
# rlgw_upstream_attempts_total{outcome}: what one upstream attempt with a pool key came to.
UPSTREAM_ATTEMPT_OUTCOMES = (
    "answered",
    "rate_limited",
    "unauthorized",
    "server_error",
    "timeout",
    "unreachable",
)
UPSTREAM_KEY_STATES = ("ok", "cooling", "unhealthy")
# rlgw_webhook_deliveries_total{outcome}: what one delivery attempt of a webhook event came to.
WEBHOOK_OUTCOMES = ("delivered", "failed", "dropped")
UPSTREAM_KEY_CEILINGS = ("rpm", "tpm")
# The store an archive pass failed on (rlgw_archive_errors_total{stage}).
ARCHIVE_STAGES = ("redis", "postgres")


@dataclass(frozen=True)
class Metrics:
    account_label: bool
    requests: Counter
    rejections: Counter
    request_duration: Histogram
    upstream_ttfb: Histogram
    upstream_responses: Counter
    tokens: Counter
    cost_usd: Counter
    holds: Counter
    balance_overruns: Counter
    settlement_failures: Counter
    storage_duration: Histogram
    storage_errors: Counter
    breaker_state: Gauge
    inflight: Gauge
    storage_bypass: Counter
    abandoned_admissions: Counter
    orphan_settlements: Counter
    eviction_policy: Gauge
    admin_auth_failures: Counter
    buffered_body_bytes: Gauge
    config_reloads: Counter
    config_info: Gauge
    upstream_attempts: Counter
    upstream_key_state: Gauge
    upstream_key_headroom: Gauge
    webhook_events_raised: Counter
    webhook_deliveries: Counter
    webhook_outbox_events: Gauge
    archive_entries: Counter
    archive_trimmed: Counter
    archive_errors: Counter
    archive_leader: Gauge
    archive_lag: Gauge
    # Only with account_label (it is per account): None otherwise, and not exported.
    budget_spent_ratio: Gauge | None

    def account(self, account_id: str | None) -> tuple[str, ...]:
        """The extra label values for per-account series (none unless opted in)."""
        return (account_id or "-",) if self.account_label else ()


def create_metrics(registry: CollectorRegistry | None, account_label: bool = False) -> Metrics:
    """Register every metric in ``registry`` (a fresh one per app, so tests stay isolated)."""
    acct = ("account",) if account_label else ()
    metrics = Metrics(
        account_label=account_label,
        requests=Counter(
            "rlgw_requests",
            "Requests answered, by route, protocol, model, status",
            ["route", "protocol", "model", "status", *acct],
            registry=registry,
        ),
        rejections=Counter(
            "rlgw_rejections",
            "Requests the gateway refused, by reason",
            ["reason", *acct],
            registry=registry,
        ),
        request_duration=Histogram(
            "rlgw_request_duration_seconds",
            "Time from request to the end of the response (streams included)",
            ["route", "protocol"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        ),
        upstream_ttfb=Histogram(
            "rlgw_upstream_ttfb_seconds",
            "Time from sending a request upstream to its response headers",
            ["provider", "model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        ),
        upstream_responses=Counter(
            "rlgw_upstream_responses",
            "Upstream outcomes: 2xx, 4xx, 5xx, timeout, unreachable, cut",
            ["provider", "outcome"],
            registry=registry,
        ),
        tokens=Counter(
            "rlgw_tokens",
            "Tokens settled, by model and direction (input|output)",
            ["model", "direction", *acct],
            registry=registry,
        ),
        cost_usd=Counter(
            "rlgw_cost_usd", "Cost settled, in USD, by model", ["model", *acct], registry=registry
        ),
        holds=Counter(
            "rlgw_holds",
            "Balance holds by event (placed|settled|expired)",
            ["event"],
            registry=registry,
        ),
        balance_overruns=Counter(
            "rlgw_balance_overruns", "Settlements that took a balance below zero", registry=registry
        ),
        settlement_failures=Counter(
            "rlgw_settlement_failures",
            "Settlements abandoned: every retry failed, or an unexpected error (not retried)",
            registry=registry,
        ),
        storage_duration=Histogram(
            "rlgw_storage_duration_seconds",
            "Storage call latency, by operation",
            ["operation"],
            buckets=STORAGE_BUCKETS_S,
            registry=registry,
        ),
        storage_errors=Counter(
            "rlgw_storage_errors",
            "Failed storage calls, by operation",
            ["operation"],
            registry=registry,
        ),
        breaker_state=Gauge(
            "rlgw_breaker_state",
            "Storage circuit breaker: 0 closed, 1 half-open, 2 open",
            multiprocess_mode="max",
            registry=registry,
        ),
        inflight=Gauge(
            "rlgw_inflight_requests",
            "Requests being served now",
            multiprocess_mode="livesum",
            registry=registry,
        ),
        abandoned_admissions=Counter(
            "rlgw_abandoned_admissions",
            "Admissions released because their caller gave up on them, by cause "
            "(client_disconnect|storage_error)",
            ["cause"],
            registry=registry,
        ),
        orphan_settlements=Counter(
            "rlgw_orphan_settlements",
            "Settlements not applied because their account no longer exists (wiped or "
            "evicted); kept in the rlgw:orphan-settlements stream",
            registry=registry,
        ),
        storage_bypass=Counter(
            "rlgw_storage_bypass",
            "Requests served without limits or balance because storage failed "
            '(storage.on_error = "allow")',
            registry=registry,
        ),
        eviction_policy=Gauge(
            "rlgw_storage_eviction_policy",
            "Redis masters by maxmemory-policy (unknown: could not be read); anything but "
            "noeviction may delete accounts, keys and balances when memory fills",
            ["policy"],
            # Every worker reads the same masters: the latest reading, whoever took it.
            multiprocess_mode="mostrecent",
            registry=registry,
        ),
        admin_auth_failures=Counter(
            "rlgw_admin_auth_failures",
            "Admin API calls refused for a missing or wrong admin token",
            registry=registry,
        ),
        buffered_body_bytes=Gauge(
            "rlgw_buffered_body_bytes",
            "Request body bytes held in memory now (bounded by server.max_buffered_body_bytes)",
            multiprocess_mode="livesum",
            registry=registry,
        ),
        config_reloads=Counter(
            "rlgw_config_reloads",
            "Configuration reloads (SIGHUP or the admin API) by outcome: ok, or failed (an "
            "invalid file; the running configuration was kept)",
            ["outcome"],
            registry=registry,
        ),
        config_info=Gauge(
            "rlgw_config_info",
            "1 for the digest (the config file's SHA-256, first 12 hex digits) this process "
            "runs on, 0 for one it ran on before; per process, so every worker shows its own",
            ["digest"],
            multiprocess_mode="all",
            registry=registry,
        ),
        upstream_attempts=Counter(
            "rlgw_upstream_attempts",
            "Upstream attempts by provider (or custom endpoint), pool key name and outcome: "
            "answered (relayed to the caller, errors included), rate_limited (429: the key "
            "cools down), unauthorized (401: the key is unhealthy until a probe), server_error "
            "(5xx), timeout, unreachable; all but answered moved on to another key or fallback "
            "when one was left",
            ["provider", "key", "outcome"],
            registry=registry,
        ),
        upstream_key_state=Gauge(
            "rlgw_upstream_key_state",
            "Upstream pool keys by state: 1 for the state the key is in (ok, cooling after an "
            "upstream 429, unhealthy after a 401 until a probe), 0 for the other two; read "
            "from storage every few seconds",
            ["provider", "key", "state"],
            # Every worker reads the same storage: the latest reading of a live worker.
            multiprocess_mode="livemostrecent",
            registry=registry,
        ),
        upstream_key_headroom=Gauge(
            "rlgw_upstream_key_headroom",
            "Fraction (0-1) of an upstream key's own rpm or tpm ceiling left now, for keys "
            "with that ceiling; read from storage every few seconds",
            ["provider", "key", "ceiling"],
            multiprocess_mode="livemostrecent",
            registry=registry,
        ),
        webhook_events_raised=Counter(
            "rlgw_webhook_events_raised",
            "Webhook events put in the outbox by type, one per webhook that receives it "
            "(raised once across instances: a repeat is not counted)",
            ["type"],
            registry=registry,
        ),
        webhook_deliveries=Counter(
            "rlgw_webhook_deliveries",
            "Webhook delivery attempts by event type and outcome: delivered (a 2xx), failed "
            "(any other answer or none: retried), dropped (its lifetime ended: its receiver kept "
            "failing, or its webhook is gone)",
            ["type", "outcome"],
            registry=registry,
        ),
        webhook_outbox_events=Gauge(
            "rlgw_webhook_outbox_events",
            "Webhook events waiting in the outbox (due, leased or backing off), read from "
            "storage every few seconds",
            multiprocess_mode="livemostrecent",
            registry=registry,
        ),
        archive_entries=Counter(
            "rlgw_archive_entries",
            "Ledger entries (and orphan settlements) this process wrote to the PostgreSQL "
            "archive; an entry read again after a crash is not counted twice",
            registry=registry,
        ),
        archive_trimmed=Counter(
            "rlgw_archive_trimmed_entries",
            "Archived ledger entries this process trimmed from Redis (only below what "
            "Postgres has committed, after [archive] retention_s)",
            registry=registry,
        ),
        archive_errors=Counter(
            "rlgw_archive_errors",
            "Archive passes that failed, by the store that failed them (redis, postgres); "
            "the next pass retries from the last committed position",
            ["stage"],
            registry=registry,
        ),
        archive_leader=Gauge(
            "rlgw_archive_leader",
            "1 while this process holds the archiver's lease (one instance at a time), else 0",
            multiprocess_mode="livesum",
            registry=registry,
        ),
        archive_lag=Gauge(
            "rlgw_archive_lag_seconds",
            "How far the PostgreSQL archive is behind: now minus the time up to which it holds "
            "every ledger entry (read from storage every [archive] interval_s by every instance "
            "with an archive, so it grows when no archiver runs)",
            multiprocess_mode="livemax",
            registry=registry,
        ),
        budget_spent_ratio=None
        if not account_label
        else Gauge(
            "rlgw_budget_spent_ratio",
            "Spent plus held over the cap of a budget's current period (1 and more: refusing), "
            "by scope (account|key), account and key id (- for the account's own budget), as "
            "of its latest settlement; only with [metrics] account_label",
            ["scope", "account", "key_id"],
            # Every worker reads the same spend hash: the latest reading, whoever took it.
            multiprocess_mode="mostrecent",
            registry=registry,
        ),
    )
    _start_at_zero(metrics)
    return metrics


def _start_at_zero(metrics: Metrics) -> None:
    """Make the series whose label values are few and known now, at zero: a dashboard shows
    0 rather than no data, and ``increase()`` sees the first event. With the account label,
    series per account appear at their first event; the ones made here carry ``account="-"``
    (no known account), so sums over accounts still start at zero."""
    acct = metrics.account(None)
    for reason in REJECTION_REASONS:
        labelled(metrics.rejections, reason, *acct)
    for operation in STORAGE_OPERATIONS:
        labelled(metrics.storage_duration, operation)
        labelled(metrics.storage_errors, operation)
    for cause in ABANDON_CAUSES:
        labelled(metrics.abandoned_admissions, cause)
    for event in HOLD_EVENTS:
        labelled(metrics.holds, event)
    for outcome in RELOAD_OUTCOMES:
        labelled(metrics.config_reloads, outcome)
    for event_type in EVENT_THRESHOLDS:
        labelled(metrics.webhook_events_raised, event_type)
        for outcome in WEBHOOK_OUTCOMES:
            labelled(metrics.webhook_deliveries, event_type, outcome)
    for stage in ARCHIVE_STAGES:
        labelled(metrics.archive_errors, stage)


@functools.lru_cache(maxsize=8192)
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: label sets are few, requests are many, and
    prometheus_client validates and locks on every ``labels`` call. For label values the
    gateway owns (operations, providers, models, outcomes, account ids when the account label
    is on), never raw caller input; the bound keeps even many accounts' sets finite."""
    return metric.labels(*values)


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text for ``/metrics``: this process's registry, or every worker's in multiprocess."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
        return generate_latest(combined), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST


class StorageMetrics:
    """Feeds storage call latency, errors and breaker state into the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        metrics.breaker_state.set(BREAKER_STATES["closed"])

    def storage_call(self, operation: str, duration_s: float, ok: bool) -> None:
        labelled(self._metrics.storage_duration, operation).observe(duration_s)
        if not ok:
            self._metrics.storage_errors.labels(operation).inc()

    def breaker_changed(self, state: str) -> None:
        self._metrics.breaker_state.set(BREAKER_STATES[state])
