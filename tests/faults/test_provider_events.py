"""Provider events end to end: the sandbox posts signed events to the service under gunicorn.

A charge the sandbox answers ``pending`` and settles a moment later becomes ``succeeded``
through its event alone, with no reconciliation run; the sandbox retries a delivery the
service could not take, as real providers do.
"""

from __future__ import annotations

import pytest

from tests.faults.harness import new_key, query, wait_until
from tests.support.webhooks import new_secret

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres]

SECRET = new_secret()


@pytest.fixture
def service(sandbox, start_service):
    service = start_service(PAYMENT_WEBHOOK_SECRET=SECRET)
    sandbox.set_webhooks(f"{service.url}/v1/webhooks/sandbox", SECRET, backoff_ms=100)
    yield service
    sandbox.set_webhooks(None)


def status_of(service, payment_id: str) -> str:
    return service.get(f"/v1/payments/{payment_id}").json()["status"]


def test_a_pending_payment_becomes_succeeded_through_its_event_alone(sandbox, service):
    response = service.pay(new_key(), payment_method="pending_then_succeed")
    assert response.status_code == 202 and response.json()["status"] == "pending"
    payment_id = response.json()["id"]

    wait_until(lambda: status_of(service, payment_id) == "succeeded", 15, message="not settled")
    (charge,) = sandbox.ledger()
    payment = service.get(f"/v1/payments/{payment_id}").json()
    assert payment["provider_charge_id"] == charge["id"]
    events = query(
        service.database_url,
        "SELECT from_status, to_status, reason FROM payment_events WHERE payment_id = :id "
        "ORDER BY id",
        id=payment_id,
    )
    assert [(e["from_status"], e["to_status"], e["reason"]) for e in events] == [
        (None, "pending", "created"),
        ("pending", "succeeded", "charge.succeeded"),  # the event, not a reconciler
    ]
    (delivery,) = [e for e in sandbox.events() if e["event"]["type"] == "charge.succeeded"]
    assert delivery["status"] == "delivered"


def test_a_failed_charge_is_failed_by_its_event_after_asking_the_provider(sandbox, service):
    response = service.pay(new_key(), payment_method="pending_then_fail")
    payment_id = response.json()["id"]
    wait_until(lambda: status_of(service, payment_id) == "failed", 15, message="not settled")
    lookups = query(
        service.database_url,
        "SELECT count(*) AS n FROM payment_attempts WHERE payment_id = :id AND kind = 'lookup'",
        id=payment_id,
    )
    assert lookups[0]["n"] == 1  # a failure is the provider's to confirm, not the payload's
