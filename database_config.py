"""The payment store: tables, the per-process engine, and the one way to use it.

Read top-down when paged:

1. ``transaction()``: every unit of work opens a short transaction here and nothing
   else; it is also the one place where database failures become
   ``errors.DatabaseUnavailable`` (pool exhausted, server unreachable, statement
   timeout). The pool-exhausted case logs the legacy alarm text word for word.
2. ``pool_status()`` / ``ping()``: what ``/metrics`` and ``/readyz`` report.
3. The engine's lifecycle: one lazily built engine per process, rebuilt after fork.
4. ``build_engine()``: pool sizing and timeouts for PostgreSQL and for the embedded
   SQLite file.
5. The tables, and ``run_migrations()`` (Alembic owns the schema).

Transactions must stay short: never call the provider (or anything on the network)
while one is open, or a slow provider drains the pool (the incident of DESIGN.md).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import NullPool, QueuePool
from sqlalchemy.types import TypeDecorator

import settings
from errors import DatabaseUnavailable
from payment_states import PaymentStatus, RefundState

log = logging.getLogger(__name__)

POOL_EXHAUSTED_MESSAGE = "Database query failed: connection pool exhausted"
APPLICATION_NAME = "payment-service"
ROOT = Path(__file__).resolve().parent

# A connection idle this long gets probed; a dead peer is noticed within about a minute.
TCP_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

# SQLite primary result codes: BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN.
SQLITE_UNAVAILABLE_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14})

# Execution option: begin this connection's SQLite transactions DEFERRED (read-only use).
SQLITE_DEFERRED = "sqlite_deferred"


# 1. Transactions and error translation ------------------------------------------------


@contextmanager
def transaction() -> Iterator[Connection]:
    """Yield a connection inside a transaction: commit on success, roll back on error.

    The connection always goes back to the pool on exit. Pool exhaustion, an
    unreachable or lost server and statement timeouts raise ``DatabaseUnavailable``
    (chained, logged at ERROR); ``IntegrityError`` and SQL mistakes pass through
    unchanged, because callers decide what a unique-key race means.
    """
    engine = get_engine()
    with _translate_errors(engine), engine.begin() as connection:
        yield connection


@contextmanager
def _translate_errors(engine: Engine) -> Iterator[None]:
    """Turn "the store is unusable right now" failures into ``DatabaseUnavailable``.

    Wraps connect (checkout), statements and commit alike.
    """
    try:
        yield
    except sa_exc.TimeoutError as exc:  # QueuePool waited pool_timeout for a free connection
        status = pool_status(engine)
        log.error(POOL_EXHAUSTED_MESSAGE, extra={"pool": status})
        raise DatabaseUnavailable(
            f"database connection pool exhausted (waited {status['timeout']}s; "
            f"{status['checked_out']} checked out, pool size {status['size']}, "
            f"overflow {status['overflow']}/{status['max_overflow']})"
        ) from exc
    except sa_exc.DBAPIError as exc:
        if not _is_unavailable(exc):
            raise
        message = _describe_failure(exc, engine)
        log.error("Database query failed: %s", message, extra={"pool": pool_status(engine)})
        raise DatabaseUnavailable(message) from exc


def _is_unavailable(exc: sa_exc.DBAPIError) -> bool:
    """The server, the network or a server-side limit failed, not the SQL we sent.

    sqlite3 raises OperationalError for SQL mistakes too, so there only the result
    codes that mean "the file is busy or unusable" count.
    """
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return False
    sqlite_code = getattr(exc.orig, "sqlite_errorcode", None)
    return sqlite_code is None or sqlite_code & 0xFF in SQLITE_UNAVAILABLE_CODES


def _describe_failure(exc: sa_exc.DBAPIError, engine: Engine) -> str:
    """One line naming the cause, for the log and for ``DatabaseUnavailable``."""
    cause = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc).__name__
    lowered = cause.lower()
    url = engine.url
    where = f"{url.host}:{url.port or 5432}" if url.get_backend_name() != "sqlite" else url.database
    built_with = _built_with.get(engine)
    if getattr(exc.orig, "pgcode", None) == "57014" and "statement timeout" in lowered:
        limit = f" of {built_with.db_statement_timeout_ms} ms" if built_with else ""
        return f"database statement timeout{limit} exceeded: {cause}"
    if "connection refused" in lowered:
        return f"database unreachable: connection refused at {where}"
    if "timeout expired" in lowered:
        limit = f" within {built_with.db_connect_timeout}s" if built_with else ""
        return f"database unreachable: no answer{limit} at {where}"
    if "could not translate host name" in lowered:
        return f"database unreachable: unknown host {url.host}"
    if "database is locked" in lowered:
        return f"database busy: {cause} at {where}"
    if exc.connection_invalidated:
        return f"database connection lost: {cause}"
    return f"database error: {cause}"


# 2. Pool status and readiness ----------------------------------------------------------


def pool_status(engine: Engine | None = None) -> dict:
    """What the pool looks like now: for logs, ``/metrics`` and exhaustion errors.

    ``overflow`` counts connections opened beyond ``size``. A NullPool keeps nothing, so
    only its ``checked_out`` (connections in use right now) is meaningful.
    """
    engine = engine or get_engine()
    pool = engine.pool
    if isinstance(pool, QueuePool):
        return {
            "pool": type(pool).__name__,
            "size": pool.size(),
            "checked_out": pool.checkedout(),
            "overflow": max(0, pool.overflow()),
            "checked_in": pool.checkedin(),
            "max_overflow": pool._max_overflow,  # QueuePool has no public accessor for it
            "timeout": pool.timeout(),
        }
    gauge = _checkout_gauges.get(engine)
    return {
        "pool": type(pool).__name__,
        "size": 0,
        "checked_out": gauge.count if gauge else 0,
        "overflow": 0,
        "checked_in": 0,
        "max_overflow": 0,
        "timeout": 0.0,
    }


def ping(timeout: float = 1.0) -> None:
    """Round-trip ``SELECT 1`` within ``timeout`` seconds, else raise ``DatabaseUnavailable``.

    For ``/readyz``: the query runs in a helper thread so the caller never waits the full
    pool timeout, and concurrent pings share one query, so a hung database never piles up
    more than one waiting thread per process.
    """
    global _ping_in_flight
    engine = get_engine()
    with _ping_lock:
        if _ping_in_flight is None or _ping_in_flight.done():
            _ping_in_flight = _start_ping(engine)
        in_flight = _ping_in_flight
    try:
        in_flight.result(timeout=timeout)
    except FutureTimeout:
        raise DatabaseUnavailable(
            f"database did not answer SELECT 1 within {timeout}s (pool: {pool_status(engine)})"
        ) from None


def _start_ping(engine: Engine) -> Future:
    result: Future = Future()

    def run() -> None:
        try:
            with _translate_errors(engine), engine.connect() as connection:
                connection.execution_options(**{SQLITE_DEFERRED: True})
                connection.exec_driver_sql("SELECT 1").scalar()
                connection.rollback()  # end the read transaction before probing for writes
                _check_writable(connection)
        except BaseException as exc:  # handed to every waiting caller
            result.set_exception(exc)
        else:
            result.set_result(None)

    threading.Thread(target=run, name="database-ping", daemon=True).start()
    return result


_ping_lock = threading.Lock()
_ping_in_flight: Future | None = None


def _check_writable(connection: Connection) -> None:
    """Raise ``DatabaseUnavailable`` if the store answers but cannot take a payment.

    ``SELECT 1`` succeeds on a PostgreSQL standby and on a read-only SQLite file, where
    every payment would fail. SQLite: take the write lock without waiting for it (busy
    means another writer holds it, which proves the file is writable), write the header
    unchanged inside the transaction, and roll it back.
    """
    if connection.dialect.name == "postgresql":
        if connection.exec_driver_sql("SHOW transaction_read_only").scalar() == "on":
            raise DatabaseUnavailable("database is read-only (a standby, or read-only mode)")
        return
    raw = connection.connection.driver_connection
    assert raw is not None  # a checked-out connection always has its driver connection
    timeout = raw.execute("PRAGMA busy_timeout").fetchone()[0]
    raw.execute("PRAGMA busy_timeout = 0")
    try:
        version = raw.execute("PRAGMA user_version").fetchone()[0]
        raw.execute("BEGIN IMMEDIATE")
        try:
            raw.execute(f"PRAGMA user_version = {int(version)}")  # a write, rolled back
        finally:
            raw.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise DatabaseUnavailable(f"SQLite database is not writable: {exc}") from exc
    finally:
        raw.execute(f"PRAGMA busy_timeout = {int(timeout)}")


# 3. The per-process engine and fork safety ---------------------------------------------

_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """The process's engine, built from ``settings.get_settings()`` on first use.

    Built under a lock: the many threads of a freshly forked worker get one engine
    (and one pool), not one each.
    """
    global _engine
    engine = _engine
    if engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = build_engine(settings.get_settings())
            engine = _engine
    return engine


def configure_engine(config: settings.Settings) -> Engine:
    """Replace the process's engine with one built from ``config`` (tests and tools)."""
    global _engine, _ping_in_flight
    engine = build_engine(config)
    with _engine_lock:
        previous, _engine = _engine, engine
        _ping_in_flight = None  # a ping of the previous engine answers for that one only
    if previous is not None:
        previous.dispose()
    return engine


