"""Database faults against the real service: killed sessions, statement timeouts, an
exhausted pool, a store that stops accepting writes, and a read-only SQLite file.

A PostgreSQL restart would hit every other test on this machine, so lost connections
are made with ``pg_terminate_backend`` of the service's own sessions instead.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import requests
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

import database_config
from tests.faults.harness import (
    assert_books_balance,
    new_key,
    payment_by_key,
    provider_calls,
    query,
    service_backends,
    terminate_service_backends,
    wait_until,
)
from tests.support.postgres import SERVER_URL

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres]

POOL_EXHAUSTED = "Database query failed: connection pool exhausted"


def assert_store_unavailable(response) -> dict:
    """503 problem+json naming the store, with a Retry-After, and nothing internal in it."""
    assert response.status_code == 503, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    assert int(response.headers["Retry-After"]) >= 1
    problem = response.json()
    assert problem["code"] == "database_unavailable"
    assert "Traceback" not in response.text and "127.0.0.1" not in response.text
    return problem


@contextmanager
def table_locked(database_url: str, table: str = "payments"):
    """Hold ``LOCK TABLE ... ACCESS EXCLUSIVE`` in an open transaction of our own."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            transaction = connection.begin()
            connection.exec_driver_sql(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            try:
                yield
            finally:
                transaction.rollback()
    finally:
        engine.dispose()


def app_errors(service, message_start: str) -> list[dict]:
    return [
        r
        for r in service.log_records()
        if r["level"] == "ERROR" and r["message"].startswith(message_start)
    ]


# --------------------------------------------------------------------------- lost sessions


def test_sessions_killed_mid_load_lose_no_payment(sandbox, start_service):
    """Every 0.2 s the service's PostgreSQL sessions are terminated while 8 clients pay.

    In-flight requests either succeed or fail with a 503 problem; nothing is charged
    without being recorded, and once the killing stops every payment succeeds.
    """
    service = start_service(GUNICORN_WORKERS=2, PAYMENT_READ_TIMEOUT=3, PAYMENT_DEADLINE=5)
    sandbox.set_faults(latency_ms=20)
    loading, killed = threading.Event(), []

    def kill_sessions():
        while not loading.wait(0.2):
            killed.append(terminate_service_backends(service.database_url))

    def pay(_):
        key = new_key()
        return key, service.pay(key, amount="3.21")

    killer = threading.Thread(target=kill_sessions)
    killer.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(pay, range(160)))
    finally:
        loading.set()
        killer.join(10)

    assert sum(killed) >= 3, f"the load never overlapped a kill: {killed}"
    statuses = {response.status_code for _, response in results}
    assert statuses <= {201, 202, 503}, statuses
    for key, response in results:
        if response.status_code == 503:
            assert_store_unavailable(response)
        else:  # answered with a payment: it is in the table under its key
            assert payment_by_key(service.database_url, key)["id"] == response.json()["id"]
    after = [service.pay(new_key(), amount="3.21") for _ in range(10)]
    assert [r.status_code for r in after] == [201] * 10

    service.settle()
    assert_books_balance(service.database_url, sandbox)


