"""process_payment and reconcile_payments against a real PostgreSQL and the real sandbox."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

import database_config as db
from errors import (
    DatabaseUnavailable,
    IdempotencyKeyReused,
    InvalidPaymentRequest,
    PaymentDeclined,
    PaymentInProgress,
    PaymentOutcomeUnknown,
    PaymentServiceUnavailable,
)
from log_context import current_log_context
from payment_handler import process_payment, reconcile_payments
from payment_states import PaymentStatus

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def payments(pg_url, sandbox, configure_payments):
    """The library configured for PostgreSQL and the sandbox; returns a re-configurer."""

    def configure(**overrides):
        defaults = dict(
            database_url=pg_url,
            payment_api_url=sandbox.url,
            payment_backoff_factor=0.01,
            payment_connect_timeout=0.5,
        )
        return configure_payments(**{**defaults, **overrides})

    configure()
    return configure


def key() -> str:
    return f"order-{uuid.uuid4().hex}"


def row(payment_id):
    with db.transaction() as conn:
        return conn.execute(select(db.payments).where(db.payments.c.id == payment_id)).one()


def count(table, payment_id):
    with db.transaction() as conn:
        return conn.execute(
            select(func.count()).select_from(table).where(table.c.payment_id == payment_id)
        ).scalar_one()


def ledger_for(sandbox, idempotency_key):
    return [c for c in sandbox.ledger() if c["idempotency_key"] == idempotency_key]


class ContextCapture(logging.Handler):
    """Records each log message with the log context bound when it was emitted."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, dict]] = []

    def emit(self, record):
        self.seen.append((record.getMessage(), current_log_context()))


@pytest.fixture
def log_capture():
    handler = ContextCapture()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


def test_payment_succeeds_and_is_stored_with_its_audit_trail(payments, sandbox):
    tx = key()
    result = process_payment(25.99, "card", tx, description="Order 1", metadata={"order": 1})
    assert result.status == "succeeded"
    assert result.amount == Decimal("25.99") and result.currency == "USD"
    assert result.transaction_id == tx and result.attempts == 1
    assert result.provider_charge_id.startswith("ch_")
    stored = row(result.id)
    assert (stored.amount_minor, stored.status, stored.idempotency_key) == (2599, "succeeded", tx)
    assert count(db.payment_attempts, result.id) == 1
    assert count(db.payment_events, result.id) == 2  # created -> pending, pending -> succeeded
    (charge,) = ledger_for(sandbox, tx)
    assert charge["amount"] == 2599 and charge["id"] == result.provider_charge_id


def test_same_transaction_id_returns_the_same_payment_without_charging(payments, sandbox):
    tx = key()
    first = process_payment("10.00", transaction_id=tx)
    second = process_payment("10.00", transaction_id=tx)
    assert second.id == first.id and second.replayed and not first.replayed
    assert len(ledger_for(sandbox, tx)) == 1
    assert sandbox.state()["requests"]["POST /v1/charges"] == 1


def test_same_key_with_another_amount_is_refused(payments, sandbox):
    tx = key()
    process_payment("10.00", transaction_id=tx)
    with pytest.raises(IdempotencyKeyReused):
        process_payment("10.01", transaction_id=tx)
    assert len(ledger_for(sandbox, tx)) == 1


def test_declined_payment_is_stored_failed_and_replayed_without_a_call(payments, sandbox):
    tx = key()
    with pytest.raises(PaymentDeclined) as first:
        process_payment("5.00", "card_declined", tx)
    assert first.value.payment.status == "failed"
    assert row(first.value.payment.id).failure_code == "card_declined"
    with pytest.raises(PaymentDeclined) as again:
        process_payment("5.00", "card_declined", tx)
    assert again.value.payment.id == first.value.payment.id
    assert sandbox.state()["requests"]["POST /v1/charges"] == 1


def test_invalid_request_stores_and_sends_nothing(payments, sandbox):
    with db.transaction() as conn:
        before = conn.execute(select(func.count()).select_from(db.payments)).scalar_one()
    for bad in (0, -1, "abc", float("nan"), float("inf"), "1.001", 10**7, None, True):
        with pytest.raises(InvalidPaymentRequest):
            process_payment(bad, transaction_id=key())
    with pytest.raises(InvalidPaymentRequest):
        process_payment("1.5", transaction_id=key(), currency="JPY")
    with db.transaction() as conn:
        after = conn.execute(select(func.count()).select_from(db.payments)).scalar_one()
    assert after == before
    assert sandbox.state()["requests"].get("POST /v1/charges", 0) == 0


