"""A Redis index of a test's own for the shared circuit breaker, empty before and after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

#: The breaker's keys are fixed (``circuit_breaker.RedisCircuitBreaker``), so each test
#: module that shares a breaker through Redis uses a database index of its own.
BREAKER_KEYS = "payments:breaker:*"
BREAKER_OPEN_KEY = "payments:breaker:open_until"


@contextmanager
def breaker_redis(url: str) -> Iterator[redis.Redis]:
    """A client for ``url`` with no breaker keys in it; skips the test when Redis is down."""
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"Redis is not running at {url}")

    def clear():
        for key in client.scan_iter(BREAKER_KEYS):
            client.delete(key)

    clear()
    try:
        yield client
    finally:
        clear()
        client.close()
