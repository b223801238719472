"""``/healthz`` (liveness) and ``/readyz`` (readiness), both without authentication.

Liveness checks nothing but that a thread answers: restarting a pod because the
database or the provider is down only adds a cold start to the outage. Readiness fails
only when the database is unreachable or read-only, since then no payment can be taken. An open
provider breaker is reported but keeps the pod ready: every pod sees the same provider,
so taking them all out of the load balancer would turn fast 503s into connection errors.
"""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify

import database_config
import payment_handler
from errors import DatabaseUnavailable
from service.problems import problem

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    checks = {"payment_provider_breaker": provider_breaker_state()}
    try:
        database_config.ping(timeout=current_app.config["READINESS_DB_TIMEOUT"])
    except DatabaseUnavailable as exc:
        log.warning("not ready: %s", exc.message)
        checks["database"] = "unavailable"
        return problem(
            503,
            "The payment store is unreachable or cannot take writes.",
            title="Not ready",
            code="database_unavailable",
            headers={"Retry-After": "1"},
            checks=checks,
        )
    checks["database"] = "ok"
    return jsonify(status="ready", checks=checks)


def provider_breaker_state() -> str:
    """``closed``, ``half_open`` or ``open``: this worker's view of the provider breaker."""
    return payment_handler.get_payment_service().breaker_state
