"""The embedded default (a SQLite file) where it differs from PostgreSQL: concurrency."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

import database_config as db
from errors import PaymentInProgress, PaymentOutcomeUnknown
from payment_handler import process_payment, reconcile_payments


@pytest.fixture
def sqlite_payments(tmp_path, sandbox, configure_payments):
    url = f"sqlite:///{tmp_path / 'payments.db'}"
    db.run_migrations(url)
    return configure_payments(database_url=url, payment_api_url=sandbox.url)


def test_concurrent_payments_on_one_sqlite_file(sqlite_payments, sandbox):
    sandbox.set_faults(latency_ms=20)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda i: process_payment("1.00", transaction_id=f"tx-{i}"), range(64))
        )
    assert {r.status for r in results} == {"succeeded"}
    assert sandbox.state()["charges"] == 64
    with db.transaction() as conn:
        assert conn.execute(select(func.count()).select_from(db.payments)).scalar_one() == 64


def test_same_key_from_threads_charges_once_on_sqlite(sqlite_payments, sandbox):
    sandbox.set_faults(latency_ms=200)
    tx = f"order-{uuid.uuid4().hex}"
    barrier = threading.Barrier(8)

    def pay():
        barrier.wait()
        try:
            return process_payment("2.00", transaction_id=tx).id
        except PaymentInProgress as exc:
            return exc.payment.id

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: pay(), range(8)))
    assert len(ids) == 1
    assert sandbox.state()["charges"] == 1


def test_reconciliation_works_on_sqlite(sqlite_payments, sandbox, configure_payments):
    configure_payments(
        database_url=sqlite_payments.database_url,
        payment_api_url=sandbox.url,
        payment_connect_timeout=0.2,
        payment_read_timeout=0.2,
        payment_deadline=0.5,
        payment_max_retries=0,
    )
    sandbox.set_faults(hang_after_commit=True)
    with pytest.raises(PaymentOutcomeUnknown):
        process_payment("3.00", transaction_id="tx-unknown")
    sandbox.set_faults()
    report = reconcile_payments(older_than_seconds=0)
    assert (report.examined, report.succeeded) == (1, 1)
