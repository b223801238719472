"""Shared fixtures: settings for tests, a clean process state, the sandbox and databases."""

from __future__ import annotations

import pytest

import connection_pool
import payment_handler
import settings as settings_module
from settings import Settings


@pytest.fixture
def make_settings():
    """Build a ``Settings`` from the defaults plus overrides, validated like the real thing.

    Derived defaults follow the overrides (``gunicorn_threads=4`` sizes both pools).
    """

    def build(**overrides) -> Settings:
        return Settings(**overrides)

    return build


@pytest.fixture(autouse=True)
def _clean_process_state():
    """Every test starts and ends without a cached session, service or settings."""
    yield
    payment_handler.reset_payment_service()
    connection_pool.reset_session()
    settings_module.set_settings(None)


@pytest.fixture(scope="session")
def sandbox_process():
    """One real sandbox provider process for the whole run (reset before each test)."""
    from tests.support.sandbox import SandboxProcess

    with SandboxProcess() as process:
        yield process


@pytest.fixture
def sandbox(sandbox_process):
    """The sandbox with an empty ledger, zeroed counters and no faults."""
    sandbox_process.reset()
    yield sandbox_process
    sandbox_process.reset()  # frees requests a test left hanging


@pytest.fixture(scope="session")
def pg_url():
    """A throwaway PostgreSQL database, migrated to head, dropped after the run."""
    import database_config
    from tests.support.postgres import temporary_database

    with temporary_database() as url:
        database_config.run_migrations(url)
        yield url


@pytest.fixture
def configure_payments(make_settings):
    """Point the library (settings, engine, service) at a database and a provider."""
    import database_config

    def configure(**overrides) -> Settings:
        settings = make_settings(**overrides)
        settings_module.set_settings(settings)
        database_config.configure_engine(settings)
        payment_handler.reset_payment_service()
        connection_pool.reset_session()
        return settings

    yield configure
    database_config.dispose_engine()


@pytest.fixture
def unused_port():
    """A loopback port with nothing listening on it (connections are refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_clock():
    """A monotonic clock that moves only when the test (or an injected sleep) moves it."""
    from tests.support.clock import FakeClock

    return FakeClock()


@pytest.fixture
def restore_root_logging():
    """Give the root logger back its handlers and level (and stop a CloudWatch handler)."""
    import logging

    import logging_setup

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logging_setup.shutdown_logging(timeout=2.0)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def localstripe():
    """One localstripe process (a stateful fake of Stripe's API) for the whole run."""
    from tests.support.localstripe import LocalStripeProcess

    with LocalStripeProcess() as process:
        yield process


@pytest.fixture
def pgbouncer():
    """Start private PgBouncers (transaction pooling) in front of test databases.

    ``pgbouncer(database_url, pool_size=..., **ini_settings)`` returns a running
    :class:`tests.support.pgbouncer.PgBouncerProcess`; all are stopped when the test ends.
    Request this fixture before the services that use it, so they stop first.
    """
    from contextlib import ExitStack

    from tests.support.pgbouncer import PgBouncerProcess

    with ExitStack() as stack:

        def start(database_url: str, **settings) -> PgBouncerProcess:
            return stack.enter_context(PgBouncerProcess(database_url, **settings))

        yield start
