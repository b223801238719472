"""The breaker's shared state in a real Redis, and its fallback when Redis is gone."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from circuit_breaker import RedisCircuitBreaker, build_breaker
from errors import PaymentServiceUnavailable


def fail_times(breaker, n):
    for _ in range(n):
        breaker.before_call()
        breaker.record_failure()


@pytest.fixture
def redis_client():
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client):
    prefix = f"test:breaker:{uuid.uuid4().hex}"
    yield prefix
    for key in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(key)


def test_redis_state_is_shared_between_breakers(redis_client, prefix):
    """Two workers (two breaker objects) share one state through Redis."""
    worker_a = RedisCircuitBreaker(redis_client, 3, 0.5, prefix=prefix)
    worker_b = RedisCircuitBreaker(redis_client, 3, 0.5, prefix=prefix)
    fail_times(worker_a, 2)
    fail_times(worker_b, 1)
    assert worker_a.state == worker_b.state == "open"
    with pytest.raises(PaymentServiceUnavailable) as info:
        worker_b.before_call()
    assert 0 < info.value.retry_after <= 0.5

    deadline = time.monotonic() + 3
    while worker_a.state == "open" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker_b.refusal() is None
    worker_a.before_call()  # the one trial
    assert worker_b.refusal() is not None
    with pytest.raises(PaymentServiceUnavailable):
        worker_b.before_call()
    worker_a.record_success()
    assert worker_b.state == "closed"
    worker_b.before_call()


def test_redis_down_falls_back_to_the_local_breaker(caplog):
    dead = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    breaker = RedisCircuitBreaker(dead, 2, 30, prefix="x")
    fail_times(breaker, 2)
    with pytest.raises(PaymentServiceUnavailable):
        breaker.before_call()
    warnings = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(warnings) == 1  # one warning, not one per call


def test_build_breaker_uses_redis_without_client_retries(make_settings):
    breaker = build_breaker(make_settings(redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(breaker, RedisCircuitBreaker)
    started = time.monotonic()
    for _ in range(50):
        breaker.before_call()
        breaker.record_success()
    assert time.monotonic() - started < 2  # a dead Redis costs one failed connect, not 50
