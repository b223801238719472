"""The design that failed in production, rebuilt faithfully: for comparison only.

Never imported by the product. One database transaction is held open around a plain
``requests.post`` (a new TCP and TLS connection per call, no retries, 5 s timeout), on
an engine with SQLAlchemy's default QueuePool (5 + 10 overflow): a slow or hanging
provider keeps every connection checked out until the pool runs dry. It logs the two
alarm texts of the incident word for word, so the benchmark can count them.

Run: ``gunicorn -k gthread -w 2 --threads 8 bench.naive_app:app`` with ``DATABASE_URL``
(the migrated schema), ``PAYMENT_API_URL``, ``PAYMENT_API_KEY``, ``REQUESTS_CA_BUNDLE``
and optionally ``DB_POOL_TIMEOUT`` (seconds; SQLAlchemy's default 30 when unset). It
reads ``os.environ`` itself: it is a stand-alone reconstruction, not part of the service.
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import requests
from flask import Flask, jsonify, request
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc

PROVIDER_TIMEOUT_S = 5
POOL_EXHAUSTED = "Database query failed: connection pool exhausted"
PROVIDER_TIMEOUT = "Payment service connection failed - timeout after 5000ms"

logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
log = logging.getLogger("naive_app")

app = Flask(__name__)
# SQLAlchemy's defaults, as the original: pool_size=5, max_overflow=10.
engine = create_engine(
    os.environ["DATABASE_URL"], pool_timeout=float(os.environ.get("DB_POOL_TIMEOUT", "30"))
)
CHARGES_URL = os.environ["PAYMENT_API_URL"].rstrip("/") + "/v1/charges"
PROVIDER_KEY = os.environ.get("PAYMENT_API_KEY", "")

INSERT = text(
    "INSERT INTO payments (id, idempotency_key, transaction_id, request_fingerprint,"
    " amount_minor, currency, payment_method, status, attempts, created_at, updated_at)"
    " VALUES (:id, :key, :key, '', :amount, :currency, :method, 'pending', 0, :now, :now)"
)
UPDATE = text(
    "UPDATE payments SET status = :status, provider_charge_id = :charge_id, attempts = 1,"
    " updated_at = :now WHERE id = :id"
)


@app.post("/v1/payments")
def create_payment():
    body = request.get_json()
    payment_id = f"pay_{uuid.uuid4().hex[:24]}"
    key = request.headers.get("Idempotency-Key") or uuid.uuid4().hex
    amount = int(Decimal(str(body["amount"])) * 100)
    currency = body.get("currency", "USD")
    method = body.get("payment_method", "card")
    try:
        with engine.begin() as conn:
            now = datetime.now(UTC)
            conn.execute(
                INSERT,
                dict(
                    id=payment_id, key=key, amount=amount, currency=currency, method=method, now=now
                ),
            )
            # The bug: the provider is called while the transaction holds a connection.
            response = requests.post(
                CHARGES_URL,
                json={
                    "amount": amount,
                    "currency": currency,
                    "payment_method": method,
                    "transaction_id": key,
                },
                # The sandbox insists on a key; the original sent a fresh one per call,
                # so a retry after a timeout was a new charge.
                headers={"Authorization": f"Bearer {PROVIDER_KEY}", "Idempotency-Key": key},
                timeout=PROVIDER_TIMEOUT_S,
            )
            response.raise_for_status()
            charge = response.json()
            now = datetime.now(UTC)
            conn.execute(
                UPDATE,
                dict(status=charge["status"], charge_id=charge["id"], id=payment_id, now=now),
            )
    except sa_exc.TimeoutError:
        log.error(POOL_EXHAUSTED)
        return jsonify(error="database unavailable"), 500
    except requests.exceptions.Timeout:
        log.error(PROVIDER_TIMEOUT)
        return jsonify(error="payment service timeout"), 500
    except requests.exceptions.RequestException as exc:
        log.error("Payment service connection failed - %s", type(exc).__name__)
        return jsonify(error="payment service failed"), 500
    return jsonify(id=payment_id, status=charge["status"], amount=str(body["amount"])), 201


@app.get("/healthz")
def healthz():
    return jsonify(status="ok")


@app.after_request
def echo_request_id(response):
    """Echo ``X-Request-ID`` as the service does: the load script reads latency from it."""
    if "X-Request-ID" in request.headers:
        response.headers["X-Request-ID"] = request.headers["X-Request-ID"]
    return response
