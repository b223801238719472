"""The in-memory store the lifecycle tests use keeps the store contract."""

from __future__ import annotations

import pytest

from tests.support.memory_store import MemoryPaymentStore, MemoryRefundStore
from tests.support.refund_store_contract import *  # noqa: F403
from tests.support.store_contract import *  # noqa: F403 - the contract's tests
from tests.support.store_contract import wall


@pytest.fixture
def contract(fake_clock):
    return MemoryPaymentStore(clock=wall(fake_clock)), fake_clock


@pytest.fixture
def refund_contract(fake_clock):
    payments = MemoryPaymentStore(clock=wall(fake_clock))
    return payments, MemoryRefundStore(payments), fake_clock
