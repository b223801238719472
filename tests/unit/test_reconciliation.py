"""reconcile_payments with an in-memory store, a scripted provider and a fake clock."""

from __future__ import annotations

import pytest

from errors import PaymentInProgress, PaymentOutcomeUnknown, PaymentServiceUnavailable
from payment_states import PaymentStatus
from providers.base import ChargeStatus, ProviderCharge
from tests.support.scripted_provider import LOST_ANSWER, NO_ANSWER, PENDING
from tests.unit.lifecycle import build_lifecycle


@pytest.fixture
def settings(make_settings):
    return make_settings(payment_breaker_failures=3, payment_deadline=15.0, db_pool_timeout=5.0)


@pytest.fixture
def lifecycle(settings, fake_clock):
    def build(*steps):
        return build_lifecycle(settings, fake_clock, *steps)

    return build


def make_unknown(life, *keys):
    """Payments whose charge request got no answer (the provider has none for them)."""
    for key in keys:
        life.provider.script.append(NO_ANSWER)
        with pytest.raises(PaymentOutcomeUnknown):
            life.pay(key=key)
        life.breaker.record_success()  # keep the breaker closed for the next one


def test_an_unknown_payment_the_provider_charged_is_settled_succeeded(lifecycle, fake_clock):
    life = lifecycle(LOST_ANSWER)
    with pytest.raises(PaymentOutcomeUnknown):
        life.pay()
    fake_clock.advance(61)
    report = life.service.reconcile(60)
    assert (report.examined, report.succeeded) == (1, 1)
    stored = life.stored()
    assert stored.status == PaymentStatus.SUCCEEDED and stored.provider_charge_id == "ch_000001"
    assert len(life.store.attempts_of(stored.id, "lookup")) == 0  # the scripted lookup sends none


def test_an_unknown_payment_the_provider_never_saw_is_failed_not_received(lifecycle, fake_clock):
    life = lifecycle()
    make_unknown(life, "order-1")
    fake_clock.advance(1)
    report = life.service.reconcile(0)
    assert report.failed == 1
    assert life.stored().failure_code == "not_received"


def test_payments_younger_than_the_threshold_are_left_alone(lifecycle, fake_clock):
    life = lifecycle()
    make_unknown(life, "order-1")
    fake_clock.advance(30)
    assert life.service.reconcile(60).examined == 0
    assert life.stored().status == PaymentStatus.UNKNOWN


def test_a_pending_payment_the_provider_settled_is_settled_at_once(lifecycle, fake_clock):
    """A final answer settles a payment whatever its age, even inside its in-flight window."""
    life = lifecycle(PENDING)
    life.pay()
    fake_clock.advance(1)
    report = life.service.reconcile(0)
    assert (report.examined, report.still_pending) == (1, 1)  # still processing there
    life.provider.settle("order-1", ChargeStatus.SUCCEEDED)
    fake_clock.advance(400)  # past the lease the previous run left on it
    assert life.service.reconcile(0).succeeded == 1


def test_never_seen_settles_a_pending_payment_only_once_it_cannot_be_in_flight(
    lifecycle, fake_clock
):
    """PAYMENT_DEADLINE 15 + DB_POOL_TIMEOUT 5 + 1 = 21 s, even with --older-than 0."""
    life = lifecycle(PENDING)
    life.pay()
    life.provider.ledger.clear()  # as if the charge had not reached the provider yet
    fake_clock.advance(20)
    report = life.service.reconcile(0)
    assert (report.examined, report.still_pending, report.failed) == (1, 1, 0)
    assert life.stored().status == PaymentStatus.PENDING
    fake_clock.advance(2)  # its lease was given back: the next run looks again
    report = life.service.reconcile(0)
    assert report.failed == 1 and life.stored().failure_code == "not_received"


def test_a_call_meanwhile_is_told_when_the_payment_can_be_resubmitted(lifecycle, fake_clock):
    life = lifecycle(PENDING)
    life.pay()
    fake_clock.advance(5)
    with pytest.raises(PaymentInProgress) as in_progress:
        life.pay()
    assert in_progress.value.retry_after == pytest.approx(16)