def test_database_refusing_connections_is_503_not_ready_and_recovers(sandbox, start_service):
    """The database stops accepting connections (``ALLOW_CONNECTIONS false`` binds even
    the superuser the tests connect as) after the service's sessions are cut."""
    service = start_service()
    assert service.pay(new_key()).status_code == 201
    name = service.database_url.rsplit("/", 1)[1]
    admin = f"{SERVER_URL}/postgres"
    query(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        terminate_service_backends(service.database_url)
        responses = [service.pay(new_key()) for _ in range(3)]
        ready, health = service.get("/readyz"), service.get("/healthz")
    finally:
        query(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    for response in responses:
        assert_store_unavailable(response)
    assert ready.status_code == 503 and health.status_code == 200
    assert [r for r in app_errors(service, "Database query failed") if "accepting" in r["message"]]
    assert provider_calls(sandbox) == 1

    assert service.pay(new_key()).status_code == 201
    assert_books_balance(service.database_url, sandbox)


# --------------------------------------------------------------------------- timeouts


def test_statement_timeout_is_a_503_problem_and_charges_nothing(sandbox, start_service):
    service = start_service(DB_STATEMENT_TIMEOUT_MS=300)
    key = new_key()
    with table_locked(service.database_url):
        started = time.monotonic()
        response = service.pay(key)
        elapsed = time.monotonic() - started
    assert_store_unavailable(response)
    assert 0.3 <= elapsed < 2.5
    assert provider_calls(sandbox) == 0
    (record,) = [
        r for r in app_errors(service, "Database query failed") if "timeout" in r["message"]
    ]
    assert record["message"].startswith(
        "Database query failed: database statement timeout of 300 ms exceeded"
    )
    assert record["request_id"] == response.headers["X-Request-ID"]

    assert service.pay(key).status_code == 201  # the same key once the lock is gone
    assert_books_balance(service.database_url, sandbox)


def test_store_failing_after_the_charge_keeps_it_pending_until_reconciled(sandbox, start_service):
    """The provider charges, then the outcome cannot be written: the money is not lost.

    The table is locked between the charge request and its answer, so every write of
    the outcome hits the statement timeout: the client gets 202 with the payment still
    ``pending`` and reconciliation records the charge once the store is back.
    """
    service = start_service(
        DB_STATEMENT_TIMEOUT_MS=300, PAYMENT_READ_TIMEOUT=2, PAYMENT_DEADLINE=2, DB_POOL_TIMEOUT=1
    )
    sandbox.set_faults(latency_ms=800)
    key = new_key()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(service.pay, key)
        sandbox.wait_for_state(lambda s: s["requests"].get("POST /v1/charges") == 1, 10)
        with table_locked(service.database_url):
            response = answer.result(timeout=30)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "pending"
    assert payment_by_key(service.database_url, key)["status"] == "pending"
    assert app_errors(service, "could not record the provider's answer (pending -> succeeded)")
    assert sandbox.state()["charges"] == 1

    service.settle()  # once its in-flight window is over
    assert payment_by_key(service.database_url, key)["status"] == "succeeded"
    assert_books_balance(service.database_url, sandbox)


def test_exhausted_pool_is_503_with_retry_after_and_the_incident_text(sandbox, start_service):
    """One pooled connection, held by a request whose INSERT waits on a lock we hold."""
    service = start_service(
        DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=0.5, DB_STATEMENT_TIMEOUT_MS=20000
    )
    holder, starved = new_key(), new_key()
    with ThreadPoolExecutor(1) as pool:
        with table_locked(service.database_url):
            held = pool.submit(service.pay, holder)
            wait_until(
                lambda: any(
                    b["wait_event_type"] == "Lock" for b in service_backends(service.database_url)
                ),
                10,
                message="the service's only connection never waited on the lock",
            )
            started = time.monotonic()
            response = service.pay(starved)
            waited = time.monotonic() - started
            ready = service.get("/readyz")
            health = service.get("/healthz")
        assert held.result(timeout=30).status_code == 201

    assert_store_unavailable(response)
    assert 0.5 <= waited < 2.5
    exhausted = [r for r in app_errors(service, POOL_EXHAUSTED) if r["message"] == POOL_EXHAUSTED]
    assert response.headers["X-Request-ID"] in {r.get("request_id") for r in exhausted}
    assert exhausted[0]["logger"] == "database_config"
    assert exhausted[0]["pool"]["checked_out"] == 1
    assert ready.status_code == 503 and ready.json()["checks"]["database"] == "unavailable"
    assert health.status_code == 200

    assert service.pay(starved).status_code == 201  # retried with the same key
    assert_books_balance(service.database_url, sandbox)


# --------------------------------------------------------------------------- read-only SQLite


@contextmanager
def immutable(*paths):
    """``chattr +i``: not even root may write (we run as root, so chmod would not bite)."""
    try:
        subprocess.run(["chattr", "+i", *map(str, paths)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make files immutable here: {exc}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True, capture_output=True)


@pytest.fixture
def sqlite_url(tmp_path):
    path = tmp_path / "store" / "payments.db"
    url = f"sqlite:///{path}"
    database_config.run_migrations(url)
    return url, path


@pytest.mark.parametrize("what", ["file", "directory"])
def test_read_only_sqlite_fails_payments_cleanly_without_a_crash_loop(
    what, sandbox, start_service, sqlite_url
):
    url, path = sqlite_url
    targets = [path] if what == "file" else [path, path.parent]
    with immutable(*targets):
        service = start_service(database_url=url)
        responses = [service.pay(new_key()) for _ in range(5)]
        health = [service.get("/healthz") for _ in range(3)]
        pids = service.worker_pids()
        alive = all(os.path.exists(f"/proc/{pid}") for pid in pids)
    for response in responses:
        assert_store_unavailable(response)
    assert [h.status_code for h in health] == [200] * 3
    assert len(pids) == 1 and alive, "the worker was replaced: a crash loop"
    cause = "attempt to write a readonly database" if what == "file" else "unable to open"
    assert [r for r in app_errors(service, "Database query failed") if cause in r["message"]]
    assert provider_calls(sandbox) == 0


def test_sqlite_store_turning_read_only_under_a_worker_costs_one_restart_not_a_loop(
    sandbox, start_service, sqlite_url
):
    """The files become immutable while a worker has them open and mapped.

    SQLite maps its WAL index (``-shm``): the worker's next write to that page is a
    SIGBUS. gunicorn replaces the worker once; the replacement opens the store read-only
    and answers 503s from then on, instead of dying again.
    """
    url, path = sqlite_url
    service = start_service(database_url=url)
    assert service.pay(new_key()).status_code == 201
    files = sorted(path.parent.iterdir())
    with immutable(*files, path.parent):
        answers = []
        for _ in range(6):
            try:
                answers.append(service.pay(new_key(), timeout=10))
            except requests.ConnectionError as exc:  # the worker died under this request
                answers.append(exc)
        health = service.get("/healthz")
    crashes = [a for a in answers if isinstance(a, requests.ConnectionError)]
    assert len(crashes) <= 1
    for answer in answers:
        if answer not in crashes:
            assert_store_unavailable(answer)
    assert health.status_code == 200
    assert len(service.worker_pids()) <= 2
    assert service.stderr().count("was sent SIGBUS") == len(crashes)


def test_read_only_sqlite_directory_makes_readyz_fail(sandbox, start_service, sqlite_url):
    url, path = sqlite_url
    with immutable(path, path.parent):
        service = start_service(database_url=url)
        ready = service.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == "unavailable"


def test_read_only_sqlite_file_makes_readyz_fail(sandbox, start_service, sqlite_url):
    """Was ready: SELECT 1 still works on a read-only file, every payment failed 503."""
    url, path = sqlite_url
    with immutable(path):
        service = start_service(database_url=url)
        assert service.pay(new_key()).status_code == 503
        ready = service.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == "unavailable"
