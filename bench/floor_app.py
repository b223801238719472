"""The floor: the least an app must do per payment, with no code of ours in the way.

One short transaction INSERTs the payment, one pooled keep-alive call goes to the
provider (one module-level ``requests.Session``), one short transaction UPDATEs it.
No auth, validation, idempotency, retries, breaker, metrics or logging: the service's
CPU per payment is measured against this, so the ratio is what our code costs.

Run: ``gunicorn -k gthread -w 2 --threads 8 bench.floor_app:app`` with ``DATABASE_URL``
(the migrated schema), ``PAYMENT_API_URL``, ``PAYMENT_API_KEY``, ``REQUESTS_CA_BUNDLE``
and ``GUNICORN_THREADS`` (sizes both pools). Reads ``os.environ`` itself: it is a
stand-alone yardstick, not part of the service.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import requests
from flask import Flask, jsonify, request
from requests.adapters import HTTPAdapter
from sqlalchemy import create_engine, text

THREADS = int(os.environ.get("GUNICORN_THREADS", "8"))

app = Flask(__name__)
engine = create_engine(os.environ["DATABASE_URL"], pool_size=THREADS, max_overflow=5)
session = requests.Session()
session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=THREADS))
session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=THREADS))
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
    with engine.begin() as conn:
        conn.execute(
            INSERT,
            dict(
                id=payment_id,
                key=key,
                amount=amount,
                currency=currency,
                method=method,
                now=datetime.now(UTC),
            ),
        )
    response = session.post(
        CHARGES_URL,
        json={
            "amount": amount,
            "currency": currency,
            "payment_method": method,
            "transaction_id": key,
        },
        headers={"Authorization": f"Bearer {PROVIDER_KEY}", "Idempotency-Key": key},
        timeout=(3.05, 5),
    )
    response.raise_for_status()
    charge = response.json()
    with engine.begin() as conn:
        conn.execute(
            UPDATE,
            dict(
                status=charge["status"],
                charge_id=charge["id"],
                id=payment_id,
                now=datetime.now(UTC),
            ),
        )
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