def dispose_engine() -> None:
    """Close the process's pooled connections; the next use builds a fresh engine."""
    global _engine, _ping_in_flight
    with _engine_lock:
        previous, _engine = _engine, None
        _ping_in_flight = None
    if previous is not None:
        previous.dispose()


def reset_after_fork() -> None:
    """In a forked child: drop the parent's pool without touching its connections.

    Runs automatically after ``os.fork()``; gunicorn's ``post_fork`` also calls it.
    Idempotent. ``dispose(close=False)`` leaves the sockets to the parent (closing them
    here would end the parent's sessions); the child opens its own on first use. Locks
    are replaced because another parent thread may have held one at the fork.
    """
    global _engine_lock, _ping_lock, _ping_in_flight
    _engine_lock = threading.Lock()
    _ping_lock = threading.Lock()
    _ping_in_flight = None
    if _engine is not None:
        _engine.dispose(close=False)
        gauge = _checkout_gauges.get(_engine)
        if gauge is not None:
            gauge.reset()


os.register_at_fork(after_in_child=reset_after_fork)


# 4. Building engines --------------------------------------------------------------------

_built_with: weakref.WeakKeyDictionary[Engine, settings.Settings] = weakref.WeakKeyDictionary()


def build_engine(config: settings.Settings) -> Engine:
    """A new engine for ``config.database_url`` (PostgreSQL or a SQLite file)."""
    url = make_url(config.database_url)
    backend = url.get_backend_name()
    if backend == "postgresql":
        engine = _build_postgres_engine(config, url)
    elif backend == "sqlite":
        engine = _build_sqlite_engine(config, url)
    else:
        raise settings.ConfigError(f"DATABASE_URL: unsupported database {backend!r}")
    _built_with[engine] = config
    return engine


