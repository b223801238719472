"""Shared fixtures: settings for tests, a clean process state, the sandbox and databases."""

from __future__ import annotations

import pytest

import connection_pool
import payment_handler
import settings as settings_module
from settings import Settings


@pytest.fixture
def make_settings():
    """Build a ``Settings`` from the defaults plus overrides, validated like the real thing."""

    def build(**overrides) -> Settings:
        return Settings().with_overrides(**overrides)

    return build


@pytest.fixture(autouse=True)
def _clean_process_state():
    """Every test starts and ends without a cached session, service or settings."""
    yield
    payment_handler.reset_payment_service()
    connection_pool.reset_session()
    settings_module.set_settings(None)
