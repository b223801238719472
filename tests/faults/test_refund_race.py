"""The refund ceiling under a race: 40 partial refunds of one payment on two instances.

Two gunicorn instances share one PostgreSQL database; 40 clients ask at once for 1.00
each of one 10.00 payment, alternately on either instance. The ceiling is one
conditional UPDATE on the payment row (and a CHECK behind it), so exactly 10 can succeed
whatever the interleaving, and the provider must have refunded exactly 10.00.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults.harness import new_key, query

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres]

REFUNDS = 40


def test_forty_concurrent_refunds_never_refund_more_than_was_charged(sandbox, start_service):
    first = start_service(GUNICORN_WORKERS=2, GUNICORN_THREADS=8)
    services = [first, start_service(database_url=first.database_url, GUNICORN_WORKERS=2)]
    paid = first.pay(new_key(), "10.00")
    assert paid.status_code == 201, paid.text
    payment_id = paid.json()["id"]
    start = threading.Barrier(REFUNDS)

    def refund(index: int):
        start.wait(timeout=30)  # all 40 in flight together
        return services[index % 2].refund(payment_id, "1.00", new_key("refund"))

    with ThreadPoolExecutor(REFUNDS) as pool:
        responses = list(pool.map(refund, range(REFUNDS)))

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 10 + [422] * 30, statuses
    for response in responses:
        if response.status_code == 422:
            assert response.json()["code"] == "amount_exceeds_refundable"
    refunded = [r for r in sandbox.refunds() if r["status"] == "succeeded"]
    assert len(refunded) == 10 and sum(r["amount"] for r in refunded) == 1000
    payment = first.get(f"/v1/payments/{payment_id}").json()
    assert payment["amount_refunded"] == "10.00"
    (row,) = query(
        first.database_url,
        "SELECT refund_reserved_minor, amount_refunded_minor FROM payments WHERE id = :id",
        id=payment_id,
    )
    assert (row["refund_reserved_minor"], row["amount_refunded_minor"]) == (1000, 1000)
    stored = query(first.database_url, "SELECT status, count(*) AS n FROM refunds GROUP BY status")
    assert {r["status"]: r["n"] for r in stored} == {"succeeded": 10}
