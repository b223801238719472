"""Unit tests start no process and open no socket: both are refused here, not just avoided."""

from __future__ import annotations

import subprocess

import pytest
from pytest_socket import disable_socket, enable_socket


def _refuse_process(*args, **kwargs):
    raise RuntimeError("unit tests start no process: move this test to tests/integration")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    disable_socket(allow_unix_socket=False)
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse_process)
    yield
    enable_socket()