def _pool_arguments(config: settings.Settings) -> dict:
    if config.db_pool == "null":
        return {"poolclass": NullPool}
    return {
        "poolclass": QueuePool,
        "pool_size": config.db_pool_size,
        "max_overflow": config.db_max_overflow,
        "pool_timeout": config.db_pool_timeout,
        "pool_recycle": config.db_pool_recycle,
        "pool_pre_ping": True,  # a server restart or idle cut costs one probe, not a 503
        "pool_use_lifo": True,  # idle extras age out instead of all staying warm
    }


def _build_postgres_engine(config: settings.Settings, url) -> Engine:
    """QueuePool with bounded connect and statement times; NullPool behind PgBouncer.

    PgBouncer rejects the ``options`` startup parameter, so with ``DB_POOL=null`` the
    statement timeout is set per transaction (``SET LOCAL``) instead.
    """
    connect_args = {
        "connect_timeout": config.db_connect_timeout,
        "application_name": APPLICATION_NAME,
        **TCP_KEEPALIVES,
    }
    behind_pgbouncer = config.db_pool == "null"
    if not behind_pgbouncer:
        connect_args["options"] = f"-c statement_timeout={config.db_statement_timeout_ms}"
    engine = create_engine(url, connect_args=connect_args, **_pool_arguments(config))
    if behind_pgbouncer:
        _track_checkouts(engine)
        if config.db_statement_timeout_ms:
            statement = f"SET LOCAL statement_timeout = {int(config.db_statement_timeout_ms)}"
            event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(statement))
    return engine


