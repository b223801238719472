"""Rows of the database fault suite with PgBouncer (transaction pooling) in front.

The same scenarios as ``test_database_faults.py`` - an exhausted pool, a database that
stops accepting connections - on the same harness, for a service on ``DB_POOL=null``
whose ``DATABASE_URL`` is a private PgBouncer. The pool that runs dry is then
PgBouncer's: a request waits in its queue for ``query_wait_timeout`` and PgBouncer drops
the connection. libpq reports that (and a failed server login) only as "server closed the
connection unexpectedly", so the service answers its 503 problem and logs
``Database query failed: database connection lost: ...``; the cause is in PgBouncer's
log, which is where an alarm on PgBouncer's pool belongs.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults.harness import (
    assert_books_balance,
    migrated_database,
    new_key,
    provider_calls,
    query,
    service_backends,
    wait_until,
)
from tests.faults.test_database_faults import app_errors, assert_store_unavailable, table_locked
from tests.support.postgres import SERVER_URL

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres]

CONNECTION_LOST = "Database query failed: database connection lost"
#: PgBouncer's wait for a server connection, set like the harness's DB_POOL_TIMEOUT (2 s):
#: its default of 120 s would hold a request far past gunicorn's timeout.
QUERY_WAIT_TIMEOUT_S = 2


@pytest.fixture
def database():
    """A migrated database; requested first, so it is dropped after PgBouncer and the
    services in front of it have stopped."""
    with migrated_database() as url:
        yield url


def terminate_backends(database_url: str) -> int:
    """End every session on the database (PgBouncer's server connections among them)."""
    name = database_url.rsplit("/", 1)[1]
    rows = query(
        f"{SERVER_URL}/postgres",
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
        "WHERE datname = :db AND pid <> pg_backend_pid()",
        db=name,
    )
    return rows[0]["n"]


def test_exhausted_pgbouncer_pool_is_503_with_retry_after_within_query_wait_timeout(
    database, pgbouncer, sandbox, start_service
):
    """PgBouncer's only server connection is held by a request whose INSERT waits on a
    lock we hold; the next request waits ``query_wait_timeout`` (1 s) and gets a 503."""
    bouncer = pgbouncer(database, pool_size=1, query_wait_timeout=1)
    service = start_service(database_url=bouncer.url, DB_POOL="null", DB_STATEMENT_TIMEOUT_MS=20000)
    holder, starved = new_key(), new_key()
    with ThreadPoolExecutor(1) as pool:
        with table_locked(database):  # on a direct connection: PgBouncer's stays free
            held = pool.submit(service.pay, holder)
            wait_until(
                lambda: any(b["wait_event_type"] == "Lock" for b in service_backends(database)),
                10,
                message="PgBouncer's only server connection never waited on the lock",
            )
            started = time.monotonic()
            response = service.pay(starved)
            waited = time.monotonic() - started
            ready = service.get("/readyz")
            health = service.get("/healthz")
        assert held.result(timeout=30).status_code == 201

    assert_store_unavailable(response)
    assert 1 <= waited < 3.5
    lost = app_errors(service, CONNECTION_LOST)
    assert response.headers["X-Request-ID"] in {r.get("request_id") for r in lost}
    assert "closing because: query_wait_timeout" in bouncer.log
    assert ready.status_code == 503 and ready.json()["checks"]["database"] == "unavailable"
    assert health.status_code == 200

    assert service.pay(starved).status_code == 201  # retried with the same key
    assert_books_balance(service.database_url, sandbox)


def test_database_refusing_connections_behind_pgbouncer_is_503_and_recovers(
    database, pgbouncer, sandbox, start_service
):
    """The database stops accepting connections and PgBouncer's server connections are
    cut: every request is a 503 at once; once the database is back, PgBouncer logs in
    again (``server_login_retry``) and the same key is charged."""
    bouncer = pgbouncer(database, pool_size=2, query_wait_timeout=QUERY_WAIT_TIMEOUT_S)
    service = start_service(database_url=bouncer.url, DB_POOL="null")
    assert service.pay(new_key()).status_code == 201
    name = database.rsplit("/", 1)[1]
    admin = f"{SERVER_URL}/postgres"
    query(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        assert terminate_backends(database) >= 1
        responses, waits = [], []
        for _ in range(3):
            started = time.monotonic()
            responses.append(service.pay(new_key()))
            waits.append(time.monotonic() - started)
        ready, health = service.get("/readyz"), service.get("/healthz")
    finally:
        query(admin, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    for response in responses:
        assert_store_unavailable(response)
    # The first waits while PgBouncer tries to log in, at most query_wait_timeout; then
    # PgBouncer refuses at once until server_login_retry has passed.
    assert waits[0] < QUERY_WAIT_TIMEOUT_S + 1.5 and max(waits[1:]) < 1, waits
    assert ready.status_code == 503 and health.status_code == 200
    assert app_errors(service, CONNECTION_LOST)
    assert "is not currently accepting connections" in bouncer.log
    assert provider_calls(sandbox) == 1

    key = new_key()
    wait_until(
        lambda: service.pay(key).status_code == 201,
        10,
        interval=0.2,
        message="the service did not recover through PgBouncer",
    )
    assert_books_balance(service.database_url, sandbox)
