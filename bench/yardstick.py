"""What the two comparison apps (floor and naive) share, so they do exactly the same work.

The SQL, the reading of a payment request, the provider's request body, ``/healthz`` and
the ``X-Request-ID`` echo the load script needs. Only the order of database and
provider work (and the pools) differ between ``floor_app`` and ``naive_app``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from flask import Flask, jsonify, request
from sqlalchemy import text

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


@dataclass(frozen=True)
class Payment:
    """A payment request as both apps read it (no validation: they are yardsticks)."""

    id: str
    key: str
    amount: int
    currency: str
    method: str
    amount_text: str

    @classmethod
    def from_request(cls) -> Payment:
        body = request.get_json()
        return cls(
            id=f"pay_{uuid.uuid4().hex[:24]}",
            key=request.headers.get("Idempotency-Key") or uuid.uuid4().hex,
            amount=int(Decimal(str(body["amount"])) * 100),
            currency=body.get("currency", "USD"),
            method=body.get("payment_method", "card"),
            amount_text=str(body["amount"]),
        )

    def insert_params(self) -> dict:
        return dict(
            id=self.id,
            key=self.key,
            amount=self.amount,
            currency=self.currency,
            method=self.method,
            now=datetime.now(UTC),
        )

    def update_params(self, charge: dict) -> dict:
        return dict(
            status=charge["status"], charge_id=charge["id"], id=self.id, now=datetime.now(UTC)
        )

    def charge_request(self) -> dict:
        """Keyword arguments of the provider POST (URL, JSON body, headers)."""
        return dict(
            url=CHARGES_URL,
            json={
                "amount": self.amount,
                "currency": self.currency,
                "payment_method": self.method,
                "transaction_id": self.key,
            },
            headers={"Authorization": f"Bearer {PROVIDER_KEY}", "Idempotency-Key": self.key},
        )

    def created(self, charge: dict):
        return jsonify(id=self.id, status=charge["status"], amount=self.amount_text), 201


def init_app(app: Flask) -> None:
    """``/healthz`` and the ``X-Request-ID`` echo the load script reads latency from."""

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.after_request
    def echo_request_id(response):
        if "X-Request-ID" in request.headers:
            response.headers["X-Request-ID"] = request.headers["X-Request-ID"]
        return response
