"""The SQL store keeps the store contract on PostgreSQL and on the embedded SQLite file."""

from __future__ import annotations

import pytest

import database_config
from payment_store import SqlPaymentStore
from tests.support.postgres import temporary_database
from tests.support.store_contract import *  # noqa: F403 - the contract's tests
from tests.support.store_contract import wall


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def contract(request, tmp_path, fake_clock, configure_payments):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'payments.db'}"
        database_config.run_migrations(url)
        configure_payments(database_url=url)
        yield SqlPaymentStore(clock=wall(fake_clock)), fake_clock
    else:
        with temporary_database() as url:
            database_config.run_migrations(url)
            configure_payments(database_url=url)
            yield SqlPaymentStore(clock=wall(fake_clock)), fake_clock
            database_config.dispose_engine()
