"""``DB_POOL=null`` behind a real PgBouncer in transaction pooling mode.

Every test puts a private PgBouncer (``tests/support/pgbouncer.py``) in front of a fresh
PostgreSQL database and points the library or the service at it: migrations, payments
and their replays under gunicorn, the statement timeout (set per transaction, since
PgBouncer refuses the ``options`` startup parameter), and reconciliation, whose
``FOR UPDATE SKIP LOCKED`` claims must neither wait on rows another transaction holds
nor hand a payment to two reconcilers. The fault rows (exhausted pool, database down)
are in ``tests/faults/test_pgbouncer_faults.py``.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
import requests
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

import database_config as db
import payment_handler
from errors import DatabaseUnavailable, PaymentOutcomeUnknown
from payment_handler import process_payment
from tests.support.gunicorn import GunicornProcess
from tests.support.postgres import temporary_database

pytestmark = [pytest.mark.postgres]

API_KEY = "pgbouncer-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def new_key() -> str:
    return f"order-{uuid.uuid4().hex}"


@pytest.fixture
def database_url():
    """A fresh PostgreSQL database (not migrated): its direct URL."""
    with temporary_database() as url:
        yield url


@pytest.fixture
def bounced(database_url, pgbouncer):
    """A migrated database behind PgBouncer (two server connections for everyone)."""
    db.run_migrations(database_url)
    return pgbouncer(database_url, pool_size=2)


@pytest.fixture
def library(bounced, sandbox, configure_payments):
    """The library on ``DB_POOL=null`` through PgBouncer; returns a re-configurer."""

    def configure(**overrides):
        defaults = dict(
            database_url=bounced.url,
            db_pool="null",
            payment_api_url=sandbox.url,
            payment_backoff_factor=0.01,
            payment_connect_timeout=0.5,
        )
        return configure_payments(**{**defaults, **overrides})

    configure()
    return configure


def scalar(url: str, sql: str, **params):
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            return connection.execute(text(sql), params).scalar()
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- migrations


def test_migrations_run_through_pgbouncer(database_url, pgbouncer):
    bouncer = pgbouncer(database_url, pool_size=1)
    config = Config(str(db.ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(db.ROOT / "migrations"))
    head = ScriptDirectory.from_config(config).get_current_head()
    db.run_migrations(bouncer.url)
    db.run_migrations(bouncer.url)  # at head: nothing to do
    assert scalar(database_url, "SELECT version_num FROM alembic_version") == head
    assert scalar(database_url, "SELECT count(*) FROM payments") == 0
    assert bouncer.pool()["pool_mode"] == "transaction"


# --------------------------------------------------------------------------- the service


@pytest.mark.gunicorn
def test_payments_and_replays_under_gunicorn_share_two_server_connections(bounced, sandbox):
    """Two workers x 8 threads pay from 16 clients over PgBouncer's two connections."""
    env = {
        "DATABASE_URL": bounced.url,
        "DB_POOL": "null",
        "PAYMENT_API_URL": sandbox.url,
        "API_KEYS": API_KEY,
        "GUNICORN_WORKERS": "2",
        "GUNICORN_THREADS": "8",
    }
    sandbox.set_faults(latency_ms=20)
    keys = [new_key() for _ in range(48)]

    def pay(key: str, amount: str = "12.34") -> requests.Response:
        return requests.post(
            f"{server.url}/v1/payments",
            json={"amount": amount, "currency": "USD"},
            headers={**AUTH, "Idempotency-Key": key},
            timeout=30,
        )

    with GunicornProcess(env) as server, ThreadPoolExecutor(16) as clients:
        first = list(clients.map(pay, keys))
        replays = list(clients.map(pay, keys))
        reused = pay(keys[0], amount="99.99")
        looked_up = requests.get(f"{server.url}{first[0].headers['Location']}", headers=AUTH)
        servers = bounced.admin("SHOW SERVERS")
        stats = bounced.admin("SHOW STATS")

    assert [r.status_code for r in first] == [201] * len(keys), first[0].text
    assert [r.status_code for r in replays] == [201] * len(keys)
    assert [r.json()["id"] for r in replays] == [r.json()["id"] for r in first]
    assert {r.headers.get("Idempotent-Replayed") for r in replays} == {"true"}
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"
    assert looked_up.status_code == 200 and looked_up.json()["status"] == "succeeded"
    ledger = sandbox.ledger()
    assert sorted(c["idempotency_key"] for c in ledger) == sorted(keys)  # one charge per key
    assert scalar(bounced.url, "SELECT count(*) FROM payments WHERE status = 'succeeded'") == 48
    # Everything went through PgBouncer, on at most its two server connections.
    assert len(servers) <= 2
    (totals,) = stats
    assert totals["total_xact_count"] >= 3 * len(keys)


# --------------------------------------------------------------------------- timeouts


