"""Prometheus metrics of the payment path, correct across gunicorn workers.

prometheus-client's multiprocess mode is switched on by ``PROMETHEUS_MULTIPROC_DIR``
(set by ``gunicorn.conf.py`` before any worker imports this module): every worker then
writes its samples to files there and ``/metrics`` aggregates them. Gauges that describe
one worker's resources (DB pool, breaker) use ``multiprocess_mode`` so the exposition
sums or reports them per live worker.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PAYMENTS = Counter("payments_total", "Payments by final outcome of this call", ["outcome"])
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
    "Provider circuit breaker: 0 closed, 1 half-open, 2 open (per worker)",
    multiprocess_mode="max",
)
DB_POOL = Gauge(
    "db_pool_connections",
    "Database pool connections by state (size, checked_out, overflow), summed over workers",
    ["state"],
    multiprocess_mode="livesum",
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
