"""The payment lifecycle (DESIGN.md section 4) with an in-memory store and a scripted provider.

No process, no socket, no real sleep: the real ``PaymentService`` and ``PaymentClient``
(breaker, bulkhead, the money rule) over fakes of what they are given.
"""

from __future__ import annotations

import pytest

from errors import (
    DatabaseUnavailable,
    IdempotencyKeyReused,
    PaymentDeclined,
    PaymentInProgress,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
)
from payment_states import PaymentStatus
from payment_store import Change
from providers.base import ChargeStatus
from tests.support.scripted_provider import (
    DECLINE,
    LOST_ANSWER,
    NO_ANSWER,
    PENDING,
    REJECT,
    SUCCEED,
    UNAVAILABLE,
)
from tests.unit.lifecycle import build_lifecycle


@pytest.fixture
def settings(make_settings):
    return make_settings(payment_breaker_failures=3, payment_breaker_reset=30)


@pytest.fixture
def lifecycle(settings, fake_clock):
    def build(*steps):
        return build_lifecycle(settings, fake_clock, *steps)

    return build


def test_a_payment_is_stored_pending_then_succeeded_with_one_charge(lifecycle):
    life = lifecycle(SUCCEED)
    result = life.pay("25.99", "order-1")
    assert result.status == PaymentStatus.SUCCEEDED and result.amount_minor == 2599
    assert result.provider_charge_id == "ch_000001" and not result.replayed
    assert life.store.events_of(result.id) == [
        (None, "pending", "created"),
        ("pending", "succeeded", "charged"),
    ]
    assert life.provider.charged("order-1") == 1


def test_the_provider_gets_minor_units_and_the_stored_key(lifecycle):
    life = lifecycle(SUCCEED)
    life.pay("1500", "order-jpy", currency="JPY")
    (request,) = life.provider.charge_calls
    assert (request.amount_minor, request.currency) == (1500, "JPY")
    assert request.idempotency_key == "order-jpy"
    assert request.payment_id == life.stored("order-jpy").id


def test_the_same_key_replays_the_payment_without_a_provider_call(lifecycle):
    life = lifecycle(SUCCEED)
    first = life.pay()
    again = life.pay()
    assert again.id == first.id and again.replayed
    assert len(life.provider.charge_calls) == 1


def test_the_same_key_with_another_amount_is_refused(lifecycle):
    life = lifecycle(SUCCEED)
    life.pay("10.00")
    with pytest.raises(IdempotencyKeyReused):
        life.pay("10.01")
    assert len(life.provider.charge_calls) == 1


def test_a_key_still_pending_is_a_conflict_not_a_second_charge(lifecycle):
    life = lifecycle(PENDING)
    assert life.pay().status == PaymentStatus.PENDING
    with pytest.raises(PaymentInProgress):
        life.pay()
    assert len(life.provider.charge_calls) == 1


def test_a_provider_pending_answer_keeps_the_payment_pending_and_counts_the_attempt(lifecycle):
    life = lifecycle(PENDING)
    result = life.pay()
    assert result.status == PaymentStatus.PENDING
    assert life.store.events_of(result.id) == [(None, "pending", "created")]


def test_a_decline_is_stored_failed_and_replayed_without_a_call(lifecycle):
    life = lifecycle(DECLINE)
    with pytest.raises(PaymentDeclined) as first:
        life.pay()
    assert first.value.payment.status == PaymentStatus.FAILED
    assert life.stored().failure_code == "card_declined"
    with pytest.raises(PaymentDeclined) as again:
        life.pay()
    assert again.value.payment.id == first.value.payment.id and again.value.payment.replayed
    assert len(life.provider.charge_calls) == 1


def test_a_payment_the_provider_never_saw_fails_and_is_resubmitted_on_retry(lifecycle):
    life = lifecycle(UNAVAILABLE, SUCCEED)
    with pytest.raises(PaymentServiceUnavailable):
        life.pay()
    assert life.stored().failure_code == "provider_unavailable"
    result = life.pay()
    assert result.status == PaymentStatus.SUCCEEDED and not result.replayed
    assert life.store.events_of(result.id)[1:] == [
        ("pending", "failed", "provider_unavailable"),
        ("failed", "pending", "resubmitted"),
        ("pending", "succeeded", "charged"),
    ]
    assert life.provider.charged("order-1") == 1


def test_an_unknown_payment_retried_is_resubmitted_and_charged_once(lifecycle):
    life = lifecycle(LOST_ANSWER, SUCCEED)
    with pytest.raises(PaymentOutcomeUnknown) as info:
        life.pay()
    assert info.value.payment.status == PaymentStatus.UNKNOWN
    result = life.pay()
    assert result.status == PaymentStatus.SUCCEEDED
    assert life.provider.charged("order-1") == 1
    assert len(life.provider.charge_calls) == 2


@pytest.mark.parametrize(
    ("step", "error"),
    [(UNAVAILABLE, "provider_unavailable"), (REJECT, "provider_rejected_request")],
)
def test_an_unknown_payment_resubmitted_without_a_definitive_answer_stays_unknown(
    lifecycle, step, error
):
    """The first call may have charged: "not charged" now would be a lie about it."""
    life = lifecycle(LOST_ANSWER, step)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    with pytest.raises(PaymentOutcomeUnknown) as info:
        life.pay()
    assert error in info.value.message
    stored = life.stored()
    assert stored.status == PaymentStatus.UNKNOWN and stored.failure_code is None
    assert life.provider.charged("order-1") == 1  # the first call did charge


def test_an_unknown_payment_resubmitted_and_declined_is_failed(lifecycle):
    life = lifecycle(NO_ANSWER, DECLINE)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    with pytest.raises(PaymentDeclined):
        life.pay()
    assert life.stored().status == PaymentStatus.FAILED


