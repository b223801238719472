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

import requests
from flask import Flask, jsonify
from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc

from bench import yardstick
from bench.yardstick import INSERT, UPDATE, Payment

PROVIDER_TIMEOUT_S = 5
POOL_EXHAUSTED = "Database query failed: connection pool exhausted"
PROVIDER_TIMEOUT = "Payment service connection failed - timeout after 5000ms"

logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
log = logging.getLogger("naive_app")

app = Flask(__name__)
yardstick.init_app(app)
# SQLAlchemy's defaults, as the original: pool_size=5, max_overflow=10.
engine = create_engine(
    os.environ["DATABASE_URL"], pool_timeout=float(os.environ.get("DB_POOL_TIMEOUT", "30"))
)


@app.post("/v1/payments")
def create_payment():
    payment = Payment.from_request()
    try:
        with engine.begin() as conn:
            conn.execute(INSERT, payment.insert_params())
            # The bug: the provider is called while the transaction holds a connection.
            # (The sandbox insists on a key; the original sent a fresh one per call, so a
            # retry after a timeout was a new charge.)
            response = requests.post(**payment.charge_request(), timeout=PROVIDER_TIMEOUT_S)
            response.raise_for_status()
            charge = response.json()
            conn.execute(UPDATE, payment.update_params(charge))
    except sa_exc.TimeoutError:
        log.error(POOL_EXHAUSTED)
        return jsonify(error="database unavailable"), 500
    except requests.exceptions.Timeout:
        log.error(PROVIDER_TIMEOUT)
        return jsonify(error="payment service timeout"), 500
    except requests.exceptions.RequestException as exc:
        log.error("Payment service connection failed - %s", type(exc).__name__)
        return jsonify(error="payment service failed"), 500
    return payment.created(charge)