def test_no_connection_is_held_during_the_provider_call(payments, sandbox):
    """DB_POOL_SIZE=1, no overflow, provider 0.5 s: 8 concurrent payments take ~0.5 s."""
    payments(db_pool_size=1, db_max_overflow=0, payment_pool_maxsize=8)
    sandbox.set_faults(latency_ms=500)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: process_payment("1.00", transaction_id=key()), range(8)))
    elapsed = time.monotonic() - started
    assert [r.status for r in results] == ["succeeded"] * 8
    assert 0.5 <= elapsed < 1.5


def test_exhausted_pool_fails_fast_with_the_incident_text(payments, sandbox, caplog):
    payments(db_pool_size=1, db_max_overflow=0, db_pool_timeout=1.0)
    held = db.get_engine().connect()
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="pool exhausted"):
            process_payment("1.00", transaction_id=key())
        assert 0.9 <= time.monotonic() - started < 3
    finally:
        held.close()
    records = [
        r
        for r in caplog.records
        if r.getMessage() == "Database query failed: connection pool exhausted"
    ]
    assert records and records[0].levelname == "ERROR"
    assert records[0].pool["checked_out"] == 1
    assert sandbox.state()["requests"].get("POST /v1/charges", 0) == 0  # nothing charged


def test_terminated_backends_are_replaced_by_pre_ping(payments, pg_url):
    assert process_payment("1.00", transaction_id=key()).status == "succeeded"
    killer = create_engine(pg_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with killer.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'payment-service' AND datname = :db"
            ),
            {"db": pg_url.rsplit("/", 1)[1]},
        ).scalar_one()
    killer.dispose()
    assert killed >= 1
    assert process_payment("1.00", transaction_id=key()).status == "succeeded"


def test_database_down_is_database_unavailable_quickly(payments, sandbox, unused_port):
    payments(database_url=f"postgresql+psycopg2://postgres@127.0.0.1:{unused_port}/x")
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable):
        process_payment("1.00", transaction_id=key())
    assert time.monotonic() - started < 3
    assert sandbox.state()["requests"].get("POST /v1/charges", 0) == 0


def test_same_key_from_ten_threads_charges_once(payments, sandbox):
    sandbox.set_faults(latency_ms=300)
    tx = key()
    barrier = threading.Barrier(10)

    def pay():
        barrier.wait()
        try:
            return process_payment("7.00", transaction_id=tx).id
        except PaymentInProgress as exc:
            return ("conflict", exc.payment.id)

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(lambda _: pay(), range(10)))
    ids = {o[1] if isinstance(o, tuple) else o for o in outcomes}
    assert len(ids) == 1
    assert len(ledger_for(sandbox, tx)) == 1
    with db.transaction() as conn:
        rows = conn.execute(
            select(func.count()).select_from(db.payments).where(db.payments.c.transaction_id == tx)
        ).scalar_one()
    assert rows == 1


def test_same_key_from_two_processes_charges_once(payments, sandbox, pg_url):
    sandbox.set_faults(latency_ms=300)
    tx = key()
    script = (
        "import os, settings, payment_handler as ph\n"
        "from errors import PaymentInProgress\n"
        "try:\n"
        f"    print(ph.process_payment('8.00', transaction_id={tx!r}).id)\n"
        "except PaymentInProgress as exc:\n"
        "    print('conflict', exc.payment.id)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": pg_url,
        "PAYMENT_API_URL": sandbox.url,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=30)[0].split()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1]
    assert len(ledger_for(sandbox, tx)) == 1


def test_read_timeout_is_unknown_then_reconciled_to_succeeded(payments, sandbox, log_capture):
    payments(payment_read_timeout=0.3, payment_deadline=1.0, payment_max_retries=0)
    sandbox.set_faults(hang_after_commit=True)  # the money moves, the answer never comes
    tx = key()
    with pytest.raises(PaymentOutcomeUnknown) as info:
        process_payment("12.34", transaction_id=tx)
    payment = info.value.payment
    assert payment.status == "unknown" and row(payment.id).status == "unknown"
    timeouts = [
        ctx
        for msg, ctx in log_capture.seen
        if msg == "Payment service connection failed - timeout after 300ms"
    ]
    assert timeouts and timeouts[0]["payment_id"] == payment.id
    assert timeouts[0]["transaction_id"] == tx

    sandbox.set_faults()
    report = reconcile_payments(older_than_seconds=0)
    assert report.succeeded >= 1
    settled = row(payment.id)
    assert settled.status == "succeeded"
    assert settled.provider_charge_id == ledger_for(sandbox, tx)[0]["id"]


