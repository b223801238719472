"""Crash safety: ``kill -9`` of a gunicorn worker in the middle of a charge.

The worker dies between step 1 (``pending`` committed) and step 3 (outcome stored), so
the payment stays ``pending``; ``flask --app wsgi payments reconcile`` (a subprocess
with the service's environment) settles it to whatever the provider actually did, and
the books balance: our succeeded total equals the sandbox ledger's.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import payment_handler
from tests.faults.harness import (
    assert_books_balance,
    new_key,
    payment_by_key,
    provider_calls,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres]

#: Long enough per attempt that a 2 s provider answers within one; short budgets so a
#: pending payment is past its in-flight window (deadline + DB_POOL_TIMEOUT + 1 s) soon.
SLOW_PROVIDER_ENV = {
    "PAYMENT_READ_TIMEOUT": "2.5",
    "PAYMENT_DEADLINE": "2.6",
    "DB_POOL_TIMEOUT": "1",
}


def pay_expecting_crash(service, key: str):
    """The payment's answer, or the connection error a killed worker leaves behind."""
    try:
        return service.pay(key, timeout=20)
    except requests.ConnectionError as exc:
        return exc


def kill_worker(service, *, booted: int = 1) -> int:
    """SIGKILL the newest worker; return once the master has booted its replacement."""
    victim = service.worker_pids()[-1]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(service.worker_pids()) > booted, 15, message="no replacement worker")
    wait_until(lambda: service.get("/healthz").status_code == 200, 15)
    return victim


def test_worker_killed_mid_charge_leaves_pending_that_reconcile_settles(sandbox, start_service):
    service = start_service(**SLOW_PROVIDER_ENV)
    sandbox.set_faults(latency_ms=2000)
    key = new_key()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(pay_expecting_crash, service, key)
        sandbox.wait_for_state(lambda s: s["requests"].get("POST /v1/charges") == 1, 10)
        kill_worker(service)
        assert isinstance(answer.result(timeout=30), requests.ConnectionError)
    assert payment_by_key(service.database_url, key)["status"] == "pending"

    # Retrying while it is pending is a conflict, never a second charge.
    conflict = service.pay(key)
    assert conflict.status_code == 409 and conflict.json()["code"] == "payment_in_progress"
    assert provider_calls(sandbox) == 1

    sandbox.wait_for_state(lambda s: s["charges"] == 1, 10)  # the provider did charge
    service.settle()
    settled = payment_by_key(service.database_url, key)
    (charge,) = sandbox.ledger()
    assert (settled["status"], settled["provider_charge_id"]) == ("succeeded", charge["id"])

    replay = service.pay(key)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert provider_calls(sandbox) == 1
    assert_books_balance(service.database_url, sandbox)


def test_worker_killed_while_provider_hangs_is_not_received_and_retry_charges_once(
    sandbox, start_service
):
    service = start_service(**SLOW_PROVIDER_ENV)
    sandbox.set_faults(hang=True)
    key = new_key()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(pay_expecting_crash, service, key)
        sandbox.wait_for_state(lambda s: s["hung"] == 1, 10)
        kill_worker(service)
        assert isinstance(answer.result(timeout=30), requests.ConnectionError)
    sandbox.set_faults()  # the hung request is dropped: the provider never charged it

    service.settle()
    stored = payment_by_key(service.database_url, key)
    assert (stored["status"], stored["failure_code"]) == ("failed", "not_received")
    assert_books_balance(service.database_url, sandbox)

    retried = service.pay(key)  # never received: re-submitted under the same key
    assert retried.status_code == 201
    assert [c["idempotency_key"] for c in sandbox.ledger()] == [key]
    assert_books_balance(service.database_url, sandbox)


