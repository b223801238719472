"""The SQL refund store keeps the refund contract on PostgreSQL and on SQLite."""

from __future__ import annotations

import pytest

import database_config
from payment_store import SqlPaymentStore
from refund_store import SqlRefundStore
from tests.support.postgres import temporary_database
from tests.support.refund_store_contract import *  # noqa: F403 - the contract's tests
from tests.support.store_contract import wall


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def refund_contract(request, tmp_path, fake_clock, configure_payments):
    clock = wall(fake_clock)
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'payments.db'}"
        database_config.run_migrations(url)
        configure_payments(database_url=url)
        yield SqlPaymentStore(clock=clock), SqlRefundStore(clock=clock), fake_clock
    else:
        with temporary_database() as url:
            database_config.run_migrations(url)
            configure_payments(database_url=url)
            yield SqlPaymentStore(clock=clock), SqlRefundStore(clock=clock), fake_clock
            database_config.dispose_engine()
