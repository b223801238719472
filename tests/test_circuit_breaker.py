"""The breaker: opens, fails fast, lets one trial through, never serializes calls."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from circuit_breaker import CircuitBreaker, RedisCircuitBreaker, build_breaker
from errors import PaymentServiceUnavailable


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def fail_times(breaker, n):
    for _ in range(n):
        breaker.before_call()
        breaker.record_failure()


def test_opens_after_threshold_consecutive_failures():
    breaker = CircuitBreaker(3, 10, clock=Clock())
    fail_times(breaker, 2)
    breaker.before_call()
    breaker.record_success()  # a success resets the count
    fail_times(breaker, 2)
    assert breaker.state == "closed"
    fail_times(breaker, 1)
    assert breaker.state == "open"


def test_open_breaker_fails_fast_with_retry_after():
    clock = Clock()
    breaker = CircuitBreaker(1, 10, clock=clock)
    fail_times(breaker, 1)
    clock.now += 4
    with pytest.raises(PaymentServiceUnavailable) as info:
        breaker.before_call()
    assert info.value.code == "breaker_open"
    assert info.value.retry_after == pytest.approx(6)


def test_open_check_costs_well_under_a_millisecond():
    breaker = CircuitBreaker(1, 60)
    fail_times(breaker, 1)
    n = 2000
    started = time.perf_counter()
    for _ in range(n):
        with pytest.raises(PaymentServiceUnavailable):
            breaker.before_call()
    assert (time.perf_counter() - started) / n < 0.0005


def test_half_open_lets_exactly_one_trial_through():
    clock = Clock()
    breaker = CircuitBreaker(1, 10, clock=clock)
    fail_times(breaker, 1)
    clock.now += 10
    assert breaker.state == "half_open"
    breaker.before_call()  # the trial
    with pytest.raises(PaymentServiceUnavailable):
        breaker.before_call()  # everyone else still fails fast
    breaker.record_success()
    assert breaker.state == "closed"
    breaker.before_call()


def test_refusal_reports_without_taking_the_trial():
    clock = Clock()
    breaker = CircuitBreaker(1, 10, clock=clock)
    assert breaker.refusal() is None
    fail_times(breaker, 1)
    assert breaker.refusal().retry_after == pytest.approx(10)
    clock.now += 10
    assert breaker.refusal() is None  # half-open, trial slot free ...
    breaker.before_call()  # ... still free for the real call
    assert breaker.refusal() is not None  # trial in flight: everyone else is refused
    breaker.record_success()
    assert breaker.refusal() is None


def test_failed_trial_opens_again_for_a_full_period():
    clock = Clock()
    breaker = CircuitBreaker(1, 10, clock=clock)
    fail_times(breaker, 1)
    clock.now += 10
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 9
    with pytest.raises(PaymentServiceUnavailable):
        breaker.before_call()


def test_calls_are_not_serialized():
    """Sixteen 'provider calls' of 0.2 s each run at the same time through one breaker."""
    breaker = CircuitBreaker(5, 30)
    inside = 0
    peak = 0
    lock = threading.Lock()
    all_inside = threading.Barrier(16, timeout=5)

    def call():
        nonlocal inside, peak
        breaker.before_call()
        with lock:
            inside += 1
            peak = max(peak, inside)
        all_inside.wait()  # would time out if the breaker let one call in at a time
        with lock:
            inside -= 1
        breaker.record_success()

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak == 16


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
