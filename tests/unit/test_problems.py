"""PaymentErrors become problem+json: the one translation at the HTTP boundary."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from errors import PaymentOutcomeUnknown
from payment_results import PaymentResult
from payment_states import PaymentStatus
from service import create_app, problems


@pytest.fixture
def app():
    return create_app({"API_KEYS": ("unit-test-key-0123456789",)})


def result(status: PaymentStatus) -> PaymentResult:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return PaymentResult(
        id="pay_" + "1" * 24,
        status=status,
        amount_minor=1000,
        currency="USD",
        transaction_id="order-1",
        idempotency_key="order-1",
        provider_charge_id="ch_1",
        attempts=1,
        payment_method="card",
        created_at=at,
        updated_at=at,
    )


@pytest.mark.parametrize("status", [PaymentStatus.UNKNOWN, PaymentStatus.PENDING])
def test_an_unknown_outcome_with_its_payment_is_a_202_payment(app, status):
    with app.test_request_context("/v1/payments", method="POST"):
        response = problems.payment_error(
            PaymentOutcomeUnknown("no answer", payment=result(status))
        )
    assert response.status_code == 202 and response.get_json()["status"] == status


def test_an_unknown_outcome_whose_payment_was_failed_meanwhile_is_a_502_problem(app):
    exc = PaymentOutcomeUnknown(
        "the provider charged this payment but it was settled concurrently as failed",
        code="settled_concurrently",
        payment=result(PaymentStatus.FAILED),
    )
    with app.test_request_context("/v1/payments", method="POST"):
        response = problems.payment_error(exc)
    assert response.status_code == 502
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["code"] == "settled_concurrently" and body["payment_id"] == "pay_" + "1" * 24