def test_statement_timeout_holds_per_transaction_and_does_not_leak(library, bounced, sandbox):
    """``SET LOCAL`` bounds every transaction and ends with it: the server connection the
    next client gets from PgBouncer carries no timeout of ours."""
    library(db_statement_timeout_ms=300)
    engine = create_engine(bounced.url, poolclass=NullPool)  # PgBouncer's other connection
    try:
        with engine.connect() as locker:
            locker.begin()
            locker.exec_driver_sql("LOCK TABLE payments IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="statement timeout of 300 ms"):
                process_payment("1.00", transaction_id=new_key())
            elapsed = time.monotonic() - started
            locker.rollback()
        assert 0.3 <= elapsed < 2.5
        assert sandbox.state()["requests"].get("POST /v1/charges", 0) == 0
        assert process_payment("1.00", transaction_id=new_key()).status == "succeeded"
        server_default = scalar(bounced.server.render_as_string(), "SHOW statement_timeout")
        for _ in range(4):  # whichever of the two server connections this lands on
            with engine.connect() as plain:
                shown = plain.exec_driver_sql("SHOW statement_timeout").scalar()
                assert shown == server_default != "300ms"
    finally:
        engine.dispose()


def test_the_options_startup_parameter_is_refused_which_is_why_null_pool_omits_it(bounced):
    dsn = f"host=127.0.0.1 port={bounced.port} dbname={bounced.database} user=postgres"
    with pytest.raises(psycopg2.OperationalError, match="unsupported startup parameter"):
        psycopg2.connect(dsn, options="-c statement_timeout=100", connect_timeout=2)


# --------------------------------------------------------------------------- reconciliation


def unknown_payments(count: int) -> list[str]:
    """``count`` payments charged at the sandbox whose answer never came: ``unknown``."""

    def pay(_):
        with pytest.raises(PaymentOutcomeUnknown) as info:
            process_payment("1.00", transaction_id=new_key())
        return info.value.payment.id

    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(pay, range(count)))
    return ids


def reconciled_events(payment_ids: list[str]) -> dict[str, int]:
    with db.transaction() as connection:
        rows = connection.execute(
            select(db.payment_events.c.payment_id, func.count())
            .where(
                db.payment_events.c.payment_id.in_(payment_ids),
                db.payment_events.c.reason == "reconciled",
            )
            .group_by(db.payment_events.c.payment_id)
        )
        return dict(rows.all())


def test_concurrent_reconcilers_skip_locked_rows_and_take_disjoint_payments(
    library, bounced, sandbox
):
    """Four of twelve ``unknown`` payments are locked by another transaction (holding one
    of PgBouncer's two server connections); two reconcilers run at once on the other.

    ``SKIP LOCKED`` lets them pass the locked rows without waiting, and between them they
    look up each of the other eight exactly once; the four are settled once released.
    """
    library(
        payment_read_timeout=0.2,
        payment_deadline=0.5,
        payment_max_retries=0,
        payment_breaker_failures=100,
        db_statement_timeout_ms=3000,
    )
    sandbox.set_faults(hang_after_commit=True)
    ids = unknown_payments(12)
    sandbox.set_faults()
    with db.transaction() as connection:
        oldest = connection.execute(
            select(db.payments.c.id)
            .where(db.payments.c.id.in_(ids))
            .order_by(db.payments.c.updated_at, db.payments.c.id)
            .limit(4)
        ).scalars()
        locked = list(oldest)
    service = payment_handler.get_payment_service()
    lookups_before = sandbox.state()["requests"].get("GET /v1/charges", 0)
    start = threading.Barrier(2)

    def reconcile(_):
        start.wait(timeout=10)
        return service.reconcile(0, batch_size=2)

    engine = create_engine(bounced.url, poolclass=NullPool)
    try:
        with engine.connect() as holder:
            holder.begin()
            holder.execute(
                select(db.payments.c.id).where(db.payments.c.id.in_(locked)).with_for_update()
            )
            started = time.monotonic()
            with ThreadPoolExecutor(2) as pool:
                reports = list(pool.map(reconcile, range(2)))
            elapsed = time.monotonic() - started
            holder.rollback()
    finally:
        engine.dispose()

    assert elapsed < 3, "a reconciler waited on the locked rows"
    assert [r.errors for r in reports] == [0, 0]
    assert sum(r.examined for r in reports) == sum(r.succeeded for r in reports) == 8
    lookups = sandbox.state()["requests"].get("GET /v1/charges", 0) - lookups_before
    assert lookups == 8  # no payment looked up twice
    events = reconciled_events(ids)
    assert sorted(events) == sorted(set(ids) - set(locked)) and set(events.values()) == {1}

    rest = service.reconcile(0, batch_size=2)
    assert (rest.examined, rest.succeeded) == (4, 4)
    assert reconciled_events(ids) == dict.fromkeys(ids, 1)
