"""Provider events over HTTP (DESIGN.md section 11): verified, stored once, safe in any order.

The app runs through Flask's test client against a real sandbox process and a migrated
SQLite file (``test_service_api``'s fixtures). The sandbox makes the events; the tests
post them, signed as the sandbox signs them, so they can shuffle, duplicate, replay and
tamper with deliveries. Events are applied on the receiver's background thread; tests
wait for it with ``dispatcher.join()``.
"""

# ruff: noqa: F811 - the app fixtures are test_service_api's, imported by name
from __future__ import annotations

import logging
import random
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

import database_config
import payment_handler
from provider_events import get_webhook_receiver
from tests.integration.test_service_api import (  # noqa: F401
    AUTH,
    assert_payment,
    assert_problem,
    database_url,
    make_app,
    new_key,
    pay,
    sandbox,
)
from tests.support.webhooks import new_secret, signed

SECRET = new_secret()
URL = "/v1/webhooks/sandbox"


@pytest.fixture
def client(make_app):
    return make_app(payment_webhook_secret=SECRET).test_client()


def deliver(client, event: dict, *, at=None, secret=SECRET):
    body, headers = signed(secret, event, at=at)
    return client.post(URL, data=body, headers=headers)


def applied():
    """Wait until every event handed to the applier has been applied."""
    get_webhook_receiver(payment_handler.get_payment_service()).dispatcher.join()


def stored_events() -> int:
    with database_config.transaction() as conn:
        return conn.scalar(select(func.count()).select_from(database_config.provider_events))


def sandbox_event(sandbox, type_: str, key: str) -> dict:
    """The sandbox's event of ``type_`` for the object made under ``key``."""
    events = sandbox.wait_for_events(
        lambda es: any(
            e["event"]["type"] == type_ and e["event"]["data"]["object"]["idempotency_key"] == key
            for e in es
        )
    )
    return next(
        e["event"]
        for e in events
        if e["event"]["type"] == type_ and e["event"]["data"]["object"]["idempotency_key"] == key
    )


@pytest.fixture
def events_on(sandbox):
    """The sandbox records events (to a URL nobody serves: the tests deliver them)."""
    sandbox.set_webhooks("http://127.0.0.1:9/nowhere", SECRET, max_attempts=1)
    yield
    sandbox.set_webhooks(None)


def test_a_pending_payment_is_settled_by_its_event_alone(client, sandbox, events_on):
    key = new_key()
    pending = assert_payment(pay(client, {"payment_method": "pending_then_succeed"}, key=key), 202)
    assert pending["status"] == "pending"
    event = sandbox_event(sandbox, "charge.succeeded", key)

    response = deliver(client, event)
    assert response.status_code == 200 and response.get_json() == {
        "received": True,
        "duplicate": False,
    }
    applied()
    payment = client.get(f"/v1/payments/{pending['id']}", headers=AUTH).get_json()
    assert payment["status"] == "succeeded"
    assert payment["provider_charge_id"] == event["data"]["object"]["id"]


def test_a_redelivered_event_is_200_and_changes_nothing(client, sandbox, events_on):
    key = new_key()
    pay(client, {"payment_method": "pending_then_succeed"}, key=key)
    event = sandbox_event(sandbox, "charge.succeeded", key)
    deliver(client, event)
    before = stored_events()
    again = deliver(client, event)
    assert again.status_code == 200 and again.get_json()["duplicate"] is True
    assert stored_events() == before


@pytest.mark.parametrize(
    "spoil",
    ["bad signature", "tampered body", "ten minutes old", "ten minutes ahead", "no headers"],
)
def test_a_delivery_that_is_not_verified_is_400_and_nothing_is_stored(
    client, sandbox, events_on, spoil, caplog
):
    key = new_key()
    paid = assert_payment(pay(client, {"payment_method": "pending_then_succeed"}, key=key), 202)
    event = sandbox_event(sandbox, "charge.succeeded", key)
    now = datetime.now(UTC)
    at = {
        "ten minutes old": now - timedelta(minutes=10),
        "ten minutes ahead": now + timedelta(minutes=10),
    }.get(spoil)
    body, headers = signed(new_secret() if spoil == "bad signature" else SECRET, event, at=at)
    if spoil == "tampered body":
        body = body.replace(b'"succeeded"', b'"failed"')
    if spoil == "no headers":
        headers = {"Content-Type": "application/json"}
    before = stored_events()
    with caplog.at_level(logging.WARNING, logger="service.webhooks"):
        response = client.post(URL, data=body, headers=headers)
    assert_problem(response, 400)
    assert stored_events() == before
    assert client.get(f"/v1/payments/{paid['id']}", headers=AUTH).get_json()["status"] == "pending"
    (record,) = [r for r in caplog.records if r.name == "service.webhooks"]
    assert SECRET.removeprefix("whsec_") not in record.getMessage()
    assert event["id"] not in record.getMessage() or spoil == "no headers"
    assert "idempotency_key" not in record.getMessage()


def test_without_a_secret_every_delivery_is_refused(make_app, sandbox, events_on):
    client = make_app().test_client()
    response = deliver(
        client, {"id": "evt_1", "type": "charge.succeeded", "created": 1, "data": {"object": {}}}
    )
    assert_problem(response, 400)


