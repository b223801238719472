"""Prometheus metrics of the payment path, correct across gunicorn workers.

prometheus-client's multiprocess mode is switched on by ``PROMETHEUS_MULTIPROC_DIR``
(set by ``gunicorn.conf.py`` before any worker imports this module): every worker then
writes its samples to files there and ``/metrics`` aggregates them. Gauges that describe
one worker's resources (DB pool, breaker) use ``multiprocess_mode`` so the exposition
sums or reports them per live worker.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

from circuit_breaker import STATE_VALUES

PAYMENTS = Counter("payments_total", "Payments by final outcome of this call", ["outcome"])
UNKNOWN_NEAR_KEY_EXPIRY = Counter(
    "payments_unknown_near_key_expiry_total",
    "Reconciliation found an unknown payment in the last quarter of the provider's "
    "idempotency key retention (PAYMENT_KEY_RETENTION)",
)
REFUNDS = Counter("refunds_total", "Refunds by outcome of this call", ["outcome"])
PROVIDER_EVENTS = Counter(
    "provider_events_total",
    "Provider webhook events by provider, type and result (applied, duplicate, stale, "
    "unknown, ignored, bad_signature)",
    ["provider", "type", "result"],
)
PROVIDER_REQUESTS = Counter(
    "payment_provider_requests_total",
    "Requests sent to the payment provider, by kind and result",
    ["kind", "result"],
)
PROVIDER_RETRIES = Counter(
    "payment_provider_retries_total", "Provider requests that were retries of an earlier attempt"
)
PROVIDER_LATENCY = Histogram(
    "payment_provider_request_seconds",
    "Duration of one request to the payment provider",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
)
BREAKER_STATE = Gauge(
    "payment_breaker_state",
    "Provider circuit breaker: 0 closed, 1 half-open, 2 open (worst live worker)",
    multiprocess_mode="livemax",  # "max" would keep a dead worker's "open" forever
)
DB_POOL = Gauge(
    "db_pool_connections",
    "Database pool connections by state (size, checked_out, overflow), summed over workers",
    ["state"],
    multiprocess_mode="livesum",
)

DB_POOL_STATES = ("size", "checked_out", "overflow")
HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests answered, by method, route (the URL rule, not the raw path) and status",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time from receiving an HTTP request to handing back its response",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
)


def observe_provider_attempt(kind: str, attempt) -> None:
    """Count and time one provider request (a ``connection_pool.Attempt``)."""
    result = str(attempt.status) if attempt.status is not None else (attempt.error_kind or "error")
    PROVIDER_REQUESTS.labels(kind, result).inc()
    PROVIDER_LATENCY.labels(kind).observe(attempt.duration)
    if attempt.number > 1:
        PROVIDER_RETRIES.inc()


def observe_payment(outcome: str) -> None:
    """Count one ``process_payment`` call by outcome (succeeded, declined, unknown, ...)."""
    PAYMENTS.labels(outcome).inc()


def observe_refund(outcome: str) -> None:
    """Count one ``refund_payment`` call by outcome (succeeded, failed, unknown, ...)."""
    REFUNDS.labels(outcome).inc()


def observe_event(provider: str, event_type: str, result: str) -> None:
    """Count one provider event by what became of it."""
    PROVIDER_EVENTS.labels(provider, event_type, result).inc()


def observe_http_request(method: str, route: str, status: int, seconds: float) -> None:
    """Count and time one answered HTTP request."""
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_LATENCY.labels(method, route, str(status)).observe(seconds)


def set_resource_gauges(pool_status: Mapping[str, int], breaker_state: str) -> None:
    """Publish this worker's DB pool (``database_config.pool_status()``) and breaker state."""
    for state in DB_POOL_STATES:
        DB_POOL.labels(state).set(pool_status[state])
    BREAKER_STATE.set(STATE_VALUES[breaker_state])
