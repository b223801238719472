"""The refund lifecycle (DESIGN.md section 4): the ceiling, idempotency and the money rule.

The real ``RefundService`` and ``PaymentClient`` over an in-memory store (which keeps
the SQL store's ceiling) and a scripted provider that refuses over-refunds as a real one
does. No process, no socket, no real sleep.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from errors import (
    IdempotencyKeyReused,
    InvalidPaymentRequest,
    PaymentDeclined,
    PaymentInProgress,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
    RefundDeclined,
    RefundNotAllowed,
)
from payment_states import RefundState
from providers.base import RefundStatus
from refund_store import RefundChange
from tests.support.scripted_provider import (
    DECLINE,
    LOST_ANSWER,
    NO_ANSWER,
    PENDING,
    REJECT,
    UNAVAILABLE,
)
from tests.unit.lifecycle import build_lifecycle


@pytest.fixture
def settings(make_settings):
    return make_settings(payment_breaker_failures=3, payment_breaker_reset=30)


@pytest.fixture
def life(settings, fake_clock):
    """A lifecycle with one succeeded 10.00 payment, ``life.paid``."""
    life = build_lifecycle(settings, fake_clock)
    life.paid = life.pay("10.00", "order-1")
    return life


def ceiling(life):
    payment = life.store.find_by_id(life.paid.id)
    return payment.refund_reserved_minor, payment.amount_refunded_minor


def test_a_full_refund_without_an_amount_refunds_what_is_left(life):
    refund = life.refund(life.paid.id)
    assert refund.status == RefundState.SUCCEEDED and refund.amount == Decimal("10.00")
    assert refund.provider_refund_id == "re_000001"
    assert ceiling(life) == (1000, 1000)
    assert life.refund_store.events_of(refund.id) == [
        (None, "pending", "created"),
        ("pending", "succeeded", "refunded"),
    ]


def test_partial_refunds_add_up_to_the_payment_and_no_further(life):
    for n in range(4):
        assert life.refund(life.paid.id, "2.50", key=f"r{n}").status == RefundState.SUCCEEDED
    with pytest.raises(RefundNotAllowed) as refused:
        life.refund(life.paid.id, "0.01", key="one-cent-too-many")
    assert refused.value.code == "amount_exceeds_refundable"
    assert refused.value.http_status == 422
    assert "0.00 USD left" in refused.value.message
    assert len(life.provider.refund_calls) == 4  # the refused one was never sent
    assert ceiling(life) == (1000, 1000)
    assert life.stored_refund("one-cent-too-many") is None


def test_the_rest_of_a_partly_refunded_payment(life):
    life.refund(life.paid.id, "3.00", key="part")
    assert life.refund(life.paid.id, key="rest").amount == Decimal("7.00")


def test_a_payment_that_is_not_succeeded_cannot_be_refunded(settings, fake_clock):
    life = build_lifecycle(settings, fake_clock, DECLINE)
    with pytest.raises(PaymentDeclined):
        life.pay("10.00", "order-1")
    with pytest.raises(RefundNotAllowed) as refused:
        life.refund(life.stored("order-1").id)
    assert refused.value.code == "payment_not_refundable" and refused.value.http_status == 409
    assert life.provider.refund_calls == []


@pytest.mark.parametrize("amount", ["0", "-1", "abc", "10.001"])
def test_a_bad_amount_is_refused_before_anything_is_stored(life, amount):
    with pytest.raises(InvalidPaymentRequest):
        life.refund(life.paid.id, amount)
    assert life.refund_store.refunds == {} and ceiling(life) == (0, 0)


def test_the_same_key_and_body_replays_the_refund_without_sending_it_again(life):
    first = life.refund(life.paid.id, "4.00", reason="broken")
    again = life.refund(life.paid.id, "4.00", reason="broken")
    assert again.id == first.id and again.replayed and not first.replayed
    assert len(life.provider.refund_calls) == 1
    assert ceiling(life) == (400, 400)


def test_the_same_key_with_another_body_is_refused(life):
    life.refund(life.paid.id, "4.00")
    with pytest.raises(IdempotencyKeyReused):
        life.refund(life.paid.id, "5.00")
    assert len(life.provider.refund_calls) == 1


def test_a_lost_answer_is_unknown_keeps_its_reservation_and_a_retry_refunds_once(life):
    life.provider.refund_script.extend([LOST_ANSWER])
    with pytest.raises(PaymentOutcomeUnknown) as unknown:
        life.refund(life.paid.id, "6.00")
    assert unknown.value.refund.status == RefundState.UNKNOWN
    assert ceiling(life) == (600, 0)  # held: the money may be moving
    with pytest.raises(RefundNotAllowed):
        life.refund(life.paid.id, "5.00", key="other")  # only 4.00 is left meanwhile

    retried = life.refund(life.paid.id, "6.00")
    assert retried.status == RefundState.SUCCEEDED and retried.id == unknown.value.refund.id
    assert len(life.provider.refunds[retried.id]) == 1  # the provider replayed our key
    assert ceiling(life) == (600, 600)


@pytest.mark.parametrize("step", [UNAVAILABLE, REJECT])
def test_a_refund_the_provider_never_saw_gives_its_reservation_back(life, step):
    life.provider.refund_script.extend([step])
    with pytest.raises(PaymentServiceUnavailable if step == UNAVAILABLE else PaymentProviderError):
        life.refund(life.paid.id, "6.00")
    assert life.stored_refund().status == RefundState.FAILED
    assert ceiling(life) == (0, 0)
    # Re-submitting under the same key takes the amount again and sends it.
    assert life.refund(life.paid.id, "6.00").status == RefundState.SUCCEEDED
    assert ceiling(life) == (600, 600)


def test_a_resubmission_that_no_longer_fits_is_refused(life):
    life.provider.refund_script.extend([UNAVAILABLE])
    with pytest.raises(PaymentServiceUnavailable):
        life.refund(life.paid.id, "6.00")
    life.refund(life.paid.id, "5.00", key="other")
    with pytest.raises(RefundNotAllowed):
        life.refund(life.paid.id, "6.00")
    assert life.stored_refund().status == RefundState.FAILED
    assert ceiling(life) == (500, 500)


def test_a_declined_refund_is_failed_and_releases_its_reservation(life):
    life.provider.refund_script.extend([DECLINE])
    with pytest.raises(RefundDeclined) as declined:
        life.refund(life.paid.id, "6.00")
    assert declined.value.refund.status == RefundState.FAILED
    assert ceiling(life) == (0, 0)
    with pytest.raises(RefundDeclined):  # replayed as it was, not re-sent
        life.refund(life.paid.id, "6.00")
    assert len(life.provider.refund_calls) == 1


def test_a_pending_refund_holds_its_amount_until_reconciliation_settles_it(life, fake_clock):
    life.provider.refund_script.extend([PENDING])
    pending = life.refund(life.paid.id, "6.00")
    assert pending.status == RefundState.PENDING and ceiling(life) == (600, 0)
    assert pending.provider_refund_id == "re_000001"  # kept: looked up by id later
    with pytest.raises(PaymentInProgress):
        life.refund(life.paid.id, "6.00")

    life.provider.settle_refund(pending.id, RefundStatus.SUCCEEDED)
    fake_clock.advance(3600)
    report = life.service.refunds.reconcile(older_than_seconds=60)
    assert (report.examined, report.succeeded) == (1, 1)
    assert life.stored_refund().status == RefundState.SUCCEEDED
    assert ceiling(life) == (600, 600)


def test_reconciliation_settles_an_unknown_refund_the_provider_made(life, fake_clock):
    life.provider.refund_script.extend([LOST_ANSWER])
    with pytest.raises(PaymentOutcomeUnknown):
        life.refund(life.paid.id, "6.00")
    fake_clock.advance(120)
    report = life.service.refunds.reconcile(older_than_seconds=60)
    assert (report.examined, report.succeeded) == (1, 1)
    assert life.stored_refund().provider_refund_id == "re_000001"
    assert ceiling(life) == (600, 600)


def test_reconciliation_fails_an_unknown_refund_the_provider_never_saw(life, fake_clock):
    life.provider.refund_script.extend([NO_ANSWER])
    with pytest.raises(PaymentOutcomeUnknown):
        life.refund(life.paid.id, "6.00")
    fake_clock.advance(120)
    report = life.service.refunds.reconcile(older_than_seconds=60)
    assert (report.examined, report.failed) == (1, 1)
    assert life.stored_refund().failure_code == "not_received"
    assert ceiling(life) == (0, 0)


def test_while_the_breaker_is_open_a_new_refund_is_refused_and_nothing_is_stored(life):
    life.open_breaker()
    with pytest.raises(PaymentServiceUnavailable):
        life.refund(life.paid.id, "6.00")
    assert life.refund_store.refunds == {} and ceiling(life) == (0, 0)


def test_while_the_breaker_is_open_an_unknown_refund_stays_unknown(life):
    life.provider.refund_script.extend([NO_ANSWER])
    with pytest.raises(PaymentOutcomeUnknown):
        life.refund(life.paid.id, "6.00")
    life.open_breaker()
    with pytest.raises(PaymentOutcomeUnknown):
        life.refund(life.paid.id, "6.00")
    assert life.stored_refund().status == RefundState.UNKNOWN and ceiling(life) == (600, 0)


def test_an_unknown_refund_resubmitted_without_an_answer_stays_unknown(life):
    life.provider.refund_script.extend([NO_ANSWER, UNAVAILABLE])
    with pytest.raises(PaymentOutcomeUnknown):
        life.refund(life.paid.id, "6.00")
    with pytest.raises(PaymentOutcomeUnknown):  # never "not refunded": the first may have
        life.refund(life.paid.id, "6.00")
    assert life.stored_refund().status == RefundState.UNKNOWN and ceiling(life) == (600, 0)


def test_a_refund_reversed_by_the_provider_gives_its_amount_back(life):
    refund = life.refund(life.paid.id, "6.00")
    stored = life.refund_store.find_refund(refund.id)
    reversed_ = life.refund_store.transition_refund(
        stored, RefundChange(RefundState.FAILED, "refund.failed", failure_code="refund_failed")
    )
    assert reversed_.status == RefundState.FAILED and ceiling(life) == (0, 0)


def test_the_provider_gets_the_refund_id_as_its_key_not_the_callers(life):
    """Callers reuse one order number for a payment and its refunds; providers keep one
    key space across endpoints, so the caller's key would collide with the charge's."""
    refund = life.refund(life.paid.id, "1.00", key="order-1")  # the payment's own key
    assert refund.status == RefundState.SUCCEEDED
    (sent,) = life.provider.refund_calls
    assert sent.idempotency_key == refund.id != "order-1"


def test_refunding_the_rest_when_nothing_is_left_says_so(life):
    life.refund(life.paid.id, key="all")
    with pytest.raises(RefundNotAllowed) as refused:
        life.refund(life.paid.id, key="again")
    assert refused.value.message == "nothing is left to refund on this payment (0.00 USD)"
    assert refused.value.http_status == 422