def _build_sqlite_engine(config: settings.Settings, url) -> Engine:
    """A SQLite file shared by the threads and worker processes of one host.

    WAL lets readers run beside the one writer; the busy timeout makes a writer wait
    for the lock instead of failing. Transactions begin IMMEDIATE (take the write lock
    up front): a DEFERRED transaction that reads and then writes fails at once with
    "database is locked" when another writer got in between, whatever the timeout.
    """
    if url.database in (None, "", ":memory:"):
        raise settings.ConfigError("DATABASE_URL: use a SQLite file, not an in-memory database")
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": config.db_pool_timeout},
        **_pool_arguments(config),
    )
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    if config.db_pool == "null":
        _track_checkouts(engine)
    return engine


def _configure_sqlite_connection(dbapi_connection, _record) -> None:
    # sqlite3 must not issue its own BEGIN: _begin_sqlite_transaction does.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    deferred = connection.get_execution_options().get(SQLITE_DEFERRED, False)
    connection.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")


class _CheckoutGauge:
    """Connections a NullPool has handed out and not yet taken back."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start from zero with a fresh lock (after fork, the parent's counts mean nothing)."""
        self.count = 0
        self._lock = threading.Lock()

    def add(self, delta: int) -> None:
        with self._lock:
            self.count += delta


_checkout_gauges: weakref.WeakKeyDictionary[Engine, _CheckoutGauge] = weakref.WeakKeyDictionary()


def _track_checkouts(engine: Engine) -> None:
    gauge = _checkout_gauges[engine] = _CheckoutGauge()
    event.listen(engine, "checkout", lambda *_: gauge.add(1))
    event.listen(engine, "checkin", lambda *_: gauge.add(-1))


# 5. Schema -------------------------------------------------------------------------------