def test_worker_killed_with_many_charges_in_flight_loses_none(sandbox, start_service):
    """One worker with 12 payments at different steps dies: none is lost or doubled."""
    service = start_service(GUNICORN_THREADS=12, PAYMENT_POOL_MAXSIZE=12, **SLOW_PROVIDER_ENV)
    sandbox.set_faults(latency_ms=1000)
    keys = [new_key() for _ in range(12)]
    with ThreadPoolExecutor(len(keys)) as pool:
        answers = [pool.submit(pay_expecting_crash, service, key) for key in keys]
        sandbox.wait_for_state(lambda s: s["requests"].get("POST /v1/charges", 0) >= 8, 10)
        kill_worker(service)
        outcomes = [answer.result(timeout=30) for answer in answers]
    assert all(isinstance(o, requests.ConnectionError) for o in outcomes), outcomes

    sandbox.wait_for_state(lambda s: s["in_flight"] == 0, 10)
    service.settle()
    charged = {c["idempotency_key"] for c in sandbox.ledger()}
    assert len(charged) >= 8
    for key in keys:
        row = payment_by_key(service.database_url, key)
        if key in charged:
            assert row["status"] == "succeeded"
        elif row is not None:  # stored, never sent: the provider never saw it
            assert (row["status"], row["failure_code"]) == ("failed", "not_received")
    assert assert_books_balance(service.database_url, sandbox) == {"USD": 1000 * len(charged)}


def test_reconcile_during_an_in_flight_charge_leaves_it_alone(
    sandbox, start_service, configure_payments
):
    """Was a 500 and a charge recorded as failed: reconciliation asked the provider about
    a payment whose charge was still in flight, heard "never seen", and failed it."""
    service = start_service(PAYMENT_READ_TIMEOUT=4, PAYMENT_DEADLINE=5)
    sandbox.set_faults(latency_ms=2500)
    key = new_key()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(service.pay, key)
        sandbox.wait_for_state(lambda s: s["requests"].get("POST /v1/charges") == 1, 10)
        # What an operator's `payments reconcile --older-than 0` does, in-process so it
        # lands well inside the provider's 2.5 s.
        configure_payments(
            database_url=service.database_url,
            payment_api_url=sandbox.url,
            payment_api_key=service.env["PAYMENT_API_KEY"],
        )
        payment_handler.reconcile_payments(older_than_seconds=0)
        response = answer.result(timeout=30)
    assert response.status_code == 201
    assert payment_by_key(service.database_url, key)["status"] == "succeeded"
    assert_books_balance(service.database_url, sandbox)


def test_after_a_crash_one_reconcile_run_settles_a_charge_the_provider_made(sandbox, start_service):
    """No waiting out the in-flight window when the provider has a final answer: an
    operator's ``payments reconcile --older-than 0`` settles it at once, and a retry
    meanwhile is told (``Retry-After``) when the payment could be re-submitted."""
    env = {**SLOW_PROVIDER_ENV, "PAYMENT_DEADLINE": "30", "PAYMENT_READ_TIMEOUT": "30"}
    service = start_service(**env)  # in-flight window: 30 + 1 + 1 = 32 s
    sandbox.set_faults(hang_after_commit=True)  # charged; the answer never comes
    key = new_key()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(pay_expecting_crash, service, key)
        sandbox.wait_for_state(lambda s: s["charges"] == 1, 10)
        kill_worker(service)
        assert isinstance(answer.result(timeout=30), requests.ConnectionError)
    sandbox.set_faults()

    conflict = service.pay(key)
    assert conflict.status_code == 409 and conflict.json()["code"] == "payment_in_progress"
    assert 20 <= int(conflict.headers["Retry-After"]) <= 32

    report = service.reconcile(older_than=0)  # once, well inside the window
    assert report["succeeded"] == 1, report
    (charge,) = sandbox.ledger()
    settled = payment_by_key(service.database_url, key)
    assert (settled["status"], settled["provider_charge_id"]) == ("succeeded", charge["id"])
    assert_books_balance(service.database_url, sandbox)
