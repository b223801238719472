"""The store's engine and ``transaction()``: pool limits, failures and fork safety, for real.

PostgreSQL tests each run in a throwaway database of their own; SQLite tests use a file
under ``tmp_path``.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

import database_config as db
import settings
from errors import DatabaseUnavailable
from tests.support.postgres import temporary_database


@pytest.fixture
def empty_pg_url():
    """An empty database of this test's own (conftest's ``pg_url`` is shared and migrated)."""
    with temporary_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'instance' / 'payments.db'}"


@pytest.fixture
def configure():
    """Point the process's engine at a database; dispose of it afterwards."""

    def configure(url: str, **overrides):
        return db.configure_engine(settings.Settings(database_url=url, **overrides))

    yield configure
    db.dispose_engine()


def backend_pid(connection) -> int:
    return connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()


def payment_row(key: str, **changes) -> dict:
    now = datetime.now(UTC)
    row = dict(
        id=f"pay_{key}",
        idempotency_key=key,
        transaction_id=key,
        request_fingerprint="f" * 64,
        amount_minor=2599,
        currency="USD",
        payment_method="card",
        status="pending",
        created_at=now,
        updated_at=now,
    )
    return {**row, **changes}


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# transaction(): commit, rollback, what is translated and what is not


@pytest.mark.postgres
def test_transaction_commits_on_success_and_returns_the_connection(empty_pg_url, configure):
    configure(empty_pg_url)
    with db.transaction() as connection:
        connection.exec_driver_sql("CREATE TABLE t (n integer)")
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
    with db.transaction() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1
    assert db.pool_status()["checked_out"] == 0


@pytest.mark.postgres
def test_transaction_rolls_back_on_error_and_returns_the_connection(empty_pg_url, configure):
    configure(empty_pg_url)
    with db.transaction() as connection:
        connection.exec_driver_sql("CREATE TABLE t (n integer)")

    with pytest.raises(RuntimeError, match="boom"), db.transaction() as connection:
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        raise RuntimeError("boom")

    with db.transaction() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    assert db.pool_status()["checked_out"] == 0


@pytest.mark.postgres
def test_unique_key_violation_is_not_translated(empty_pg_url, configure):
    db.run_migrations(empty_pg_url)
    configure(empty_pg_url)
    with db.transaction() as connection:
        connection.execute(db.payments.insert().values(**payment_row("k1")))

    with (
        pytest.raises(sa_exc.IntegrityError, match="uq_payments_idempotency_key"),
        db.transaction() as connection,
    ):
        connection.execute(db.payments.insert().values(**payment_row("k1", id="pay_other")))
    assert db.pool_status()["checked_out"] == 0


# pool exhaustion, an unreachable server, statement timeouts, dead pooled connections