PAYMENT_STATUSES = tuple(status.value for status in PaymentStatus)
REFUND_STATES = tuple(state.value for state in RefundState)
ATTEMPT_KINDS = ("charge", "lookup")
REFUND_ATTEMPT_KINDS = ("refund", "lookup")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """``DateTime(timezone=True)`` that reads back aware UTC datetimes on every backend.

    SQLite stores no offset, so values are written in UTC and the zone re-attached on
    read. Naive datetimes are taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


#: A partial index's rows: those reconciliation may still claim.
UNSETTLED_ONLY: dict[str, Any] = {
    f"{dialect}_where": text("status IN ('pending', 'unknown')")
    for dialect in ("postgresql", "sqlite")
}

#: No set of refunds can hold more than the payment's amount, or count as refunded more
#: than they hold: the database itself keeps the ceiling, whatever the code does.
REFUND_CEILING = (
    "0 <= amount_refunded_minor AND amount_refunded_minor <= refund_reserved_minor "
    "AND refund_reserved_minor <= amount_minor"
)


# BigInteger on PostgreSQL; SQLite autoincrements only an INTEGER PRIMARY KEY.
_serial = BigInteger().with_variant(Integer, "sqlite")

payments = Table(
    "payments",
    metadata,
    Column("id", String(40), primary_key=True),  # "pay_" + 24 hex, chosen by the caller
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("transaction_id", String(255), nullable=False, index=True),
    Column("request_fingerprint", String(64), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("payment_method", String(64), nullable=False),
    Column("description", Text),
    Column("metadata_json", Text),
    Column("status", String(16), nullable=False),
    Column("provider_charge_id", String(255)),
    Column("failure_code", String(64)),
    Column("failure_message", Text),
    Column("attempts", Integer, nullable=False, default=0, server_default=text("0")),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    # The time of the last status change (set by every change, not by leases or attempts).
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
    Column("reconcile_lease_until", UTCDateTime),
    # Bumped by every status change: a reconciler settles only the version it looked up.
    Column("version", Integer, nullable=False, default=0, server_default=text("0")),
    # The refund ceiling: refunds that are or may be moving money (pending, unknown,
    # succeeded) hold their amount here; only a conditional UPDATE adds to it.
    Column("refund_reserved_minor", BigInteger, nullable=False, server_default=text("0")),
    Column("amount_refunded_minor", BigInteger, nullable=False, server_default=text("0")),
    CheckConstraint("amount_minor > 0", name="amount_positive"),
    CheckConstraint(_one_of("status", PAYMENT_STATUSES), name="status_valid"),
    CheckConstraint(REFUND_CEILING, name="refunds_within_amount"),
    Index(None, "status", "updated_at"),
    # Reconciliation's claims, oldest first: only the rows still waiting, so a backlog of
    # unsettled ones never makes a claim sort them all (docs/BENCHMARKS.md).
    Index("ix_payments_unsettled", "updated_at", "id", **UNSETTLED_ONLY),
)

refunds = Table(
    "refunds",
    metadata,
    Column("id", String(40), primary_key=True),  # "ref_" + 24 hex
    Column("payment_id", String(40), ForeignKey("payments.id"), nullable=False, index=True),
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("request_fingerprint", String(64), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("reason", Text),
    Column("metadata_json", Text),
    Column("status", String(16), nullable=False),
    Column("provider_refund_id", String(255)),
    Column("failure_code", String(64)),
    Column("failure_message", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("reconcile_lease_until", UTCDateTime),
    Column("version", Integer, nullable=False, server_default=text("0")),
    CheckConstraint("amount_minor > 0", name="amount_positive"),
    CheckConstraint(_one_of("status", REFUND_STATES), name="status_valid"),
    Index(None, "status", "updated_at"),
    Index("ix_refunds_unsettled", "updated_at", "id", **UNSETTLED_ONLY),
)


def _audit_tables(
    owner: str, kinds: tuple[str, ...], states: tuple[str, ...]
) -> tuple[Table, Table]:
    """``<owner>_attempts`` (every provider request) and ``<owner>_events`` (every status
    change) of ``<owner>s``: the audit trail, never updated or deleted."""

    def owner_id() -> Column:
        return Column(
            f"{owner}_id", String(40), ForeignKey(f"{owner}s.id"), nullable=False, index=True
        )

    attempts = Table(
        f"{owner}_attempts",
        metadata,
        Column("id", _serial, primary_key=True, autoincrement=True),
        owner_id(),
        Column("kind", String(16), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("started_at", UTCDateTime, nullable=False),
        Column("duration_ms", Integer, nullable=False),
        Column("http_status", Integer),
        Column("error", String(255)),
        Column("outcome", String(32), nullable=False),
        CheckConstraint(_one_of("kind", kinds), name="kind_valid"),
    )
    events = Table(
        f"{owner}_events",
        metadata,
        Column("id", _serial, primary_key=True, autoincrement=True),
        owner_id(),
        Column("at", UTCDateTime, nullable=False, default=utcnow),
        Column("from_status", String(16)),
        Column("to_status", String(16), nullable=False),
        Column("reason", String(255)),
        CheckConstraint(_one_of("to_status", states), name="to_status_valid"),
    )
    return attempts, events


provider_events = Table(
    "provider_events",
    metadata,
    Column("id", _serial, primary_key=True, autoincrement=True),
    Column("provider", String(16), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("type", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),  # when the provider made it
    Column("received_at", UTCDateTime, nullable=False),
    Column("event_json", Text, nullable=False),  # the verified event, in neutral terms
    # NULL until applied: applied, stale, unknown or ignored (EventResult).
    Column("result", String(16)),
    Column("applied_at", UTCDateTime),
    UniqueConstraint("provider", "event_id"),  # a redelivery is stored once
    Index(None, "result", "received_at"),  # events a crash left unapplied
)

payment_attempts, payment_events = _audit_tables("payment", ATTEMPT_KINDS, PAYMENT_STATUSES)
refund_attempts, refund_events = _audit_tables("refund", REFUND_ATTEMPT_KINDS, REFUND_STATES)


def run_migrations(database_url: str | None = None) -> None:
    """``alembic upgrade head`` for ``database_url`` (default: the configured one)."""
    # Imported here: Alembic logs its plugin set-up on import, in every worker otherwise.
    from alembic import command
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url or settings.get_settings().database_url
    command.upgrade(config, "head")
