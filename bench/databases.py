"""Fresh PostgreSQL databases for the bench, one per app and scenario, dropped at the end.

The schema is migrated once (the operators' command, in a child process) into a
template database; every app run then gets ``CREATE DATABASE ... TEMPLATE`` of it, an
empty migrated copy in a fraction of a second. The same server connection also polls
``pg_stat_activity`` for the connections an app holds.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench.procs import ROOT

SERVER_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432"
ADMIN_URL = f"{SERVER_URL}/postgres"
MIGRATE_TIMEOUT_S = 120
POLL_INTERVAL_S = 0.05


class Databases:
    """Creates ``pbench_<token>_*`` databases and drops every one of them on ``close``."""

    def __init__(self) -> None:
        self.prefix = f"pbench_{secrets.token_hex(4)}"
        self._admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self._created: list[str] = []
        self._template: str | None = None

    def __enter__(self) -> Databases:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def server_version(self) -> str:
        with self._admin.connect() as conn:
            return conn.exec_driver_sql("SHOW server_version").scalar()

    def fresh(self, label: str) -> tuple[str, str]:
        """A new migrated database: ``(name, url)``."""
        if self._template is None:
            self._template = self._create(f"{self.prefix}_template")
            url = f"{SERVER_URL}/{self._template}"
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"import database_config; database_config.run_migrations({url!r})",
                ],
                cwd=ROOT,
                check=True,
                timeout=MIGRATE_TIMEOUT_S,
                capture_output=True,
            )
        name = self._create(f"{self.prefix}_{len(self._created)}_{label}", template=self._template)
        return name, f"{SERVER_URL}/{name}"

    def _create(self, name: str, template: str | None = None) -> str:
        clause = f' TEMPLATE "{template}"' if template else ""
        with self._admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"{clause}')
        self._created.append(name)
        return name

    def payment_counts(self, name: str) -> dict[str, int]:
        """Stored payments by status."""
        engine = create_engine(f"{SERVER_URL}/{name}", poolclass=NullPool)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT status, count(*) FROM payments GROUP BY status"))
                return {status: count for status, count in rows}
        finally:
            engine.dispose()

    def refund_counts(self, name: str) -> dict:
        """Stored refunds by status, and how many payments they refund."""
        engine = create_engine(f"{SERVER_URL}/{name}", poolclass=NullPool)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT status, count(*) FROM refunds GROUP BY status"))
                statuses = {status: count for status, count in rows}
                payments = conn.execute(text("SELECT count(DISTINCT payment_id) FROM refunds"))
                return {"statuses": statuses, "payments_refunded": payments.scalar()}
        finally:
            engine.dispose()

    def analyze(self, name: str) -> None:
        """``ANALYZE`` database ``name`` (what autovacuum does to a table within a minute
        once a tenth of it changed)."""
        engine = create_engine(
            f"{SERVER_URL}/{name}", isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("ANALYZE")
        finally:
            engine.dispose()

    def succeeded_payment_ids(self, name: str) -> list[str]:
        """The ids of the ``succeeded`` payments, oldest first."""
        engine = create_engine(f"{SERVER_URL}/{name}", poolclass=NullPool)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT id FROM payments WHERE status = 'succeeded' ORDER BY created_at, id"
                    )
                )
                return [payment_id for (payment_id,) in rows]
        finally:
            engine.dispose()

    def activity_counts(self, name: str) -> dict[str, int]:
        """Database ``name``'s counters since the server started: transactions committed
        and rolled back, rows inserted, updated, fetched (and returned by scans), blocks.

        A backend adds its counts at most once a second and when it exits: read them
        after the app's connections are closed (:meth:`wait_for_no_backends`)."""
        with self._admin.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted,"
                " tup_fetched, tup_returned FROM pg_stat_database WHERE datname = %(name)s",
                {"name": name},
            ).one()
            return dict(row._mapping)

    def wait_for_no_backends(self, name: str, timeout: float = 10.0) -> bool:
        """Wait until no client is connected to database ``name``; False if one still is."""
        deadline = time.monotonic() + timeout
        while self.backend_pids(name):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    def block_counts(self, name: str) -> tuple[int, int]:
        """``(hit, read)``: blocks database ``name`` found in shared buffers, and read in
        (from the OS page cache or the disk), since the server started."""
        with self._admin.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT blks_hit, blks_read FROM pg_stat_database WHERE datname = %(name)s",
                {"name": name},
            ).one()
            return row[0], row[1]

    def backend_pids(self, name: str) -> list[int]:
        """Server processes serving clients of database ``name`` (for their CPU time)."""
        with self._admin.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT pid FROM pg_stat_activity WHERE datname = %(name)s"
                " AND backend_type = 'client backend'",
                {"name": name},
            )
            return [pid for (pid,) in rows]

    def close(self) -> None:
        with self._admin.connect() as conn:
            for name in reversed(self._created):
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._created.clear()
        self._admin.dispose()


class ActivityPoller:
    """Polls ``pg_stat_activity`` for one database every 50 ms in a thread.

    A backend is *in use* when it is not ``idle`` (running a statement or inside a
    transaction: a connection the app cannot hand out); *open* counts all of them.
    """

    def __init__(self, database: str, interval: float = POLL_INTERVAL_S):
        self.database = database
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-poller", daemon=True)
        self._engine = create_engine(ADMIN_URL, poolclass=NullPool)

    def __enter__(self) -> ActivityPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(10)
        self._engine.dispose()

    def peak(self, start: float, *, in_use: bool) -> int:
        """The most connections in use (or open) seen from ``start`` (epoch s) on."""
        column = 1 if in_use else 2
        return max((s[column] for s in self.samples if s[0] >= start), default=0)

    def _run(self) -> None:
        query = text(
            "SELECT count(*) FILTER (WHERE state <> 'idle'), count(*) FROM pg_stat_activity"
            " WHERE datname = :name AND backend_type = 'client backend'"
        )
        with self._engine.connect() as conn:
            while not self._stop.is_set():
                in_use, opened = conn.execute(query, {"name": self.database}).one()
                conn.rollback()  # a fresh snapshot of the statistics each time
                self.samples.append((time.time(), in_use, opened))
                self._stop.wait(self.interval)
