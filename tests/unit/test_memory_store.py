"""The in-memory store the lifecycle tests use keeps the store contract."""

from __future__ import annotations

import pytest

from tests.support.memory_store import MemoryPaymentStore
from tests.support.store_contract import *  # noqa: F403 - the contract's tests
from tests.support.store_contract import wall


@pytest.fixture
def contract(fake_clock):
    return MemoryPaymentStore(clock=wall(fake_clock)), fake_clock
