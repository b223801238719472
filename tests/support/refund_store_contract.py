"""The ``RefundStore`` contract as tests, run against every store.

A test module imports these and provides a ``refund_contract`` fixture giving a payment
store and a refund store over the same (fresh) data, and the ``FakeClock`` they read:
``tests/unit/test_memory_store.py`` and ``tests/integration/test_refund_store_contract.py``
(PostgreSQL and SQLite), so the fake keeps the ceiling exactly as the database does.
"""

from __future__ import annotations

import uuid

import pytest

from errors import RefundNotAllowed
from payment_states import PaymentStatus, RefundState
from payment_store import Change
from refund_store import NewRefund, RefundChange
from tests.support.store_contract import attempt, new_payment

P, S, F, U = RefundState.PENDING, RefundState.SUCCEEDED, RefundState.FAILED, RefundState.UNKNOWN


def paid(payments, amount_minor=1234):
    payment, _ = payments.insert_pending(new_payment())
    return payments.transition(
        payment, Change(PaymentStatus.SUCCEEDED, "charged", provider_charge_id="ch_1")
    )


def new_refund(payment, amount_minor, key=None, reason="broken"):
    return NewRefund(
        id=f"ref_{uuid.uuid4().hex[:24]}",
        payment_id=payment.id,
        idempotency_key=key or f"refund-{uuid.uuid4().hex}",
        fingerprint="f" * 64,
        amount_minor=amount_minor,
        currency=payment.currency,
        reason=reason,
        metadata={"ticket": "t-1"},
    )


def amounts(payments, payment):
    row = payments.find_by_id(payment.id)
    return row.refund_reserved_minor, row.amount_refunded_minor


def test_a_refund_reserves_its_amount_with_its_row(refund_contract):
    payments, refunds, _ = refund_contract
    payment = paid(payments)
    refund, created = refunds.reserve(new_refund(payment, 1000))
    assert created and (refund.status, refund.version, refund.amount_minor) == (P, 0, 1000)
    assert refunds.find_refund(refund.id) == refund
    assert (refund.reason, refund.metadata, refund.currency) == ("broken", {"ticket": "t-1"}, "USD")
    assert amounts(payments, payment) == (1000, 0)


def test_a_taken_key_is_replayed_even_when_nothing_is_left(refund_contract):
    payments, refunds, _ = refund_contract
    payment = paid(payments)
    first, _ = refunds.reserve(new_refund(payment, 1234, key="same"))
    again, created = refunds.reserve(new_refund(payment, 1234, key="same"))
    assert not created and again == first
    assert amounts(payments, payment) == (1234, 0)


def test_more_than_is_left_is_refused_and_nothing_is_stored(refund_contract):
    payments, refunds, _ = refund_contract
    payment = paid(payments)
    refunds.reserve(new_refund(payment, 1000))
    with pytest.raises(RefundNotAllowed) as refused:
        refunds.reserve(new_refund(payment, 235, key="too-much"))
    assert refused.value.code == "amount_exceeds_refundable"
    assert refunds.find_refund_by_key("too-much") is None
    assert amounts(payments, payment) == (1000, 0)


def test_a_payment_that_did_not_succeed_is_not_refundable(refund_contract):
    payments, refunds, _ = refund_contract
    payment, _ = payments.insert_pending(new_payment())
    with pytest.raises(RefundNotAllowed) as refused:
        refunds.reserve(new_refund(payment, 100))
    assert refused.value.code == "payment_not_refundable"


def test_each_change_moves_the_payments_amounts_with_it(refund_contract):
    payments, refunds, _ = refund_contract
    payment = paid(payments)
    refund, _ = refunds.reserve(new_refund(payment, 1000))
    succeeded = refunds.transition_refund(
        refund, RefundChange(S, "refunded", attempts=[attempt()], provider_refund_id="re_1")
    )
    assert (succeeded.status, succeeded.version, succeeded.attempts) == (S, 1, 1)
    assert (succeeded.provider_refund_id, succeeded.reason) == ("re_1", "broken")
    assert amounts(payments, payment) == (1000, 1000)
    reversed_ = refunds.transition_refund(
        succeeded, RefundChange(F, "refund.failed", failure_code="refund_failed")
    )
    assert (reversed_.status, reversed_.failure_code, reversed_.reason) == (
        F,
        "refund_failed",
        "broken",
    )
    assert amounts(payments, payment) == (0, 0)


def test_a_certain_failure_releases_and_an_unknown_keeps_the_reservation(refund_contract):
    payments, refunds, _ = refund_contract
    payment = paid(payments)
    unknown, _ = refunds.reserve(new_refund(payment, 600))
    unknown = refunds.transition_refund(unknown, RefundChange(U, "outcome_unknown"))
    failed, _ = refunds.reserve(new_refund(payment, 400))
    refunds.transition_refund(failed, RefundChange(F, "provider_unavailable"))
    assert amounts(payments, payment) == (600, 0)


def test_a_failed_refund_takes_its_amount_again_only_if_it_still_fits(refund_contract):
    payments, refunds, _ = refund_contract
    payment = paid(payments)
    refund, _ = refunds.reserve(new_refund(payment, 1000))
    failed = refunds.transition_refund(
        refund, RefundChange(F, "provider_unavailable", failure_code="provider_unavailable")
    )
    refunds.reserve(new_refund(payment, 500))
    with pytest.raises(RefundNotAllowed):
        refunds.transition_refund(failed, RefundChange(P, "resubmitted"))
    assert refunds.find_refund(refund.id).status == F  # nothing of it was written
    assert amounts(payments, payment) == (500, 0)


def test_a_change_that_lost_the_race_keeps_the_newer_version(refund_contract):
    payments, refunds, _ = refund_contract
    payment = paid(payments)
    refund, _ = refunds.reserve(new_refund(payment, 1000))
    refunds.transition_refund(refund, RefundChange(S, "refunded", provider_refund_id="re_1"))
    late = refunds.transition_refund(refund, RefundChange(U, "late", attempts=[attempt()]))
    assert late is None
    current = refunds.find_refund(refund.id)
    assert (current.status, current.version, current.attempts) == (S, 1, 1)
    assert amounts(payments, payment) == (1000, 1000)