def test_key_the_provider_never_saw_is_reconciled_to_not_received(payments, sandbox):
    payments(payment_read_timeout=0.3, payment_deadline=1.0, payment_max_retries=0)
    sandbox.set_faults(hang=True)
    tx = key()
    with pytest.raises(PaymentOutcomeUnknown) as info:
        process_payment("3.00", transaction_id=tx)
    sandbox.set_faults()
    reconcile_payments(older_than_seconds=0)
    settled = row(info.value.payment.id)
    assert (settled.status, settled.failure_code) == ("failed", "not_received")
    assert ledger_for(sandbox, tx) == []


def test_unknown_payment_retried_with_the_same_key_charges_once(payments, sandbox):
    payments(payment_read_timeout=0.3, payment_deadline=1.0, payment_max_retries=0)
    sandbox.set_faults(hang_after_commit=True)
    tx = key()
    with pytest.raises(PaymentOutcomeUnknown):
        process_payment("4.00", transaction_id=tx)
    sandbox.set_faults()
    result = process_payment("4.00", transaction_id=tx)
    assert result.status == "succeeded"
    assert len(ledger_for(sandbox, tx)) == 1


def test_provider_unreachable_is_failed_and_retry_with_same_key_succeeds(
    payments, sandbox, unused_port
):
    tx = key()
    payments(payment_api_url=f"http://127.0.0.1:{unused_port}", payment_max_retries=1)
    with pytest.raises(PaymentServiceUnavailable) as info:
        process_payment("6.00", transaction_id=tx)
    assert row(info.value.payment.id).status == "failed"
    payments()  # the provider is back
    result = process_payment("6.00", transaction_id=tx)
    assert result.status == "succeeded" and result.id == info.value.payment.id
    assert len(ledger_for(sandbox, tx)) == 1


def test_reconciliation_from_several_processes_settles_each_payment_once(payments, sandbox):
    payments(
        payment_read_timeout=0.2,
        payment_deadline=0.5,
        payment_max_retries=0,
        payment_breaker_failures=100,
    )
    sandbox.set_faults(hang_after_commit=True)
    ids = []
    for _ in range(6):
        with pytest.raises(PaymentOutcomeUnknown) as info:
            process_payment("1.00", transaction_id=key())
        ids.append(info.value.payment.id)
    sandbox.set_faults()
    with ThreadPoolExecutor(3) as pool:
        reports = list(pool.map(lambda _: reconcile_payments(older_than_seconds=0), range(3)))
    assert sum(r.succeeded for r in reports) == 6
    with db.transaction() as conn:
        events = conn.execute(
            select(func.count())
            .select_from(db.payment_events)
            .where(
                db.payment_events.c.payment_id.in_(ids), db.payment_events.c.reason == "reconciled"
            )
        ).scalar_one()
    assert events == 6


def test_crash_mid_charge_leaves_pending_that_reconciliation_settles(payments, sandbox, pg_url):
    payments(payment_deadline=1.0, db_pool_timeout=0.5)
    sandbox.set_faults(latency_ms=800)
    tx = key()
    script = f"import payment_handler as ph\nph.process_payment('9.99', transaction_id={tx!r})\n"
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": pg_url,
        "PAYMENT_API_URL": sandbox.url,
        "PAYMENT_DEADLINE": "1",
        "PAYMENT_CONNECT_TIMEOUT": "0.5",
    }
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    try:
        sandbox.wait_for_state(lambda s: s["requests"].get("POST /v1/charges", 0) >= 1, 15)
    finally:
        proc.kill()  # kill -9 between steps 1 and 3
        proc.wait(10)
    with db.transaction() as conn:
        stored = conn.execute(select(db.payments).where(db.payments.c.transaction_id == tx)).one()
    assert stored.status == "pending"
    # While its charge may still be in flight, "never saw it" settles nothing ...
    early = reconcile_payments(older_than_seconds=0)
    assert early.failed == 0 and row(stored.id).status == "pending"
    sandbox.wait_for_state(lambda s: s["charges"] >= 1, 10)  # the provider finished it
    # ... and the provider's final answer settles it at once.
    deadline = time.monotonic() + 10
    while row(stored.id).status == "pending" and time.monotonic() < deadline:
        reconcile_payments(older_than_seconds=0)
        time.sleep(0.1)
    settled = row(stored.id)
    (charge,) = ledger_for(sandbox, tx)
    assert settled.status == "succeeded"
    assert (settled.amount_minor, settled.provider_charge_id) == (charge["amount"], charge["id"])


