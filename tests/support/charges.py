"""Charge requests for tests that drive ``PaymentClient`` directly."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from providers.base import ChargeLookup, ChargeRequest

CREATED_AT = datetime(2026, 1, 1, tzinfo=UTC)


def charge_request(amount_minor=2599, currency="USD", key=None, **fields) -> ChargeRequest:
    """A charge of ``amount_minor`` under ``key`` (a fresh one by default)."""
    key = key or f"test-{uuid.uuid4().hex}"
    values = dict(
        payment_id="pay_" + uuid.uuid4().hex[:24],
        idempotency_key=key,
        amount_minor=amount_minor,
        currency=currency,
        payment_method="card",
        transaction_id=key,
        description=None,
        metadata=None,
        created_at=CREATED_AT,
    )
    return ChargeRequest(**{**values, **fields})


def lookup(key: str) -> ChargeLookup:
    return ChargeLookup("pay_" + "0" * 24, key, None, CREATED_AT)
