"""The breaker: opens, fails fast, lets one trial through, never serializes calls."""

from __future__ import annotations

import threading

import pytest

from circuit_breaker import CircuitBreaker
from errors import PaymentServiceUnavailable


def fail_times(breaker, n):
    for _ in range(n):
        breaker.before_call()
        breaker.record_failure()


def test_opens_after_threshold_consecutive_failures(fake_clock):
    breaker = CircuitBreaker(3, 10, clock=fake_clock)
    fail_times(breaker, 2)
    breaker.before_call()
    breaker.record_success()  # a success resets the count
    fail_times(breaker, 2)
    assert breaker.state == "closed"
    fail_times(breaker, 1)
    assert breaker.state == "open"


def test_open_breaker_fails_fast_with_retry_after(fake_clock):
    clock = fake_clock
    breaker = CircuitBreaker(1, 10, clock=clock)
    fail_times(breaker, 1)
    clock.now += 4
    with pytest.raises(PaymentServiceUnavailable) as info:
        breaker.before_call()
    assert info.value.code == "breaker_open"
    assert info.value.retry_after == pytest.approx(6)


def test_half_open_lets_exactly_one_trial_through(fake_clock):
    clock = fake_clock
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


def test_refusal_reports_without_taking_the_trial(fake_clock):
    clock = fake_clock
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


def test_failed_trial_opens_again_for_a_full_period(fake_clock):
    clock = fake_clock
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
