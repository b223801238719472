"""Fixtures of the fault suite: one sandbox process per module, services per test."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from tests.faults.harness import PROVIDER_KEY, Service, running_service
from tests.support.sandbox import SandboxProcess


@pytest.fixture(scope="module")
def provider_process():
    """The sandbox provider, expecting the suite's distinctive provider key."""
    with SandboxProcess(api_key=PROVIDER_KEY) as process:
        yield process


@pytest.fixture
def sandbox(provider_process):
    """The sandbox with an empty ledger, zeroed counters and no faults (before and after)."""
    provider_process.reset()
    yield provider_process
    provider_process.reset()  # frees requests a scenario left hanging


@pytest.fixture
def start_service(sandbox):
    """Start gunicorn services on fresh databases; all are stopped when the test ends."""
    with ExitStack() as stack:

        def start(**kwargs) -> Service:
            return stack.enter_context(running_service(sandbox, **kwargs))

        yield start
