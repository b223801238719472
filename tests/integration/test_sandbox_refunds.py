"""Refunds at the sandbox provider, a real process over real sockets (DESIGN.md 5a and 9)."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support.sandbox import SandboxError

AMOUNT = 2599


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def new_key() -> str:
    return f"key_{uuid.uuid4().hex}"


def charge(sandbox, amount=AMOUNT, payment_method="card") -> dict:
    key = new_key()
    body = {
        "amount": amount,
        "currency": "USD",
        "payment_method": payment_method,
        "transaction_id": key,
    }
    headers = {**sandbox.auth_headers, "Idempotency-Key": key}
    response = requests.post(f"{sandbox.url}/v1/charges", json=body, headers=headers, timeout=5)
    assert response.status_code in (200, 201, 402), response.text
    return sandbox.ledger()[-1] if response.status_code == 402 else response.json()


def refund(sandbox, charge_id, key=None, timeout=5.0, **fields) -> requests.Response:
    body = {"charge": charge_id, "reason": "requested_by_customer", **fields}
    headers = {**sandbox.auth_headers, "Idempotency-Key": key or new_key()}
    return requests.post(f"{sandbox.url}/v1/refunds", json=body, headers=headers, timeout=timeout)


def get(sandbox, path, **params) -> requests.Response:
    return requests.get(
        f"{sandbox.url}{path}", params=params, headers=sandbox.auth_headers, timeout=5
    )


def error_code(response) -> str:
    return response.json()["error"]["code"]


def refunded(sandbox, charge_id) -> int:
    return get(sandbox, f"/v1/charges/{charge_id}").json()["amount_refunded"]


def test_partial_refund_succeeds_and_counts_against_the_charge(sandbox):
    paid = charge(sandbox)
    assert paid["amount_refunded"] == 0
    key = new_key()
    response = refund(sandbox, paid["id"], key, amount=1000, metadata={"ticket": "7"})
    assert response.status_code == 200
    made = response.json()
    assert made["id"].startswith("re_")
    assert made["object"] == "refund"
    assert (made["status"], made["charge"], made["amount"]) == ("succeeded", paid["id"], 1000)
    assert (made["currency"], made["idempotency_key"]) == ("USD", key)
    assert (made["reason"], made["metadata"]) == ("requested_by_customer", {"ticket": "7"})
    assert made["failure_reason"] is None
    assert isinstance(made["created"], int)
    assert refunded(sandbox, paid["id"]) == 1000


def test_refund_without_amount_refunds_what_is_left(sandbox):
    paid = charge(sandbox)
    refund(sandbox, paid["id"], amount=600)
    rest = refund(sandbox, paid["id"]).json()
    assert rest["amount"] == AMOUNT - 600
    assert refunded(sandbox, paid["id"]) == AMOUNT


def test_refund_over_what_is_left_is_400_amount_too_large(sandbox):
    paid = charge(sandbox)
    refund(sandbox, paid["id"], amount=2000)
    too_much = refund(sandbox, paid["id"], amount=600)
    assert too_much.status_code == 400
    assert error_code(too_much) == "amount_too_large"
    assert "599" in too_much.json()["error"]["message"]
    assert refund(sandbox, paid["id"], amount=599).status_code == 200
    nothing_left = refund(sandbox, paid["id"])
    assert (nothing_left.status_code, error_code(nothing_left)) == (400, "amount_too_large")
    assert [r["amount"] for r in sandbox.refunds()] == [2000, 599]


def test_a_refused_refund_frees_its_key(sandbox):
    paid = charge(sandbox)
    key = new_key()
    assert refund(sandbox, paid["id"], key, amount=AMOUNT + 1).status_code == 400
    assert refund(sandbox, paid["id"], key, amount=AMOUNT).status_code == 200


@pytest.mark.parametrize("payment_method", ["card_declined", "pending_then_succeed"])
def test_refund_of_a_charge_that_did_not_succeed_is_400(sandbox, payment_method):
    unpaid = charge(sandbox, payment_method=payment_method)
    response = refund(sandbox, unpaid["id"])
    assert response.status_code == 400
    assert error_code(response) == "charge_not_refundable"
    assert sandbox.refunds() == []


def test_refund_of_an_unknown_charge_is_404(sandbox):
    response = refund(sandbox, "ch_unknown")
    assert (response.status_code, error_code(response)) == (404, "resource_missing")


def test_concurrent_refunds_never_refund_more_than_the_charge(sandbox):
    paid = charge(sandbox, amount=10_000)
    clients = 16
    start = threading.Barrier(clients)

    def refund_1000():
        start.wait(timeout=10)
        return refund(sandbox, paid["id"], amount=1000)

    with ThreadPoolExecutor(max_workers=clients) as executor:
        futures = [executor.submit(refund_1000) for _ in range(clients)]
        answers = [future.result(timeout=30) for future in futures]
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] * 10 + [400] * (clients - 10)
    assert sum(r["amount"] for r in sandbox.refunds()) == 10_000
    assert refunded(sandbox, paid["id"]) == 10_000


def test_repeat_with_same_key_and_body_replays_the_refund(sandbox):
    paid = charge(sandbox)
    key = new_key()
    first = refund(sandbox, paid["id"], key, amount=100)
    again = refund(sandbox, paid["id"], key, amount=100)
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert refunded(sandbox, paid["id"]) == 100


def test_same_key_with_another_body_is_422(sandbox):
    paid = charge(sandbox)
    key = new_key()
    refund(sandbox, paid["id"], key, amount=100)
    reused = refund(sandbox, paid["id"], key, amount=200)
    assert (reused.status_code, error_code(reused)) == (422, "idempotency_key_reused")


def test_a_charge_key_reused_for_a_refund_is_422(sandbox):
    paid = charge(sandbox)
    reused = refund(sandbox, paid["id"], paid["idempotency_key"])
    assert (reused.status_code, error_code(reused)) == (422, "idempotency_key_reused")


def test_same_key_while_first_refund_in_flight_is_409(sandbox, pool):
    paid = charge(sandbox)
    sandbox.set_faults(latency_ms=1000)
    key = new_key()
    first = pool.submit(refund, sandbox, paid["id"], key)
    sandbox.wait_for_state(lambda state: state["in_flight"] == 1)
    conflict = refund(sandbox, paid["id"], key)
    assert (conflict.status_code, error_code(conflict)) == (409, "request_in_progress")
    assert conflict.headers["Retry-After"] == "1"
    assert first.result(timeout=10).status_code == 200
    assert len(sandbox.refunds()) == 1


def test_rejecting_faults_apply_to_refunds_and_record_nothing(sandbox):
    paid = charge(sandbox)
    sandbox.set_faults(script=[503, "reset"], retry_after=2)
    key = new_key()
    unavailable = refund(sandbox, paid["id"], key)
    assert unavailable.status_code == 503
    assert unavailable.headers["Retry-After"] == "2"
    with pytest.raises(requests.ConnectionError):
        refund(sandbox, paid["id"], key)
    assert sandbox.refunds() == []
    assert refund(sandbox, paid["id"], key).status_code == 200
    assert sandbox.state()["requests"]["POST /v1/refunds"] == 3


@pytest.mark.parametrize("fault", ["reset_mid_response", "malformed_json", "html"])
def test_committing_faults_lose_the_answer_but_not_the_refund(sandbox, fault):
    paid = charge(sandbox)
    sandbox.set_faults(script=[fault])
    key = new_key()
    try:
        lost = refund(sandbox, paid["id"], key)
        with pytest.raises(ValueError):
            lost.json()
    except requests.ConnectionError:
        pass
    [recorded] = sandbox.refunds()
    replayed = refund(sandbox, paid["id"], key)
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json() == recorded


def test_missing_status_fault_answers_a_refund_without_status(sandbox):
    paid = charge(sandbox)
    sandbox.set_faults(script=["missing_status"])
    answered = refund(sandbox, paid["id"]).json()
    assert "status" not in answered
    assert answered["id"] == sandbox.refunds()[0]["id"]


def test_hang_after_commit_records_the_refund_before_hanging(sandbox):
    paid = charge(sandbox)
    sandbox.set_faults(hang_after_commit=True)
    with pytest.raises(requests.ReadTimeout):
        refund(sandbox, paid["id"], timeout=(3, 0.3))
    assert [r["status"] for r in sandbox.refunds()] == ["succeeded"]
    assert refunded(sandbox, paid["id"]) == AMOUNT
    sandbox.set_faults()
    sandbox.wait_for_state(lambda state: state["hung"] == 0)


def test_lookup_by_idempotency_key_and_by_id(sandbox):
    paid = charge(sandbox)
    key = new_key()
    assert get(sandbox, "/v1/refunds", idempotency_key=key).json() == {"data": []}
    made = refund(sandbox, paid["id"], key).json()
    assert get(sandbox, "/v1/refunds", idempotency_key=key).json() == {"data": [made]}
    assert get(sandbox, f"/v1/refunds/{made['id']}").json() == made
    missing = get(sandbox, "/v1/refunds/re_missing")
    assert (missing.status_code, error_code(missing)) == (404, "resource_missing")
    assert get(sandbox, "/v1/refunds").status_code == 400
    no_key = requests.get(f"{sandbox.url}/v1/refunds", params={"idempotency_key": key}, timeout=5)
    assert no_key.status_code == 401


def test_refunds_of_a_refund_fails_charge_fail_and_count_for_nothing(sandbox):
    paid = charge(sandbox, payment_method="refund_fails")
    failed = refund(sandbox, paid["id"])
    assert failed.status_code == 200
    assert (failed.json()["status"], failed.json()["failure_reason"]) == ("failed", "declined")
    assert refunded(sandbox, paid["id"]) == 0
    assert sandbox.state()["refunded_total_minor"] == {}


@pytest.mark.parametrize(
    ("payment_method", "final"),
    [("refund_pending", "succeeded"), ("refund_pending_then_fail", "failed")],
)
def test_pending_refunds_hold_their_amount_until_they_settle(sandbox, payment_method, final):
    paid = charge(sandbox, payment_method=payment_method)
    made = refund(sandbox, paid["id"], amount=1000).json()
    assert made["status"] == "pending"
    assert refunded(sandbox, paid["id"]) == 1000
    assert refund(sandbox, paid["id"], amount=AMOUNT - 999).status_code == 400
    settled = sandbox.wait_for(
        lambda: get(sandbox, f"/v1/refunds/{made['id']}").json(),
        lambda found: found["status"] != "pending",
    )
    assert settled["status"] == final
    assert refunded(sandbox, paid["id"]) == (1000 if final == "succeeded" else 0)


def test_settle_later_fault_answers_refunds_pending(sandbox):
    paid = charge(sandbox)
    sandbox.set_faults(settle_later_ms=50)
    made = refund(sandbox, paid["id"]).json()
    assert made["status"] == "pending"
    sandbox.wait_for(
        lambda: get(sandbox, f"/v1/refunds/{made['id']}").json()["status"],
        lambda status: status == "succeeded",
    )


def test_settle_control_fails_a_succeeded_refund_and_frees_its_amount(sandbox):
    paid = charge(sandbox)
    made = refund(sandbox, paid["id"]).json()
    assert sandbox.settle_refund(made["id"], "failed")["status"] == "failed"
    assert refunded(sandbox, paid["id"]) == 0
    with pytest.raises(SandboxError, match="refund_not_settleable"):
        sandbox.settle_refund(made["id"], "succeeded")


def test_ledger_balances_charge_by_charge(sandbox):
    charges = [charge(sandbox, amount=amount) for amount in (1000, 2000, 3000)]
    refund(sandbox, charges[0]["id"], amount=400)
    refund(sandbox, charges[0]["id"], amount=600)
    refund(sandbox, charges[1]["id"], amount=1500)
    books = sandbox.books()
    for recorded in books["data"]:
        refunds = [r for r in books["refunds"] if r["charge"] == recorded["id"]]
        assert recorded["amount_refunded"] == sum(r["amount"] for r in refunds)
    assert [c["amount_refunded"] for c in books["data"]] == [1000, 1500, 0]
    state = sandbox.state()
    assert (state["refunds"], state["refunded_total_minor"]) == (3, {"USD": 2500})


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        {"charge": ""},
        {"charge": 7},
        {"amount": 0},
        {"amount": -1},
        {"amount": 10.5},
        {"amount": "100"},
        {"amount": True},
        {"reason": 5},
        {"metadata": "x"},
    ],
)
def test_invalid_refund_bodies_are_400_and_refund_nothing(sandbox, payload):
    paid = charge(sandbox)
    if isinstance(payload, bytes):
        data = payload
    else:
        data = json.dumps({"charge": paid["id"], **payload}).encode()
    headers = {
        **sandbox.auth_headers,
        "Idempotency-Key": new_key(),
        "Content-Type": "application/json",
    }
    response = requests.post(f"{sandbox.url}/v1/refunds", data=data, headers=headers, timeout=5)
    assert (response.status_code, error_code(response)) == (400, "invalid_request")
    assert sandbox.refunds() == []


def test_refund_without_idempotency_key_is_400(sandbox):
    paid = charge(sandbox)
    response = requests.post(
        f"{sandbox.url}/v1/refunds",
        json={"charge": paid["id"]},
        headers=sandbox.auth_headers,
        timeout=5,
    )
    assert (response.status_code, error_code(response)) == (400, "idempotency_key_required")


def test_reset_forgets_refunds(sandbox):
    refund(sandbox, charge(sandbox)["id"])
    assert sandbox.reset()["refunds"] == 0
    assert sandbox.books() == {"data": [], "refunds": []}
