"""The sandbox ledger: refund rules under its lock, settling, and what it announces."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from sandbox_provider.charges import ChargeRequest
from sandbox_provider.ledger import NEW, REPLAY, REUSED, Ledger
from sandbox_provider.refunds import RefundRefused, RefundRequest

AMOUNT = 2599


@pytest.fixture
def announced() -> list[dict]:
    return []


@pytest.fixture
def ledger(announced) -> Ledger:
    return Ledger(on_settled=announced.append)


def charge(ledger, payment_method="card", amount=AMOUNT, key=None, settle_later=False) -> dict:
    request = ChargeRequest(amount, "USD", payment_method, "tx", None, None)
    key = key or f"ch-{uuid.uuid4().hex}"
    outcome, reservation = ledger.begin(key, request.fingerprint)
    assert outcome == NEW
    return ledger.commit_charge(key, reservation, request, settle_later)


def refund(ledger, charge_id, amount=None, key=None, settle_later=False) -> dict:
    request = RefundRequest(charge_id, amount, None, None)
    key = key or f"re-{uuid.uuid4().hex}"
    outcome, reservation = ledger.begin(key, request.fingerprint)
    assert outcome == NEW
    try:
        return ledger.commit_refund(key, reservation, request, settle_later)
    except RefundRefused:
        ledger.release(key, reservation)
        raise


def amount_refunded(ledger, charge_id) -> int:
    return ledger.get(charge_id)["amount_refunded"]


def test_refunds_count_against_the_charge_until_nothing_is_left(ledger):
    paid = charge(ledger)
    assert refund(ledger, paid["id"], 1000)["amount"] == 1000
    assert refund(ledger, paid["id"])["amount"] == AMOUNT - 1000
    assert amount_refunded(ledger, paid["id"]) == AMOUNT
    with pytest.raises(RefundRefused) as refused:
        refund(ledger, paid["id"], 1)
    assert (refused.value.status, refused.value.code) == (400, "amount_too_large")


@pytest.mark.parametrize(
    ("payment_method", "settle_later", "status", "code"),
    [
        ("card_declined", False, 400, "charge_not_refundable"),
        ("card", True, 400, "charge_not_refundable"),
    ],
)
def test_only_succeeded_charges_refund(ledger, payment_method, settle_later, status, code):
    unpaid = charge(ledger, payment_method, settle_later=settle_later)
    with pytest.raises(RefundRefused) as refused:
        refund(ledger, unpaid["id"])
    assert (refused.value.status, refused.value.code) == (status, code)
    assert ledger.refunds() == []


def test_unknown_charge_is_refused_as_missing(ledger):
    with pytest.raises(RefundRefused) as refused:
        refund(ledger, "ch_missing")
    assert (refused.value.status, refused.value.code) == (404, "resource_missing")


def test_failed_refunds_leave_the_amount_refundable(ledger):
    paid = charge(ledger, "refund_fails")
    failed = refund(ledger, paid["id"])
    assert (failed["status"], failed["failure_reason"]) == ("failed", "declined")
    assert amount_refunded(ledger, paid["id"]) == 0


def test_pending_refunds_hold_their_amount_and_settle_as_the_charge_says(ledger, announced):
    paid = charge(ledger, "refund_pending_then_fail")
    pending = refund(ledger, paid["id"], 1000)
    assert pending["status"] == "pending"
    assert amount_refunded(ledger, paid["id"]) == 1000
    announced.clear()
    settled = ledger.settle_refund(pending["id"])
    assert settled["status"] == "failed"
    assert amount_refunded(ledger, paid["id"]) == 0
    assert announced == [settled]


def test_a_failed_refund_stays_failed(ledger):
    paid = charge(ledger)
    made = refund(ledger, paid["id"])
    assert ledger.settle_refund(made["id"], "failed")["status"] == "failed"
    assert amount_refunded(ledger, paid["id"]) == 0
    with pytest.raises(RefundRefused, match="stays failed"):
        ledger.settle_refund(made["id"], "succeeded")


def test_concurrent_refunds_never_refund_more_than_the_charge(ledger):
    paid = charge(ledger, amount=10_000)
    clients = 16
    start = threading.Barrier(clients)

    def refund_1000(_):
        start.wait(timeout=10)
        try:
            return refund(ledger, paid["id"], 1000)["amount"]
        except RefundRefused:
            return 0

    with ThreadPoolExecutor(max_workers=clients) as executor:
        amounts = list(executor.map(refund_1000, range(clients)))
    assert sorted(amounts) == [0] * (clients - 10) + [1000] * 10
    assert amount_refunded(ledger, paid["id"]) == 10_000


def test_charges_and_refunds_share_one_key_space(ledger):
    paid = charge(ledger, key="shared")
    request = RefundRequest(paid["id"], None, None, None)
    assert ledger.begin("shared", request.fingerprint)[0] == REUSED


def test_a_replay_is_the_first_answer_after_the_object_changed(ledger):
    paid = charge(ledger, key="replayed")
    refund(ledger, paid["id"], 100)
    request = ChargeRequest(AMOUNT, "USD", "card", "tx", None, None)
    outcome, reservation = ledger.begin("replayed", request.fingerprint)
    assert outcome == REPLAY
    assert reservation.reply == (201, paid)
    assert ledger.by_key("replayed")[0]["amount_refunded"] == 100


def test_final_charges_are_announced_at_once_pending_ones_when_settled(ledger, announced):
    paid = charge(ledger)
    declined = charge(ledger, "card_declined")
    pending = charge(ledger, "pending_then_succeed")
    assert announced == [paid, declined]
    settled = ledger.settle_charge(pending["id"])
    assert settled["status"] == "succeeded"
    assert announced[-1] == settled
    assert ledger.settle_charge(pending["id"]) == settled  # a late timer changes nothing
    assert len(announced) == 3


def test_settle_control_fails_a_succeeded_charge_once(ledger, announced):
    paid = charge(ledger)
    failed = ledger.settle_charge(paid["id"], "failed")
    assert (failed["failure_code"], failed["failure_message"]) == (
        "charge_failed",
        "The charge failed after it was accepted.",
    )
    assert ledger.settle_charge(paid["id"], "failed") == failed
    assert [c["status"] for c in announced] == ["succeeded", "failed"]
    assert paid["status"] == "succeeded"  # recorded objects are copies, never mutated


def test_books_balance_and_summary_counts_refunds(ledger):
    paid = charge(ledger)
    refund(ledger, paid["id"], 600)
    books = ledger.books()
    assert books["data"][0]["amount_refunded"] == sum(r["amount"] for r in books["refunds"])
    summary = ledger.summary()
    assert (summary["refunds"], summary["refunded_total_minor"]) == (1, {"USD": 600})