def test_nul_in_text_is_refused(payments):
    with pytest.raises(InvalidPaymentRequest, match="NUL"):
        process_payment("1.00", "card\x00", key())


def test_open_breaker_refuses_new_payments_without_storing_but_replays_known_ones(
    payments, sandbox, unused_port
):
    done = process_payment("2.00", transaction_id=key())
    payments(
        payment_api_url=f"http://127.0.0.1:{unused_port}",
        payment_max_retries=0,
        payment_breaker_failures=2,
    )
    for _ in range(2):
        with pytest.raises(PaymentServiceUnavailable):
            process_payment("1.00", transaction_id=key())
    with db.transaction() as conn:
        before = conn.execute(select(func.count()).select_from(db.payments)).scalar_one()
    with pytest.raises(PaymentServiceUnavailable) as info:
        process_payment("1.00", transaction_id=key())
    assert info.value.code == "breaker_open" and info.value.payment is None
    with db.transaction() as conn:
        assert conn.execute(select(func.count()).select_from(db.payments)).scalar_one() == before
    replay = process_payment("2.00", transaction_id=done.transaction_id)
    assert replay.id == done.id and replay.replayed


def test_text_that_is_not_unicode_is_refused(payments):
    with pytest.raises(InvalidPaymentRequest, match="description"):
        process_payment("1.00", transaction_id=key(), description="bad \ud800 text")


def test_charge_landing_after_a_not_received_verdict_is_recorded_as_succeeded(payments, sandbox):
    """Defence in depth: if a reconciler wrongly found nothing, the provider's charge wins."""
    from payment_store import Change, SqlPaymentStore

    sandbox.set_faults(latency_ms=600)
    tx = key()
    store = SqlPaymentStore()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(process_payment, "5.55", "card", tx)
        sandbox.wait_for_state(lambda s: s["in_flight"] >= 1, 5)
        stored = store.find_by_key(tx)
        store.transition(
            stored, Change(PaymentStatus.FAILED, "reconciled", failure_code="not_received")
        )
        result = future.result(10)
    assert result.status == "succeeded"
    assert row(stored.id).status == "succeeded"
    with db.transaction() as conn:
        reasons = (
            conn.execute(
                select(db.payment_events.c.reason)
                .where(db.payment_events.c.payment_id == stored.id)
                .order_by(db.payment_events.c.id)
            )
            .scalars()
            .all()
        )
    assert reasons == ["created", "reconciled", "charge_landed_after_reconciliation"]


def test_half_open_breaker_refuses_others_before_storing_while_its_trial_is_out(payments, sandbox):
    import payment_handler
    from payment_store import SqlPaymentStore

    payments(
        payment_read_timeout=1.0,
        payment_deadline=1.2,
        payment_max_retries=0,
        payment_breaker_failures=1,
        payment_breaker_reset=0.3,
    )
    sandbox.set_faults(hang=True)
    with pytest.raises(PaymentOutcomeUnknown):
        process_payment("1.00", transaction_id=key())  # the failure that opens it
    breaker = payment_handler.get_payment_service().client.breaker
    deadline = time.monotonic() + 3
    while breaker.state != "half_open" and time.monotonic() < deadline:
        time.sleep(0.02)
    with ThreadPoolExecutor(1) as pool:
        trial = pool.submit(process_payment, "1.00", "card", key())
        sandbox.wait_for_state(lambda s: s["hung"] >= 2, 3)  # the trial is out
        assert breaker.refusal() is not None
        refused_key = key()
        with pytest.raises(PaymentServiceUnavailable) as info:
            process_payment("1.00", transaction_id=refused_key)
        assert info.value.code == "breaker_open"
        assert SqlPaymentStore().find_by_key(refused_key) is None  # nothing stored
        with pytest.raises(PaymentOutcomeUnknown):
            trial.result(5)
