"""Refunds over HTTP (DESIGN.md section 6), status by status, through Flask's test client.

The app runs against a real sandbox provider process (which keeps its own refund
ceiling per charge) and a migrated SQLite file, like ``test_service_api``.
"""

# ruff: noqa: F811 - the app fixtures are test_service_api's, imported by name
from __future__ import annotations

import pytest

from tests.integration.test_service_api import (  # noqa: F401
    AUTH,
    assert_payment,
    assert_problem,
    client,
    database_url,
    make_app,
    new_key,
    pay,
    retry_after,
    sandbox,
)


def refund(client, payment_id, body=None, *, key=None):
    headers = {**AUTH, **({"Idempotency-Key": key} if key else {})}
    return client.post(f"/v1/payments/{payment_id}/refunds", json=body or {}, headers=headers)


def assert_refund(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["id"].startswith("ref_")
    return body


@pytest.fixture
def paid(client):
    return assert_payment(pay(client, {"amount": "10.00"}, key=new_key()), 201)


def test_a_partial_refund_is_201_and_the_payment_shows_it(client, paid, sandbox):
    body = assert_refund(refund(client, paid["id"], {"amount": "2.50"}, key=new_key()), 201)
    assert (body["status"], body["amount"], body["payment_id"]) == ("succeeded", "2.50", paid["id"])
    assert body["provider_refund_id"].startswith("re_")
    payment = assert_payment(client.get(f"/v1/payments/{paid['id']}", headers=AUTH), 200)
    assert payment["amount_refunded"] == "2.50"
    fetched = client.get(f"/v1/refunds/{body['id']}", headers=AUTH)
    assert assert_refund(fetched, 200) == body
    assert [r["amount"] for r in sandbox.refunds()] == [250]


def test_without_an_amount_the_rest_is_refunded(client, paid):
    refund(client, paid["id"], {"amount": "4.00"}, key=new_key())
    body = assert_refund(refund(client, paid["id"], key=new_key()), 201)
    assert body["amount"] == "6.00"
    payment = client.get(f"/v1/payments/{paid['id']}", headers=AUTH).get_json()
    assert payment["amount_refunded"] == "10.00"


def test_more_than_is_left_is_422_and_nothing_is_sent(client, paid, sandbox):
    refund(client, paid["id"], {"amount": "9.00"}, key=new_key())
    body = assert_problem(
        refund(client, paid["id"], {"amount": "1.01"}, key=new_key()),
        422,
        "amount_exceeds_refundable",
    )
    assert "1.00 USD left" in body["detail"]
    assert len(sandbox.refunds()) == 1


def test_a_payment_that_did_not_succeed_is_409(client):
    declined = pay(client, {"payment_method": "card_declined"}, key=new_key())
    payment_id = assert_problem(declined, 402)["payment_id"]
    assert_problem(refund(client, payment_id, key=new_key()), 409, "payment_not_refundable")


@pytest.mark.parametrize("payment_id", ["pay_" + "0" * 24, "nonsense"])
def test_an_unknown_payment_is_404(client, payment_id):
    assert_problem(refund(client, payment_id, key=new_key()), 404)


def test_an_unknown_refund_is_404(client):
    assert_problem(client.get("/v1/refunds/ref_" + "0" * 24, headers=AUTH), 404)


def test_the_same_key_replays_and_another_body_is_422(client, paid, sandbox):
    key = new_key()
    first = assert_refund(refund(client, paid["id"], {"amount": "1.00"}, key=key), 201)
    again = refund(client, paid["id"], {"amount": "1.00"}, key=key)
    assert assert_refund(again, 201) == first and again.headers["Idempotent-Replayed"] == "true"
    assert_problem(
        refund(client, paid["id"], {"amount": "2.00"}, key=key), 422, "idempotency_key_reused"
    )
    assert len(sandbox.refunds()) == 1


@pytest.mark.parametrize(
    "body, code",
    [
        ({"amount": "0"}, "invalid_amount"),
        ({"amount": "1.001"}, "invalid_amount"),
        ({"amount": "abc"}, "invalid_amount"),
        ({"colour": "red"}, "unknown_field"),
        ({"reason": ""}, "invalid_reason"),
    ],
)
def test_an_invalid_refund_request_is_422(client, paid, body, code):
    assert_problem(refund(client, paid["id"], body, key=new_key()), 422, code)


def test_a_refund_while_the_provider_is_down_is_503_with_retry_after(make_app, paid):
    client = make_app(payment_api_url="http://127.0.0.1:9").test_client()
    response = refund(client, paid["id"], {"amount": "1.00"}, key=new_key())
    body = assert_problem(response, 503)
    assert retry_after(response) >= 1 and "nothing was refunded" in body["detail"]
    payment = client.get(f"/v1/payments/{paid['id']}", headers=AUTH).get_json()
    assert payment["amount_refunded"] == "0.00"


def test_a_refund_whose_answer_is_lost_is_202_unknown_and_the_retry_refunds_once(
    client, paid, sandbox
):
    key = new_key()
    sandbox.set_faults(hang_after_commit=True)
    hung = refund(client, paid["id"], {"amount": "3.00"}, key=key)
    body = assert_refund(hung, 202)
    assert body["status"] == "unknown"
    sandbox.set_faults()
    retried = assert_refund(refund(client, paid["id"], {"amount": "3.00"}, key=key), 201)
    assert retried["id"] == body["id"] and retried["status"] == "succeeded"
    assert [r["amount"] for r in sandbox.refunds()] == [300]
