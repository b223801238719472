"""Request metrics and ``GET /metrics`` (no authentication), correct across gunicorn workers.

Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` (prepared by ``gunicorn.conf.py``) puts
every worker's samples in files that any worker aggregates at scrape time. Gauges of a
worker's own resources (DB pool, provider breaker) can only be read inside that worker,
so each worker republishes them after its requests (at most once a second) and the
worker serving the scrape does so first. Without the variable (tests, ``flask run``)
the default registry of this one process is served.
"""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

import database_config
import metrics
import metrics_archive
from service.health import provider_breaker_state

#: Seconds between two refreshes of a worker's pool and breaker gauges after requests.
RESOURCE_REFRESH_INTERVAL = 1.0
#: Methods kept as label values; anything else is "other" (clients choose the method).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_last_refresh = float("-inf")


def init_app(app: Flask) -> None:
    app.before_request(start_timer)
    app.after_request(observe_request)
    app.add_url_rule("/metrics", "metrics", serve_metrics)


def start_timer() -> None:
    g.request_started = time.perf_counter()


def observe_request(response: Response) -> Response:
    """Count the request under its URL rule (``/v1/payments/<payment_id>``), not its path."""
    started = g.get("request_started")
    if started is not None:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in KNOWN_METHODS else "other"
        elapsed = time.perf_counter() - started
        metrics.observe_http_request(method, route, response.status_code, elapsed)
    if time.monotonic() - _last_refresh >= RESOURCE_REFRESH_INTERVAL:
        refresh_resource_gauges()
    return response


def refresh_resource_gauges() -> None:
    """Publish this worker's DB pool and breaker state."""
    global _last_refresh
    _last_refresh = time.monotonic()
    metrics.set_resource_gauges(database_config.pool_status(), provider_breaker_state())


def serve_metrics() -> Response:
    refresh_resource_gauges()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # prometheus-client's own switch
    if not directory:
        return Response(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    with metrics_archive.consistent_read(directory):  # never half a worker recycle
        body = generate_latest(registry)
    return Response(body, content_type=CONTENT_TYPE_LATEST)