@pytest.mark.postgres
def test_exhausted_pool_raises_database_unavailable_and_logs_the_alarm_text(
    empty_pg_url, configure, caplog
):
    engine = configure(empty_pg_url, db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.5)
    with engine.connect(), caplog.at_level(logging.ERROR, logger="database_config"):
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as raised, db.transaction():
            pass
        waited = time.monotonic() - started

    assert 0.4 <= waited <= 3
    assert "connection pool exhausted (waited 0.5s" in str(raised.value)
    assert isinstance(raised.value.__cause__, sa_exc.TimeoutError)
    [record] = [r for r in caplog.records if r.name == "database_config"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "Database query failed: connection pool exhausted"
    assert record.pool == {
        "pool": "QueuePool",
        "size": 1,
        "checked_out": 1,
        "overflow": 0,
        "checked_in": 0,
        "max_overflow": 0,
        "timeout": 0.5,
    }


def test_unreachable_server_fails_fast_naming_the_cause(configure, caplog):
    port = unused_port()
    configure(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres")
    with caplog.at_level(logging.ERROR, logger="database_config"):
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable) as raised, db.transaction():
            pass
        assert time.monotonic() - started < 3

    expected = f"database unreachable: connection refused at 127.0.0.1:{port}"
    assert str(raised.value) == expected
    assert isinstance(raised.value.__cause__, sa_exc.OperationalError)
    assert [r.getMessage() for r in caplog.records] == [f"Database query failed: {expected}"]


def test_server_that_never_answers_is_abandoned_after_the_connect_timeout(configure):
    with socket.socket() as silent:  # accepts TCP connections, never speaks PostgreSQL
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        configure(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/x", db_connect_timeout=2)
        started = time.monotonic()
        with (
            pytest.raises(DatabaseUnavailable, match="unreachable: no answer within 2s"),
            db.transaction(),
        ):
            pass
        assert time.monotonic() - started < 6


@pytest.mark.postgres
@pytest.mark.parametrize("pool", ["queue", "null"])
def test_statement_timeout_raises_database_unavailable_naming_it(empty_pg_url, configure, pool):
    configure(empty_pg_url, db_pool=pool, db_statement_timeout_ms=200)
    started = time.monotonic()
    with (
        pytest.raises(DatabaseUnavailable, match="statement timeout of 200 ms"),
        db.transaction() as connection,
    ):
        connection.exec_driver_sql("SELECT pg_sleep(2)")
    assert time.monotonic() - started < 1.5
    with db.transaction() as connection:  # the connection survives its cancelled query
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1


@pytest.mark.postgres
def test_pre_ping_replaces_a_pooled_connection_the_server_killed(empty_pg_url, configure):
    engine = configure(empty_pg_url)
    with db.transaction() as connection:
        killed = backend_pid(connection)

    with temporary_admin(empty_pg_url) as admin:
        admin.exec_driver_sql(f"SELECT pg_terminate_backend({killed})")
        poll_until(lambda: not admin.exec_driver_sql(active_pid_sql(killed)).scalar())

    with db.transaction() as connection:
        assert backend_pid(connection) != killed
    assert engine.pool.checkedin() == 1


def temporary_admin(url: str):
    return create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT").connect()


def active_pid_sql(pid: int) -> str:
    return f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"


def poll_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        threading.Event().wait(0.02)


# connection settings reach the server


@pytest.mark.postgres
@pytest.mark.parametrize("pool", ["queue", "null"])
def test_postgres_sessions_carry_application_name_and_statement_timeout(
    empty_pg_url, configure, pool
):
    configure(empty_pg_url, db_pool=pool, db_statement_timeout_ms=1234)
    with db.transaction() as connection:
        assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "1234ms"
        assert connection.exec_driver_sql("SHOW application_name").scalar() == "payment-service"


@pytest.mark.postgres
def test_pool_status_counts_checked_out_and_overflow_connections(empty_pg_url, configure):
    engine = configure(empty_pg_url, db_pool_size=1, db_max_overflow=2, db_pool_timeout=3)
    with engine.connect(), engine.connect():
        status = db.pool_status()
    assert status == {
        "pool": "QueuePool",
        "size": 1,
        "checked_out": 2,
        "overflow": 1,
        "checked_in": 0,
        "max_overflow": 2,
        "timeout": 3,
    }
    assert db.pool_status() | {"checked_out": 0, "checked_in": 1, "overflow": 0} == db.pool_status()


@pytest.mark.postgres
def test_null_pool_status_counts_connections_in_use(empty_pg_url, configure):
    engine = configure(empty_pg_url, db_pool="null")
    with engine.connect(), engine.connect():
        assert db.pool_status()["checked_out"] == 2
    assert db.pool_status() == {
        "pool": "NullPool",
        "size": 0,
        "checked_out": 0,
        "overflow": 0,
        "checked_in": 0,
        "max_overflow": 0,
        "timeout": 0.0,
    }


# ping() for /readyz


@pytest.mark.postgres
def test_ping_succeeds_against_a_live_database(empty_pg_url, configure):
    configure(empty_pg_url)
    db.ping(timeout=2)
    assert db.pool_status()["checked_out"] == 0


@pytest.mark.postgres
def test_ping_gives_up_after_its_timeout_not_the_pool_timeout(empty_pg_url, configure):
    engine = configure(empty_pg_url, db_pool_size=1, db_max_overflow=0, db_pool_timeout=10)
    held = engine.connect()
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="did not answer SELECT 1 within 0.3s"):
            db.ping(timeout=0.3)
        assert time.monotonic() - started < 1.5
    finally:
        held.close()
    db.ping(timeout=5)  # the waiting ping gets the freed connection and answers


def test_ping_against_an_unreachable_server_raises(configure):
    configure(f"postgresql+psycopg2://postgres@127.0.0.1:{unused_port()}/postgres")
    with pytest.raises(DatabaseUnavailable, match="connection refused"):
        db.ping(timeout=2)


@pytest.mark.postgres
def test_ping_refuses_a_read_only_postgres_database(empty_pg_url, configure):
    name = empty_pg_url.rsplit("/", 1)[1]
    with temporary_admin(empty_pg_url) as admin:
        admin.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    configure(empty_pg_url)
    with pytest.raises(DatabaseUnavailable, match="read-only"):
        db.ping(timeout=2)


def test_ping_accepts_a_writable_sqlite_file_and_leaves_no_transaction(sqlite_url, configure):
    db.run_migrations(sqlite_url)
    configure(sqlite_url)
    db.ping(timeout=2)
    with db.transaction() as conn:  # the probe's write lock and transaction are gone
        conn.execute(db.payments.insert().values(**payment_row("after-ping")))


def test_ping_refuses_a_read_only_sqlite_file(sqlite_url, configure):
    """``SELECT 1`` still works on a file nobody can write; a payment would not."""
    import subprocess

    db.run_migrations(sqlite_url)
    path = sqlite_url.removeprefix("sqlite:///")
    try:
        subprocess.run(["chattr", "+i", path], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make the file immutable here: {exc}")
    try:
        configure(sqlite_url)
        with pytest.raises(DatabaseUnavailable, match="not writable"):
            db.ping(timeout=2)
    finally:
        db.dispose_engine()
        subprocess.run(["chattr", "-i", path], check=True, capture_output=True)


# the per-process engine and fork safety


def test_concurrent_first_use_builds_one_engine(sqlite_url, monkeypatch):
    db.dispose_engine()
    built = []
    real_build = db.build_engine

    def slow_build(config):
        built.append(config)
        threading.Event().wait(0.05)  # widen the race window a missing lock would lose
        return real_build(config)

    monkeypatch.setattr(
        settings, "get_settings", lambda: settings.Settings(database_url=sqlite_url)
    )
    monkeypatch.setattr(db, "build_engine", slow_build)
    barrier = threading.Barrier(16)
    engines = []

    def first_use():
        barrier.wait(timeout=5)
        engines.append(db.get_engine())

    threads = [threading.Thread(target=first_use) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    try:
        assert len(engines) == 16
        assert len({id(engine) for engine in engines}) == 1
        assert len(built) == 1
    finally:
        db.dispose_engine()


def test_configure_engine_replaces_and_closes_the_previous_engine(sqlite_url, tmp_path, configure):
    first = configure(sqlite_url)
    with db.transaction():
        pass
    assert first.pool.checkedin() == 1
    second = configure(f"sqlite:///{tmp_path / 'other.db'}")
    assert db.get_engine() is second
    assert first.pool.checkedin() == 0


@pytest.mark.postgres
def test_forked_child_opens_its_own_connection_and_leaves_the_parents_alone(
    empty_pg_url, configure
):
    configure(empty_pg_url)
    with db.transaction() as connection:
        parent_backend = backend_pid(connection)

    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report its backend, never return into pytest
        code = 1
        try:
            with db.transaction() as connection:
                os.write(writer, str(backend_pid(connection)).encode())
            db.reset_after_fork()  # as gunicorn's post_fork does, after the at-fork hook
            with db.transaction() as connection:
                connection.exec_driver_sql("SELECT 1")
            code = 0
        finally:
            os._exit(code)

    os.close(writer)
    with os.fdopen(reader) as pipe:
        child_backend = int(pipe.read() or 0)
    assert wait_for_exit(child) == 0
    assert child_backend not in (0, parent_backend)
    with db.transaction() as connection:
        assert backend_pid(connection) == parent_backend
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1


def wait_for_exit(pid: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("forked child did not exit")
        threading.Event().wait(0.02)


# the embedded SQLite file


def test_sqlite_file_gets_its_directory_wal_and_safe_pragmas(sqlite_url, tmp_path, configure):
    configure(sqlite_url, db_pool_timeout=2.5)
    assert (tmp_path / "instance").is_dir()
    with db.transaction() as connection:
        pragma = lambda name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("synchronous") == 1  # NORMAL
        assert pragma("busy_timeout") == 2500


def test_sqlite_read_then_write_transactions_from_8_threads_neither_lock_nor_lose_updates(
    sqlite_url, configure
):
    """Each thread reads a counter and writes it back plus one, 25 times.

    DEFERRED transactions fail here with "database is locked"; sqlite3's legacy
    autocommit reads lose updates. BEGIN IMMEDIATE does neither.
    """
    configure(sqlite_url)
    with db.transaction() as connection:
        connection.exec_driver_sql("CREATE TABLE counter (n integer NOT NULL)")
        connection.exec_driver_sql("INSERT INTO counter VALUES (0)")
    barrier = threading.Barrier(8)
    errors = []

    def increment_25_times():
        barrier.wait(timeout=5)
        for _ in range(25):
            try:
                with db.transaction() as connection:
                    n = connection.exec_driver_sql("SELECT n FROM counter").scalar()
                    connection.execute(text("UPDATE counter SET n = :n"), {"n": n + 1})
            except Exception as exc:  # collected: the assertion below names them
                errors.append(exc)

    threads = [threading.Thread(target=increment_25_times) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    with db.transaction() as connection:
        assert connection.exec_driver_sql("SELECT n FROM counter").scalar() == 200


def test_sqlite_writer_that_cannot_get_the_lock_in_time_gets_database_unavailable(
    sqlite_url, tmp_path, configure, caplog
):
    configure(sqlite_url, db_pool_timeout=0.2)
    with db.transaction():
        pass  # creates the file
    holder = sqlite3.connect(tmp_path / "instance" / "payments.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with (
            caplog.at_level(logging.ERROR, logger="database_config"),
            pytest.raises(DatabaseUnavailable, match="database busy: database is locked"),
            db.transaction(),
        ):
            pass
    finally:
        holder.close()
    assert caplog.records[0].getMessage().startswith("Database query failed: database busy")


def test_sqlite_sql_mistakes_are_not_translated(sqlite_url, configure):
    configure(sqlite_url)
    with pytest.raises(sa_exc.OperationalError, match="syntax error"), db.transaction() as c:
        c.exec_driver_sql("SELEC 1")


def test_sqlite_enforces_foreign_keys(sqlite_url, configure):
    db.run_migrations(sqlite_url)
    configure(sqlite_url)
    orphan = dict(
        payment_id="pay_missing",
        kind="charge",
        attempt=1,
        started_at=datetime.now(UTC),
        duration_ms=5,
        outcome="answered",
    )
    with pytest.raises(sa_exc.IntegrityError, match="FOREIGN KEY"), db.transaction() as c:
        c.execute(db.payment_attempts.insert().values(**orphan))


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_timestamps_read_back_as_aware_utc(backend, sqlite_url, configure):
    with temporary_database() if backend == "postgresql" else nullcontext(sqlite_url) as url:
        db.run_migrations(url)
        configure(url)
        plus_two = timezone(timedelta(hours=2))
        created = datetime(2025, 1, 2, 14, 30, 15, 123456, tzinfo=plus_two)
        with db.transaction() as connection:
            connection.execute(db.payments.insert().values(**payment_row("k", created_at=created)))
            stored = connection.execute(select(db.payments.c.created_at)).scalar()
        db.dispose_engine()
    assert stored == created
    assert stored.tzinfo == UTC


def test_in_memory_sqlite_is_refused():
    with pytest.raises(settings.ConfigError, match="SQLite file"):
        db.build_engine(settings.Settings(database_url="sqlite://"))