def test_an_event_for_another_provider_is_404(client):
    assert_problem(client.post("/v1/webhooks/stripe", data=b"{}"), 404)
    assert_problem(client.post("/v1/webhooks/acme", data=b"{}"), 404)


def test_an_event_for_a_payment_we_do_not_know_changes_nothing(client):
    event = {
        "id": "evt_unknown_payment",
        "type": "charge.succeeded",
        "created": int(datetime.now(UTC).timestamp()),
        "data": {
            "object": {
                "id": "ch_x",
                "status": "succeeded",
                "amount": 100,
                "currency": "USD",
                "idempotency_key": new_key(),
            }
        },
    }
    assert deliver(client, event).status_code == 200
    applied()
    with database_config.transaction() as conn:
        result = conn.scalar(
            select(database_config.provider_events.c.result).where(
                database_config.provider_events.c.event_id == "evt_unknown_payment"
            )
        )
    assert result == "unknown"


def test_a_whole_days_events_in_any_order_leave_the_books_as_the_provider_has_them(
    client, sandbox, events_on
):
    rng = random.Random(11)
    methods = [
        "card",
        "card_declined",
        "pending_then_succeed",
        "pending_then_fail",
        "refund_pending",  # its refunds are pending, then succeed
        "refund_pending_then_fail",  # its refunds are pending, then fail
    ]
    payments = {}
    for n in range(120):
        key = new_key()
        amount = f"{rng.randint(100, 9999) / 100:.2f}"
        response = pay(client, {"amount": amount, "payment_method": methods[n % 6]}, key=key)
        assert response.status_code in (201, 202, 402), response.get_data(as_text=True)
        payments[key] = response.get_json()["payment_id" if response.status_code == 402 else "id"]
    refunds = {}
    for n, key in enumerate(payments):
        if methods[n % 6] in ("card", "refund_pending", "refund_pending_then_fail"):
            response = client.post(
                f"/v1/payments/{payments[key]}/refunds",
                json={"amount": "0.50"},
                headers={**AUTH, "Idempotency-Key": f"r-{key}"},
            )
            assert response.status_code in (201, 202), response.get_data(as_text=True)
            refunds[f"r-{key}"] = response.get_json()["id"]
    sandbox.wait_for_state(lambda s: s["settlements_pending"] == 0)
    events = [
        e["event"]
        for e in sandbox.wait_for_events(lambda es: all(e["status"] != "pending" for e in es))
    ]
    # A charge.failed made before each succeeded one, as if delivered late: stale.
    for event in list(events):
        obj = event["data"]["object"]
        if event["type"] == "charge.succeeded":
            events.append(
                {
                    "id": event["id"] + "_early",
                    "type": "charge.failed",
                    "created": event["created"] - 60,
                    "data": {
                        "object": {**obj, "status": "failed", "failure_code": "card_declined"}
                    },
                }
            )
    deliveries = events * 3
    rng.shuffle(deliveries)
    assert len(deliveries) >= 300
    for event in deliveries:
        assert deliver(client, event).status_code == 200
    applied()

    with database_config.transaction() as conn:
        e = database_config.provider_events.c
        results = dict(conn.execute(select(e.result, func.count()).group_by(e.result)).all())
    assert results.get("applied", 0) >= 80 and results.get("stale", 0) >= 100, results
    assert None not in results, results

    ledger = {c["idempotency_key"]: c for c in sandbox.ledger()}
    for key, payment_id in payments.items():
        ours = client.get(f"/v1/payments/{payment_id}", headers=AUTH).get_json()
        assert ours["status"] == ledger[key]["status"], (key, ours["status"], ledger[key]["status"])
        refunded = ledger[key].get("amount_refunded", 0)
        assert ours["amount_refunded"] == f"{refunded / 100:.2f}", key
    provider_refunds = {r["idempotency_key"]: r for r in sandbox.refunds()}
    for key, refund_id in refunds.items():
        ours = client.get(f"/v1/refunds/{refund_id}", headers=AUTH).get_json()
        assert ours["status"] == provider_refunds[refund_id]["status"], key


def test_the_endpoint_answers_a_burst_without_waiting_for_events_to_be_applied(
    client, sandbox, events_on
):
    receiver = get_webhook_receiver(payment_handler.get_payment_service())
    gate = threading.Event()
    original = receiver.applier.apply
    receiver.applier.apply = lambda event: (gate.wait(30), original(event))[1]
    try:
        now = int(datetime.now(UTC).timestamp())
        for n in range(500):
            event = {
                "id": f"evt_burst_{n}_{new_key()}",
                "type": "charge.succeeded",
                "created": now,
                "data": {
                    "object": {
                        "id": f"ch_{n}",
                        "status": "succeeded",
                        "amount": 100,
                        "currency": "USD",
                        "idempotency_key": new_key(),
                    }
                },
            }
            assert deliver(client, event).status_code == 200
        with database_config.transaction() as conn:
            unapplied = conn.scalar(
                select(func.count())
                .select_from(database_config.provider_events)
                .where(database_config.provider_events.c.result.is_(None))
            )
        assert unapplied >= 499  # answered while the applier was held
    finally:
        gate.set()
        receiver.applier.apply = original
    applied()
