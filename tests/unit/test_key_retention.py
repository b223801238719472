"""Idempotency keys the provider forgets (``PAYMENT_KEY_RETENTION``, DESIGN.md section 4).

Stripe forgets a key after 24 hours: a re-submission under it could then charge again.
So an ``unknown`` (or unreached) payment older than that is looked up first and
re-submitted only when the provider certainly holds no charge for it.
"""

from __future__ import annotations

import logging

import pytest

import metrics
from errors import (
    InvalidPaymentRequest,
    PaymentDeclined,
    PaymentInProgress,
    PaymentOutcomeUnknown,
    PaymentServiceUnavailable,
)
from payment_states import PaymentStatus
from providers.base import ChargeStatus, ProviderCharge
from tests.support.scripted_provider import LOST_ANSWER, NO_ANSWER, UNAVAILABLE
from tests.unit.lifecycle import build_lifecycle

DAY = 24 * 3600


@pytest.fixture
def settings(make_settings):
    return make_settings(payment_key_retention=24.0)


@pytest.fixture
def lifecycle(settings, fake_clock):
    def build(*steps):
        return build_lifecycle(settings, fake_clock, *steps)

    return build


def test_a_day_old_unknown_payment_the_provider_charged_is_settled_without_a_charge(
    lifecycle, fake_clock
):
    life = lifecycle(LOST_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    fake_clock.advance(DAY + 1)
    result = life.pay()
    assert result.status == PaymentStatus.SUCCEEDED and result.replayed
    assert len(life.provider.charge_calls) == 1  # looked up, never re-sent
    assert len(life.provider.lookups) == 1


def test_a_day_old_unknown_payment_the_provider_never_saw_is_resubmitted(lifecycle, fake_clock):
    life = lifecycle(NO_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    fake_clock.advance(DAY + 1)
    assert life.pay().status == PaymentStatus.SUCCEEDED
    assert len(life.provider.lookups) == 1 and len(life.provider.charge_calls) == 2
    assert life.provider.charged("order-1") == 1


def test_a_day_old_payment_the_provider_declined_is_replayed_as_declined(lifecycle, fake_clock):
    life = lifecycle(NO_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    life.provider.ledger["order-1"] = [ProviderCharge("ch_x", ChargeStatus.FAILED, 1000, "USD")]
    fake_clock.advance(DAY + 1)
    with pytest.raises(PaymentDeclined):
        life.pay()
    assert len(life.provider.charge_calls) == 1


def test_a_day_old_payment_still_processing_at_the_provider_is_in_progress(lifecycle, fake_clock):
    life = lifecycle(NO_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    life.provider.ledger["order-1"] = [ProviderCharge("ch_x", ChargeStatus.PENDING, 1000, "USD")]
    fake_clock.advance(DAY + 1)
    with pytest.raises(PaymentInProgress):
        life.pay()
    assert life.stored().status == PaymentStatus.UNKNOWN


def test_when_the_lookup_fails_the_old_payment_is_not_resubmitted(lifecycle, fake_clock):
    life = lifecycle(NO_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    fake_clock.advance(DAY + 1)

    def unavailable(lookup):
        raise PaymentServiceUnavailable("provider lookup failed")

    life.provider.on_lookup = unavailable
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    assert len(life.provider.charge_calls) == 1
    assert life.stored().status == PaymentStatus.UNKNOWN


def test_an_unreached_payment_older_than_the_retention_is_looked_up_too(lifecycle, fake_clock):
    life = lifecycle(UNAVAILABLE)
    with pytest.raises(PaymentServiceUnavailable):
        life.pay()
    fake_clock.advance(DAY + 1)
    assert life.pay().status == PaymentStatus.SUCCEEDED
    assert len(life.provider.lookups) == 1


def test_within_the_retention_a_resubmission_needs_no_lookup(lifecycle, fake_clock):
    life = lifecycle(NO_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    fake_clock.advance(DAY - 60)
    assert life.pay().status == PaymentStatus.SUCCEEDED
    assert life.provider.lookups == []


def test_the_sandbox_keeps_keys_forever(make_settings, fake_clock):
    life = build_lifecycle(make_settings(), fake_clock, NO_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    fake_clock.advance(30 * DAY)
    assert life.pay().status == PaymentStatus.SUCCEEDED
    assert life.provider.lookups == []


def test_an_unknown_payment_nearing_the_retention_is_logged_and_counted(
    lifecycle, fake_clock, caplog
):
    life = lifecycle(NO_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    life.provider.on_lookup = lambda lookup: [
        ProviderCharge("ch_x", ChargeStatus.PENDING, 1000, "USD")
    ]
    before = metrics.UNKNOWN_NEAR_KEY_EXPIRY._value.get()
    fake_clock.advance(19 * 3600)
    with caplog.at_level(logging.ERROR, logger="payment_handler"):
        life.service.reconcile(older_than_seconds=60)
    assert metrics.UNKNOWN_NEAR_KEY_EXPIRY._value.get() == before + 1
    assert any("forgets its idempotency key" in r.getMessage() for r in caplog.records)


def test_a_payment_the_provider_can_never_take_is_refused_before_it_is_stored(lifecycle):
    life = lifecycle()

    def refuse(request):
        raise InvalidPaymentRequest("payment_method must be a PaymentMethod id (pm_...)")

    life.provider.check_charge = refuse
    with pytest.raises(InvalidPaymentRequest):
        life.pay()
    assert life.store.payments == {} and life.provider.charge_calls == []


def test_a_request_in_progress_at_the_provider_leaves_the_payment_unknown(lifecycle):
    life = lifecycle()

    def in_progress(transport, request):
        raise PaymentInProgress("a request with this key is in progress at the provider")

    life.provider.charge = in_progress
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    assert life.stored().status == PaymentStatus.UNKNOWN
