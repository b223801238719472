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

import requests
from flask import Flask
from requests.adapters import HTTPAdapter
from sqlalchemy import create_engine

from bench import yardstick
from bench.yardstick import INSERT, UPDATE, Payment

THREADS = int(os.environ.get("GUNICORN_THREADS", "8"))

app = Flask(__name__)
yardstick.init_app(app)
engine = create_engine(os.environ["DATABASE_URL"], pool_size=THREADS, max_overflow=5)
session = requests.Session()
session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=THREADS))
session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=THREADS))


@app.post("/v1/payments")
def create_payment():
    payment = Payment.from_request()
    with engine.begin() as conn:
        conn.execute(INSERT, payment.insert_params())
    response = session.post(**payment.charge_request(), timeout=(3.05, 5))
    response.raise_for_status()
    charge = response.json()
    with engine.begin() as conn:
        conn.execute(UPDATE, payment.update_params(charge))
    return payment.created(charge)
