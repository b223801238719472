"""PAYMENT_PROVIDER=stripe against localstripe, a real process speaking Stripe's API.

Payments go through ``process_payment`` (PostgreSQL, the real session and policy) and
through gunicorn's ``POST /v1/payments``; refunds, lookups and a signed event through
the adapter itself. What localstripe lacks is covered in tests/unit/test_stripe_provider.py
(see tests/support/localstripe.py).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from errors import InvalidPaymentRequest, PaymentDeclined
from payment_client import PaymentClient
from payment_handler import get_payment, process_payment
from payment_states import PaymentStatus
from providers.base import (
    ChargeLookup,
    ChargeStatus,
    RefundLookup,
    RefundRequest,
    RefundStatus,
)
from providers.stripe import StripeProvider
from tests.support.gunicorn import GunicornProcess
from tests.support.localstripe import (
    CARD_DECLINED_ON_CHARGE,
    CARD_NEEDS_AUTHENTICATION,
    LocalStripeProcess,
)

pytestmark = pytest.mark.postgres

API_KEY = "stripe-gunicorn-test-key-0123456789"
WEBHOOK_SECRET = "whsec_localstripe_test_secret"
EVENT_TIMEOUT_S = 15.0  # localstripe posts an event about a second after it happens


@pytest.fixture
def stripe_settings(pg_url, localstripe: LocalStripeProcess, configure_payments):
    """The library configured for PostgreSQL and localstripe as Stripe."""
    return configure_payments(
        database_url=pg_url,
        payment_provider="stripe",
        payment_api_url=localstripe.url,
        payment_api_key=localstripe.api_key,
        payment_backoff_factor=0.01,
        payment_connect_timeout=0.5,
        payment_read_timeout=10.0,
        payment_deadline=20.0,
    )


def new_key() -> str:
    return f"order-{uuid.uuid4().hex}"


def test_a_payment_is_one_succeeded_payment_intent(stripe_settings, localstripe):
    key = new_key()
    payment_method = localstripe.payment_method()
    result = process_payment("25.99", payment_method, key, metadata={"order": "7"})
    assert result.status == PaymentStatus.SUCCEEDED
    (intent,) = localstripe.payment_intents(key)
    assert result.provider_charge_id == intent["id"] and intent["id"].startswith("pi_")
    assert (intent["amount"], intent["currency"], intent["status"]) == (2599, "usd", "succeeded")
    assert intent["payment_method"] == payment_method
    assert intent["metadata"] == {"idempotency_key": key, "payment_id": result.id, "order": "7"}
    assert get_payment(result.id).provider_charge_id == intent["id"]


def test_the_same_transaction_id_twice_is_one_payment_intent(stripe_settings, localstripe):
    key, payment_method = new_key(), localstripe.payment_method()
    first = process_payment("10.00", payment_method, key)
    second = process_payment("10.00", payment_method, key)
    assert second.id == first.id and second.replayed
    assert len(localstripe.payment_intents(key)) == 1


def test_a_declined_card_is_a_failed_payment(stripe_settings, localstripe):
    key = new_key()
    with pytest.raises(PaymentDeclined) as info:
        process_payment("10.00", localstripe.payment_method(CARD_DECLINED_ON_CHARGE), key)
    assert info.value.code == "card_declined"
    assert get_payment(info.value.payment.id).status == PaymentStatus.FAILED
    (intent,) = localstripe.payment_intents(key)
    assert intent["status"] == "requires_payment_method"  # localstripe names no PI in its 402


def test_a_card_that_needs_authentication_is_declined_and_its_payment_intent_canceled(
    stripe_settings, localstripe
):
    key = new_key()
    with pytest.raises(PaymentDeclined) as info:
        process_payment("10.00", localstripe.payment_method(CARD_NEEDS_AUTHENTICATION), key)
    assert info.value.code == "authentication_required"
    assert get_payment(info.value.payment.id).status == PaymentStatus.FAILED
    (intent,) = localstripe.payment_intents(key)
    assert intent["status"] == "canceled"


def test_a_payment_method_of_a_customer_is_charged_with_its_customer(stripe_settings, localstripe):
    key, payment_method = new_key(), localstripe.payment_method()
    customer = localstripe.customer_with(payment_method)
    assert process_payment("12.00", payment_method, key).status == PaymentStatus.SUCCEEDED
    (intent,) = localstripe.payment_intents(key)
    assert intent["customer"] == customer


def test_a_sandbox_payment_method_is_refused_before_anything_is_sent(stripe_settings, localstripe):
    key = new_key()
    with pytest.raises(InvalidPaymentRequest, match="pm_"):
        process_payment("10.00", "card", key)
    assert localstripe.payment_intents(key) == []


def test_a_known_payment_intent_is_looked_up_by_id(stripe_settings, localstripe):
    key = new_key()
    result = process_payment("10.00", localstripe.payment_method(), key)
    lookup = ChargeLookup(result.id, key, result.provider_charge_id, result.created_at)
    (charge,) = PaymentClient(stripe_settings).find_charges(lookup).value
    assert (charge.id, charge.status, charge.amount_minor) == (
        result.provider_charge_id,
        ChargeStatus.SUCCEEDED,
        1000,
    )


def test_a_refund_through_the_adapter(stripe_settings, localstripe):
    payment = process_payment("25.99", localstripe.payment_method(), new_key())
    refund_key = new_key()
    request = RefundRequest(
        refund_id="ref_" + uuid.uuid4().hex[:24],
        payment_id=payment.id,
        idempotency_key=refund_key,
        provider_charge_id=payment.provider_charge_id,
        amount_minor=1000,
        currency="USD",
        reason="the customer changed their mind",
        metadata={"ticket": "9"},
        created_at=datetime.now(UTC),
    )
    client = PaymentClient(stripe_settings)
    refund = client.refund(request).value
    assert (refund.status, refund.amount_minor, refund.charge_id) == (
        RefundStatus.SUCCEEDED,
        1000,
        payment.provider_charge_id,
    )
    (stored,) = localstripe.refunds(refund_key)
    assert stored["metadata"]["reason"] == "the customer changed their mind"
    assert stored["metadata"]["payment_id"] == payment.id
    lookup = RefundLookup(
        request.refund_id,
        payment.id,
        refund_key,
        payment.provider_charge_id,
        None,
        request.created_at,
    )
    assert [r.id for r in client.find_refunds(lookup).value] == [refund.id]


class _Receiver(BaseHTTPRequestHandler):
    """Accepts webhook deliveries and hands (headers, body) to the test."""

    deliveries: queue.Queue

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.deliveries.put((dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_an_event_signed_by_localstripe_is_verified_and_read(stripe_settings, localstripe):
    deliveries: queue.Queue = queue.Queue()
    handler = type("Receiver", (_Receiver,), {"deliveries": deliveries})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            name = f"test-{uuid.uuid4().hex}"
            localstripe.send_webhooks(
                name, f"http://127.0.0.1:{server.server_port}/", WEBHOOK_SECRET
            )
            key = new_key()
            result = process_payment("10.00", localstripe.payment_method(), key)
            provider = StripeProvider(stripe_settings)
            event = _wait_for_event(provider, deliveries, result.provider_charge_id)
        finally:
            server.shutdown()
            thread.join(5)
    assert event.charge.status is ChargeStatus.SUCCEEDED and event.idempotency_key == key


def _wait_for_event(provider: StripeProvider, deliveries: queue.Queue, intent_id: str):
    """The verified ``payment_intent.succeeded`` event of ``intent_id``, as it arrives."""
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while True:
        headers, body = deliveries.get(timeout=max(0.01, deadline - time.monotonic()))
        event = provider.parse_event(body, headers, WEBHOOK_SECRET, datetime.now(UTC))
        if event.type == "payment_intent.succeeded" and event.charge.id == intent_id:
            return event


# -- through gunicorn -------------------------------------------------------------------


@pytest.mark.gunicorn
def test_post_payments_through_gunicorn_charges_with_stripe(pg_url, localstripe):
    env = {
        "DATABASE_URL": pg_url,
        "PAYMENT_PROVIDER": "stripe",
        "PAYMENT_API_URL": localstripe.url,
        "PAYMENT_API_KEY": localstripe.api_key,
        "API_KEYS": API_KEY,
        "GUNICORN_WORKERS": "1",
        "GUNICORN_THREADS": "4",
    }
    auth = {"Authorization": f"Bearer {API_KEY}"}
    key, declined_key = new_key(), new_key()
    body = {"amount": "25.99", "currency": "USD", "payment_method": localstripe.payment_method()}
    declined = {**body, "payment_method": localstripe.payment_method(CARD_DECLINED_ON_CHARGE)}
    with GunicornProcess(env) as server:
        created = requests.post(
            f"{server.url}/v1/payments",
            json=body,
            headers={**auth, "Idempotency-Key": key},
            timeout=30,
        )
        shown = requests.get(
            f"{server.url}/v1/payments/{created.json()['id']}", headers=auth, timeout=10
        )
        refused = requests.post(
            f"{server.url}/v1/payments",
            json=declined,
            headers={**auth, "Idempotency-Key": declined_key},
            timeout=30,
        )
    (intent,) = localstripe.payment_intents(key)
    assert created.status_code == 201 and created.json()["provider_charge_id"] == intent["id"]
    assert shown.status_code == 200 and shown.json()["provider_charge_id"] == intent["id"]
    assert refused.status_code == 402
    assert refused.headers["Content-Type"] == "application/problem+json"
