"""A private PgBouncer in transaction pooling mode in front of one test database.

Each instance gets a generated ini in a directory of its own, a free loopback port and
no Unix socket, so it shares nothing with a PgBouncer the machine may run. Clients log
in without a password (``auth_type = trust``, the user listed in the instance's
``auth_file``); PgBouncer reaches PostgreSQL as the tests do (``postgres`` over loopback).
PgBouncer refuses to run as root, so as root it is started with ``-u postgres`` and its
directory is handed to that user. Start-up waits, with a deadline, until a query goes
through it; no fixed sleeps.

The database keeps its name behind PgBouncer, so helpers that derive a database name
from a URL (``pg_stat_activity`` queries, for instance) work with either URL.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy.engine import make_url

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
PORT_ATTEMPTS = 3
#: Where Debian puts it (``/usr/sbin`` is not on every user's PATH).
DEBIAN_BINARY = "/usr/sbin/pgbouncer"
#: The user PgBouncer switches to when the tests run as root.
UNPRIVILEGED_USER = "postgres"


class PgBouncerError(RuntimeError):
    """PgBouncer did not start, or did not stop in time."""


def pgbouncer_binary() -> str:
    """The pgbouncer executable; skips the test when it is not installed."""
    found = shutil.which("pgbouncer") or (DEBIAN_BINARY if os.path.exists(DEBIAN_BINARY) else None)
    if found is None:
        pytest.skip("pgbouncer is not installed (scripts/ensure_services.sh installs it)")
    return found


class PgBouncerProcess:
    """One PgBouncer in front of the PostgreSQL database of ``database_url``.

    ``pool_size`` is ``default_pool_size``: server connections per database and user, the
    pool that transactions share. ``settings`` are more ``[pgbouncer]`` lines (e.g.
    ``query_wait_timeout=1``). ``url`` is ``database_url`` with PgBouncer's host and
    port; ``admin`` runs a command on PgBouncer's admin console (``SHOW POOLS``). Use as a
    context manager or call ``start``/``stop``.
    """

    def __init__(self, database_url: str, *, pool_size: int = 4, **settings):
        self.server = make_url(database_url)
        self.pool_size = pool_size
        self.settings: dict[str, object] = {
            "pool_mode": "transaction",
            "default_pool_size": pool_size,
            "max_client_conn": 200,
            # Seconds a transaction waits for a server connection before PgBouncer drops
            # the client: like DB_POOL_TIMEOUT (PgBouncer's own default is 120).
            "query_wait_timeout": 5,
            # A failed server login is retried after this many seconds (default 15).
            "server_login_retry": 1,
            "server_connect_timeout": 3,
            **settings,
        }
        self.port: int | None = None
        self.returncode: int | None = None
        self._directory: Path | None = None
        self._process: subprocess.Popen | None = None
        self._log = None
        self._final_log: str | None = None

    def __enter__(self) -> PgBouncerProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def database(self) -> str:
        return self.server.database

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the database through PgBouncer."""
        bounced = self.server.set(host="127.0.0.1", port=self.port)
        return bounced.render_as_string(hide_password=False)

    def start(self, timeout: float = START_TIMEOUT_S) -> PgBouncerProcess:
        """Write the configuration, spawn PgBouncer, return once a query goes through it."""
        binary = pgbouncer_binary()
        self._directory = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        as_root = os.geteuid() == 0
        if as_root:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self._directory, user.pw_uid, user.pw_gid)
        (self._directory / "userlist.txt").write_text(f'"{self.server.username}" ""\n')
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives until stop()
        for attempt in range(PORT_ATTEMPTS):
            self.port = _free_port()
            (self._directory / "pgbouncer.ini").write_text(self._ini())
            command = [binary, *(["-u", UNPRIVILEGED_USER] if as_root else [])]
            self._process = subprocess.Popen(
                [*command, str(self._directory / "pgbouncer.ini")],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
            )
            try:
                self._wait_ready(time.monotonic() + timeout)
                return self
            except PgBouncerError:
                lost_port = "Address already in use" in self.log
                self._terminate()
                if not lost_port or attempt == PORT_ATTEMPTS - 1:
                    self.stop()
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _ini(self) -> str:
        server = self.server
        target = (
            f"host={server.host or '127.0.0.1'} port={server.port or 5432} "
            f"dbname={server.database} user={server.username}"
        )
        lines = [
            "[databases]",
            f"{server.database} = {target}",
            "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self._directory / 'userlist.txt'}",
            f"admin_users = {server.username}",
            f"pidfile = {self._directory / 'pgbouncer.pid'}",
        ]
        lines += [f"{name} = {value}" for name, value in self.settings.items()]
        return "\n".join(lines) + "\n"

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self._process.poll() is not None:
                raise PgBouncerError(f"pgbouncer exited at start:\n{self.log[-3000:]}")
            try:
                connection = psycopg2.connect(self._dsn(self.database), connect_timeout=1)
                try:
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT 1")
                finally:
                    connection.close()
                return
            except psycopg2.Error:
                pass
            if time.monotonic() > deadline:
                raise PgBouncerError(f"no query went through pgbouncer:\n{self.log[-3000:]}")
            time.sleep(POLL_INTERVAL_S)

    def _dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={database} user={self.server.username}"

    def admin(self, command: str) -> list[dict]:
        """Rows of an admin console command, e.g. ``SHOW POOLS`` (this database's only)."""
        connection = psycopg2.connect(self._dsn("pgbouncer"), connect_timeout=2)
        connection.autocommit = True  # the console has no transactions
        try:
            with connection.cursor() as cursor:
                cursor.execute(command)
                if cursor.description is None:
                    return []
                names = [column.name for column in cursor.description]
                rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            connection.close()
        return [row for row in rows if row.get("database", self.database) == self.database]

    def pool(self) -> Mapping[str, object]:
        """This database's row of ``SHOW POOLS`` (client and server connection counts)."""
        (row,) = self.admin("SHOW POOLS")
        return row

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        self.returncode = process.returncode

    def stop(self) -> int | None:
        """Stop PgBouncer (SIGTERM, then SIGKILL) and remove its directory."""
        self._terminate()
        if self._log is not None:
            self._final_log = self.log
            self._log.close()
            self._log = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
        return self.returncode

    @property
    def log(self) -> str:
        """What PgBouncer logged so far (also after ``stop``)."""
        if self._log is None:
            return self._final_log or ""
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def _free_port() -> int:
    """A loopback port nothing listens on now (PgBouncer binds it itself: a lost race is
    retried by ``start``)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
