"""Stripe events over HTTP: ``POST /v1/webhooks/stripe``, verified from ``Stripe-Signature``.

The app runs through Flask's test client with ``PAYMENT_PROVIDER=stripe`` on PostgreSQL,
charging localstripe through the fault proxy of tests/support/fault_proxy.py. A payment
left ``pending`` is made by having the proxy answer its PaymentIntent as ``processing``
(what Stripe answers while a payment method settles) although localstripe charged it.
Events are Stripe's envelope around the PaymentIntent as localstripe holds it, signed as
Stripe signs them (an HMAC-SHA256 of ``f"{t}.{payload}"`` with the endpoint's secret,
``stripe.WebhookSignature.generate_signature_header``). Events are applied on the
receiver's background thread; tests wait for it with ``dispatcher.join()``.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid

import pytest
import stripe
from sqlalchemy import func, select

import database_config
import payment_handler
from provider_events import get_webhook_receiver
from providers.stripe import STRIPE_API_VERSION
from service import create_app
from tests.support.fault_proxy import FaultProxy, with_status
from tests.support.localstripe import LocalStripeProcess

pytestmark = pytest.mark.postgres

SECRET = f"whsec_{secrets.token_hex(16)}"
API_KEY = "stripe-webhooks-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
URL = "/v1/webhooks/stripe"


@pytest.fixture(scope="module")
def proxy(localstripe: LocalStripeProcess):
    with FaultProxy(localstripe.url) as running:
        yield running


@pytest.fixture
def faults(proxy: FaultProxy):
    proxy.reset()
    yield proxy
    proxy.reset()


@pytest.fixture
def client(configure_payments, pg_url, faults, localstripe):
    configure_payments(
        database_url=pg_url,
        payment_provider="stripe",
        payment_api_url=faults.url,
        payment_api_key=localstripe.api_key,
        api_keys=(API_KEY,),
        payment_webhook_secret=SECRET,
        payment_connect_timeout=0.5,
        payment_read_timeout=5.0,
        payment_deadline=10.0,
        payment_backoff_factor=0.01,
    )
    return create_app().test_client()


def new_key() -> str:
    return f"order-{uuid.uuid4().hex}"


def pay(client, localstripe: LocalStripeProcess, key: str):
    body = {"amount": "25.99", "currency": "USD", "payment_method": localstripe.payment_method()}
    return client.post("/v1/payments", json=body, headers={**AUTH, "Idempotency-Key": key})


def payment(client, payment_id: str) -> dict:
    response = client.get(f"/v1/payments/{payment_id}", headers=AUTH)
    assert response.status_code == 200
    return response.get_json()


def stripe_event(event_type: str, obj: dict) -> dict:
    """A Stripe Event around ``obj``, as the endpoint (pinned API version) receives it."""
    return {
        "id": f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": STRIPE_API_VERSION,
        "created": int(time.time()),
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


def signed(event: dict, *, at: float | None = None, secret: str = SECRET) -> tuple[bytes, dict]:
    """``event`` as a delivery body and its ``Stripe-Signature`` header, signed at ``at``."""
    payload = json.dumps(event, indent=2)
    timestamp = int(at if at is not None else time.time())
    header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp)
    headers = {"Stripe-Signature": header, "Content-Type": "application/json; charset=utf-8"}
    return payload.encode(), headers


def deliver(client, event: dict, **signing):
    body, headers = signed(event, **signing)
    return client.post(URL, data=body, headers=headers)


def applied() -> None:
    """Wait until every event handed to the applier has been applied."""
    get_webhook_receiver(payment_handler.get_payment_service()).dispatcher.join()


def stored_events() -> int:
    with database_config.transaction() as conn:
        return conn.scalar(select(func.count()).select_from(database_config.provider_events))


def event_result(event_id: str) -> str | None:
    events = database_config.provider_events
    with database_config.transaction() as conn:
        return conn.scalar(select(events.c.result).where(events.c.event_id == event_id))


def processing_payment(client, faults: FaultProxy, localstripe: LocalStripeProcess):
    """A payment stored ``pending`` (Stripe answered ``processing``) and its PaymentIntent
    as localstripe holds it (succeeded)."""
    key = new_key()
    faults.set_faults(with_status("processing"))
    response = pay(client, localstripe, key)
    faults.set_faults()
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json()["status"] == "pending"
    (intent,) = localstripe.payment_intents(key)
    assert intent["status"] == "succeeded"
    return response.get_json(), intent


def test_a_processing_payment_is_settled_by_its_payment_intent_succeeded_event(
    client, faults, localstripe
):
    pending, intent = processing_payment(client, faults, localstripe)
    event = stripe_event("payment_intent.succeeded", intent)

    response = deliver(client, event)
    assert response.status_code == 200
    assert response.get_json() == {"received": True, "duplicate": False}
    applied()
    settled = payment(client, pending["id"])
    assert settled["status"] == "succeeded"
    assert settled["provider_charge_id"] == intent["id"]
    assert event_result(event["id"]) == "applied"
    # A plain settlement is taken as Stripe says it: nothing was asked of Stripe.
    assert faults.count("GET", "/v1/payment_intents") == 0
    assert faults.count("GET", f"/v1/payment_intents/{intent['id']}") == 0

    before = stored_events()
    again = deliver(client, event)  # Stripe redelivers: stored once, changes nothing
    assert again.status_code == 200 and again.get_json()["duplicate"] is True
    assert stored_events() == before


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        ("another secret", "does not match the body"),
        ("ten minutes old", "more than 5 minutes old"),
        ("ten minutes ahead", "more than 5 minutes in the future"),
        ("tampered body", "does not match the body"),
        ("none", "missing Stripe-Signature header"),
    ],
)
def test_an_unverified_delivery_is_400_and_nothing_is_stored(
    client, faults, localstripe, spoil, why, caplog
):
    pending, intent = processing_payment(client, faults, localstripe)
    event = stripe_event("payment_intent.succeeded", intent)
    at = {"ten minutes old": time.time() - 600, "ten minutes ahead": time.time() + 600}.get(spoil)
    secret = f"whsec_{secrets.token_hex(16)}" if spoil == "another secret" else SECRET
    body, headers = signed(event, at=at, secret=secret)
    if spoil == "tampered body":
        body = body.replace(b'"amount": 2599', b'"amount": 25990')
        assert b"25990" in body
    if spoil == "none":
        del headers["Stripe-Signature"]
    before = stored_events()
    with caplog.at_level(logging.WARNING, logger="service.webhooks"):
        response = client.post(URL, data=body, headers=headers)
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    assert stored_events() == before
    applied()
    assert payment(client, pending["id"])["status"] == "pending"
    (record,) = [r for r in caplog.records if r.name == "service.webhooks"]
    assert why in record.getMessage()
    assert SECRET not in record.getMessage() and SECRET.removeprefix("whsec_") not in (
        record.getMessage()
    )


def test_an_event_contradicting_a_settled_payment_is_checked_with_stripe(
    client, faults, localstripe
):
    key = new_key()
    created = pay(client, localstripe, key)
    assert created.status_code == 201, created.get_data(as_text=True)
    paid = created.get_json()
    (intent,) = localstripe.payment_intents(key)
    declined = {
        **intent,
        "status": "requires_payment_method",
        "last_payment_error": {
            "type": "card_error",
            "code": "card_declined",
            "decline_code": "insufficient_funds",
            "message": "Your card has insufficient funds.",
        },
    }
    event = stripe_event("payment_intent.payment_failed", declined)

    assert deliver(client, event).status_code == 200
    applied()
    # Not trusted: Stripe is asked for the PaymentIntent by its id, and it succeeded.
    assert faults.count("GET", f"/v1/payment_intents/{intent['id']}") == 1
    assert event_result(event["id"]) == "stale"
    after = payment(client, paid["id"])
    assert (after["status"], after["provider_charge_id"]) == ("succeeded", intent["id"])