def test_an_unknown_payment_is_replayed_as_unknown_while_the_breaker_is_open(lifecycle):
    life = lifecycle(LOST_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    life.open_breaker()
    with pytest.raises(PaymentOutcomeUnknown) as info:
        life.pay()
    assert "not re-submitted" in info.value.message
    assert info.value.payment.status == PaymentStatus.UNKNOWN and info.value.payment.replayed
    assert life.stored().status == PaymentStatus.UNKNOWN
    assert len(life.provider.charge_calls) == 1


def test_an_unknown_payment_is_replayed_as_unknown_while_the_bulkhead_is_saturated(
    lifecycle, fake_clock
):
    life = lifecycle(LOST_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    bulkhead = life.service.client.bulkhead
    held = [bulkhead.enter() for _ in range(bulkhead.size)]
    fake_clock.advance(bulkhead.patience + 1)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    assert life.stored().status == PaymentStatus.UNKNOWN
    for token in held:
        bulkhead.leave(token)


def test_a_failure_the_provider_never_saw_is_not_resubmitted_while_the_breaker_is_open(
    lifecycle,
):
    life = lifecycle(UNAVAILABLE)
    with pytest.raises(PaymentServiceUnavailable):
        life.pay()
    life.open_breaker()
    with pytest.raises(PaymentServiceUnavailable) as info:
        life.pay()
    assert info.value.code == "breaker_open" and info.value.payment.replayed
    assert life.stored().failure_code == "provider_unavailable"
    assert len(life.provider.charge_calls) == 1


def test_a_new_key_is_refused_before_it_is_stored_while_the_breaker_is_open(lifecycle):
    life = lifecycle()
    life.open_breaker()
    with pytest.raises(PaymentServiceUnavailable) as info:
        life.pay()
    assert info.value.code == "breaker_open"
    assert life.stored() is None and life.provider.charge_calls == []


def test_a_resubmission_that_loses_the_claim_is_a_conflict(lifecycle):
    life = lifecycle(UNAVAILABLE)
    with pytest.raises(PaymentServiceUnavailable):
        life.pay()

    def another_caller_claims_it():
        stored = life.stored()
        life.store.transition(stored, Change(PaymentStatus.PENDING, "resubmitted"))

    life.store.before["transition"] = another_caller_claims_it
    with pytest.raises(PaymentInProgress):
        life.pay()
    assert len(life.provider.charge_calls) == 1


def test_an_outcome_is_stored_after_the_database_blips(lifecycle, fake_clock):
    life = lifecycle(SUCCEED)
    life.store.fail_next("transition", 2)
    result = life.pay()
    assert result.status == PaymentStatus.SUCCEEDED
    assert fake_clock.sleeps == [0.1, 0.2]


def test_an_outcome_that_cannot_be_stored_leaves_the_payment_pending_and_unknown_to_the_caller(
    lifecycle,
):
    life = lifecycle(SUCCEED)
    life.store.fail_next("transition", 4)
    with pytest.raises(PaymentOutcomeUnknown) as info:
        life.pay()
    assert info.value.code == "outcome_not_stored"
    assert life.stored().status == PaymentStatus.PENDING
    assert life.provider.charged("order-1") == 1


def test_a_database_down_before_the_charge_charges_nothing(lifecycle):
    life = lifecycle(SUCCEED)
    life.store.fail_next("insert_pending")
    with pytest.raises(DatabaseUnavailable):
        life.pay()
    assert life.provider.charge_calls == []


def test_a_charge_that_lands_after_a_not_received_verdict_is_recorded_as_succeeded(lifecycle):
    life = lifecycle(SUCCEED)

    def reconciler_finds_nothing():
        stored = life.stored()
        life.store.transition(
            stored,
            Change(PaymentStatus.FAILED, "reconciled", failure_code="not_received"),
        )

    life.store.before["transition"] = reconciler_finds_nothing
    result = life.pay()
    assert result.status == PaymentStatus.SUCCEEDED
    assert life.store.events_of(result.id)[-1] == (
        "failed",
        "succeeded",
        "charge_landed_after_reconciliation",
    )


def test_a_bug_after_the_request_may_have_gone_out_leaves_the_payment_unknown(lifecycle):
    life = lifecycle()

    def explode(transport, request):
        raise KeyError("a bug")

    life.provider.charge = explode
    with pytest.raises(KeyError):
        life.pay()
    assert life.stored().status == PaymentStatus.UNKNOWN


def test_a_provider_rejection_is_failed_and_resubmittable(lifecycle):
    life = lifecycle(REJECT, SUCCEED)
    with pytest.raises(PaymentProviderError):
        life.pay()
    assert life.stored().failure_code == "provider_rejected_request"
    assert life.pay().status == PaymentStatus.SUCCEEDED


def test_a_charge_for_another_amount_is_unknown_not_success(lifecycle):
    life = lifecycle()

    def wrong_amount(transport, request):
        from providers.base import ProviderCharge

        return ProviderCharge("ch_x", ChargeStatus.SUCCEEDED, request.amount_minor + 1, "USD")

    life.provider.charge = wrong_amount
    with pytest.raises(PaymentOutcomeUnknown) as info:
        life.pay()
    assert info.value.code == "provider_amount_mismatch"
    assert life.stored().status == PaymentStatus.UNKNOWN


def test_a_pending_payment_keeps_the_charge_id_so_it_is_looked_up_by_id(lifecycle):
    life = lifecycle(PENDING)
    result = life.pay()
    assert result.status == PaymentStatus.PENDING and result.provider_charge_id == "ch_000001"
    assert life.stored().provider_charge_id == "ch_000001"