def test_a_verdict_about_an_older_version_is_discarded(lifecycle, fake_clock):
    """Looked up as "never seen"; meanwhile a retry re-submitted it (unknown -> pending ->
    charged, answer lost -> unknown). The stale verdict must not make it not_received."""
    life = lifecycle()
    make_unknown(life, "order-1")
    fake_clock.advance(1)

    def lookup_while_the_client_retries(lookup):
        seen = list(life.provider.ledger.get(lookup.idempotency_key, []))
        life.provider.script.append(LOST_ANSWER)
        with pytest.raises(PaymentOutcomeUnknown):
            life.pay()
        return seen

    life.provider.on_lookup = lookup_while_the_client_retries
    report = life.service.reconcile(0)
    assert (report.skipped, report.failed) == (1, 0)
    assert life.stored().status == PaymentStatus.UNKNOWN
    assert life.provider.charged("order-1") == 1

    life.provider.on_lookup = None
    fake_clock.advance(400)
    assert life.service.reconcile(0).succeeded == 1  # the next run finds the charge


def test_one_bad_provider_record_does_not_stop_the_run(lifecycle, fake_clock):
    life = lifecycle()
    make_unknown(life, "a-bug", "b-bad-id", "c-long-code", "d-fine")
    fake_clock.advance(1)

    def lookup(lookup):
        key = lookup.idempotency_key
        if key == "a-bug":
            raise KeyError("a bug in a provider adapter")
        if key == "b-bad-id":
            return [ProviderCharge("x" * 300, ChargeStatus.SUCCEEDED)]  # cannot be stored
        if key == "c-long-code":
            return [ProviderCharge("ch_c", ChargeStatus.FAILED, failure_code="e" * 500)]
        return []

    life.provider.on_lookup = lookup
    report = life.service.reconcile(0)
    assert (report.examined, report.errors, report.failed) == (4, 2, 2)
    assert life.stored("a-bug").status == PaymentStatus.UNKNOWN
    assert life.stored("b-bad-id").status == PaymentStatus.UNKNOWN
    assert life.stored("c-long-code").failure_code == "e" * 64
    assert life.stored("d-fine").failure_code == "not_received"


def test_a_run_looks_each_payment_up_once_even_when_lookups_outlast_the_lease(
    lifecycle, fake_clock
):
    life = lifecycle()
    make_unknown(life, "order-a", "order-b", "order-c")
    fake_clock.advance(1)

    def slow_and_still_processing(lookup):
        if len(life.provider.lookups) > 10:
            raise AssertionError("the run does not end")
        fake_clock.advance(10_000)  # far beyond any lease
        return [ProviderCharge("ch_p", ChargeStatus.PENDING)]

    life.provider.on_lookup = slow_and_still_processing
    report = life.service.reconcile(0, batch_size=2)
    assert (report.examined, report.still_pending) == (3, 3)
    assert sorted(lookup.idempotency_key for lookup in life.provider.lookups) == [
        "order-a",
        "order-b",
        "order-c",
    ]


def test_the_run_stops_when_the_provider_becomes_unavailable(lifecycle, fake_clock):
    life = lifecycle()
    keys = [f"order-{n}" for n in range(5)]
    make_unknown(life, *keys)
    fake_clock.advance(1)

    def down(lookup):
        raise PaymentServiceUnavailable("payment provider unreachable: connection refused")

    life.provider.on_lookup = down
    report = life.service.reconcile(0)
    assert (report.errors, report.deferred) == (3, 2)  # the breaker opened after 3 failures
    assert len(life.provider.lookups) == 3
    looked_up = {lookup.idempotency_key for lookup in life.provider.lookups}
    deferred = [life.stored(key).id for key in keys if key not in looked_up]
    assert len(deferred) == 2 and not set(deferred) & set(life.store.leases)  # freed

    again = life.service.reconcile(0)  # the breaker is still open: no lookups at all
    assert again.examined == 0 and len(life.provider.lookups) == 3
