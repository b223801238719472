"""The ``PaymentStore`` contract as tests, run against every store.

A test module imports these and provides a ``contract`` fixture giving a fresh, empty
store and the ``FakeClock`` its ``clock`` reads (seconds after :data:`EPOCH`):
``tests/unit/test_memory_store.py`` (the fake the lifecycle tests use) and
``tests/integration/test_payment_store_contract.py`` (PostgreSQL and SQLite), so the
fake cannot drift from the real thing.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from connection_pool import READ, Attempt
from payment_states import PaymentStatus
from payment_store import LOOKUP, Change, NewPayment, ReconcileClaim

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
P, S, F, U = (
    PaymentStatus.PENDING,
    PaymentStatus.SUCCEEDED,
    PaymentStatus.FAILED,
    PaymentStatus.UNKNOWN,
)


def wall(clock):
    return lambda: EPOCH + timedelta(seconds=clock.now)


def new_payment(key: str | None = None) -> NewPayment:
    key = key or f"order-{uuid.uuid4().hex}"
    return NewPayment(
        id=f"pay_{uuid.uuid4().hex[:24]}",
        idempotency_key=key,
        transaction_id=key,
        fingerprint="f" * 64,
        amount_minor=1234,
        currency="USD",
        payment_method="card",
        description="Order",
        metadata={"cart": "c-1"},
    )


def attempt(number: int = 1) -> Attempt:
    return Attempt(
        number=number,
        started_at=EPOCH,
        duration=0.5,
        error="read: ReadTimeoutError: timed out",
        error_kind=READ,
        timeout=0.5,
    )


def claim(clock, *, older_than=0.0, after=None, limit=10, lease=60.0) -> ReconcileClaim:
    now = EPOCH + timedelta(seconds=clock.now)
    return ReconcileClaim(
        unknown_before=now - timedelta(seconds=older_than),
        pending_before=now - timedelta(seconds=older_than),
        lease_until=now + timedelta(seconds=lease),
        limit=limit,
        after=after,
    )


def test_a_new_payment_is_pending_at_version_zero(contract):
    store, _ = contract
    payment, created = store.insert_pending(new_payment())
    assert created and (payment.status, payment.version, payment.attempts) == (P, 0, 0)
    assert store.find_by_id(payment.id) == payment
    assert store.find_by_key(payment.idempotency_key) == payment


def test_a_taken_key_returns_the_existing_payment(contract):
    store, _ = contract
    first, _ = store.insert_pending(new_payment("order-same"))
    again, created = store.insert_pending(new_payment("order-same"))
    assert not created and again == first


def test_a_change_bumps_the_version_and_applies_once(contract):
    store, clock = contract
    payment, _ = store.insert_pending(new_payment())
    clock.advance(5)
    settled = store.transition(
        payment, Change(S, "charged", attempts=[attempt()], provider_charge_id="ch_1")
    )
    assert (settled.status, settled.version, settled.attempts) == (S, 1, 1)
    assert settled.provider_charge_id == "ch_1"
    assert settled.updated_at == EPOCH + timedelta(seconds=clock.now)
    # The same read again: the payment changed since, so nothing is written ...
    assert store.transition(payment, Change(F, "late", attempts=[attempt()])) is None
    # ... except the attempts, which happened; the version stays the newer one.
    current = store.find_by_id(payment.id)
    assert (current.attempts, current.status, current.version) == (2, S, 1)


def test_a_change_replaces_the_failure_and_keeps_a_known_charge_id(contract):
    store, _ = contract
    payment, _ = store.insert_pending(new_payment())
    failed = store.transition(
        payment,
        Change(F, "declined", provider_charge_id="ch_9", failure_code="card_declined",
               failure_message="no"),
    )  # fmt: skip
    assert (failed.failure_code, failed.failure_message) == ("card_declined", "no")
    retried = store.transition(failed, Change(P, "resubmitted"))
    assert (retried.failure_code, retried.failure_message) == (None, None)
    assert retried.provider_charge_id == "ch_9" and retried.version == 2


def test_attempts_of_a_charge_count_and_of_a_lookup_do_not(contract):
    store, _ = contract
    payment, _ = store.insert_pending(new_payment())
    counted = store.record_attempts(payment.id, [attempt(1), attempt(2)], "charge")
    assert counted.attempts == 2 and counted.version == 0
    assert store.record_attempts(payment.id, [attempt(3)], LOOKUP) is None
    settled = store.transition(counted, Change(U, "outcome_unknown", attempts=[attempt()],
                                               attempt_kind=LOOKUP))  # fmt: skip
    assert settled.attempts == 2


def test_a_claim_takes_due_payments_oldest_first_and_leases_them(contract):
    store, clock = contract
    payments = []
    for _ in range(3):
        payment, _ = store.insert_pending(new_payment())
        payments.append(store.transition(payment, Change(U, "outcome_unknown")))
        clock.advance(1)
    assert store.claim_for_reconciliation(claim(clock, older_than=10)) == []
    batch = store.claim_for_reconciliation(claim(clock, limit=2))
    assert [p.id for p in batch] == [p.id for p in payments[:2]]
    rest = store.claim_for_reconciliation(claim(clock))
    assert [p.id for p in rest] == [payments[2].id]  # the first two are leased
    store.release([payments[0].id])
    again = store.claim_for_reconciliation(claim(clock))
    assert [p.id for p in again] == [payments[0].id]


def test_a_claim_continues_after_the_previous_batch_even_when_leases_expired(contract):
    store, clock = contract
    ids = []
    for _ in range(3):
        payment, _ = store.insert_pending(new_payment())
        ids.append(store.transition(payment, Change(U, "outcome_unknown")).id)
        clock.advance(1)
    first = store.claim_for_reconciliation(claim(clock, limit=2, lease=1))
    clock.advance(100)  # the leases of the first batch have expired
    after = (first[-1].updated_at, first[-1].id)
    second = store.claim_for_reconciliation(claim(clock, limit=2, after=after))
    assert [p.id for p in first + second] == ids


def test_a_settled_payment_is_never_claimed(contract):
    store, clock = contract
    payment, _ = store.insert_pending(new_payment())
    store.transition(payment, Change(S, "charged"))
    clock.advance(100)
    assert store.claim_for_reconciliation(claim(clock)) == []


def test_a_change_frees_the_lease(contract):
    store, clock = contract
    payment, _ = store.insert_pending(new_payment())
    unknown = store.transition(payment, Change(U, "outcome_unknown"))
    clock.advance(1)
    (leased,) = store.claim_for_reconciliation(claim(clock, lease=1000))
    pending = store.transition(leased, Change(P, "resubmitted"))
    again = store.transition(pending, Change(U, "outcome_unknown"))
    clock.advance(1)
    assert [p.id for p in store.claim_for_reconciliation(claim(clock))] == [unknown.id]
    assert again.version == 3
