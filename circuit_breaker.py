"""A circuit breaker for the provider that never serializes calls.

pybreaker's ``CircuitBreaker.call`` holds its lock for the whole wrapped call, so it
allows one provider call at a time per process (danielfm/pybreaker#3, #55). Here the
lock guards only the state change: ``before_call`` and ``record_*`` are a few
microseconds each and the provider call runs outside them, fully concurrent.

Closed: calls pass; ``failure_threshold`` consecutive failures open it. Open: calls fail
at once with ``PaymentServiceUnavailable`` (code ``breaker_open``) carrying
``retry_after``. After ``reset_timeout`` one trial call is let through (half-open): its
success closes the breaker, its failure opens it again.

With ``REDIS_URL`` set, :class:`RedisCircuitBreaker` keeps the state in Redis so every
worker and host shares one breaker; if Redis itself fails, it falls back to the local
breaker rather than failing payments.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from errors import PaymentServiceUnavailable
from settings import Settings

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
REDIS_RETRY_INTERVAL = 5.0  # seconds on the local breaker after a Redis error
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # for the metrics gauge


def _open_error(retry_after: float) -> PaymentServiceUnavailable:
    return PaymentServiceUnavailable(
        "payment provider circuit breaker is open after repeated failures",
        code="breaker_open",
        retry_after=max(retry_after, 0.001),
    )


class CircuitBreaker:
    """The per-process breaker.

    :param failure_threshold: consecutive failures that open it (``PAYMENT_BREAKER_FAILURES``).
    :param reset_timeout: seconds open before a trial call (``PAYMENT_BREAKER_RESET``).
    :param clock: monotonic time source, injectable for tests.
    """

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_started_at: float | None = None

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return CLOSED
            if self._clock() - self._opened_at < self.reset_timeout:
                return OPEN
            return HALF_OPEN

    def refusal(self) -> PaymentServiceUnavailable | None:
        """The error ``before_call`` would raise now, without taking the trial slot.

        Open, or half-open with another call making the trial: refused.
        """
        with self._lock:
            if self._opened_at is None:
                return None
            now = self._clock()
            waited = now - self._opened_at
            if waited < self.reset_timeout:
                return _open_error(self.reset_timeout - waited)
            trial = self._trial_started_at
            if trial is not None and now - trial < self.reset_timeout:
                return _open_error(1.0)
            return None

    def before_call(self) -> None:
        """Raise ``PaymentServiceUnavailable`` unless a call may go to the provider now."""
        with self._lock:
            if self._opened_at is None:
                return
            now = self._clock()
            waited = now - self._opened_at
            if waited < self.reset_timeout:
                raise _open_error(self.reset_timeout - waited)
            trial = self._trial_started_at
            if trial is not None and now - trial < self.reset_timeout:
                raise _open_error(1.0)  # another thread is making the trial call
            self._trial_started_at = now

    def record_success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                log.info("payment provider circuit breaker closed: trial call succeeded")
            self._failures = 0
            self._opened_at = None
            self._trial_started_at = None

    def record_failure(self) -> None:
        with self._lock:
            now = self._clock()
            if self._opened_at is not None:
                # A failed trial (or a call that started before opening): open again.
                if self._trial_started_at is not None:
                    self._opened_at, self._trial_started_at = now, None
                return
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._opened_at = now
                log.warning(
                    "payment provider circuit breaker opened after %d consecutive failures",
                    self._failures,
                    extra={"breaker_failures": self._failures},
                )


class RedisCircuitBreaker:
    """The same breaker with its state in Redis, shared by all workers and hosts.

    Keys (``prefix``): ``:failures`` consecutive-failure counter, ``:open_until`` epoch
    seconds while open, ``:trial`` the half-open trial lock (``SET NX PX``).
    """

    def __init__(
        self,
        client,
        failure_threshold: int,
        reset_timeout: float,
        *,
        prefix: str = "payments:breaker",
        fallback: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._redis = client
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._keys = {k: f"{prefix}:{k}" for k in ("failures", "open_until", "trial")}
        self._fallback = fallback or CircuitBreaker(failure_threshold, reset_timeout)
        self._clock = clock
        self._redis_failed = False
        self._skip_redis_until = 0.0

    def _use_redis(self) -> bool:
        """False for a while after Redis failed, so a dead Redis costs nothing per call."""
        return time.monotonic() >= self._skip_redis_until

    def _redis_ok(self) -> None:
        if self._redis_failed:
            self._redis_failed = False
            log.info("circuit breaker: Redis reachable again, using shared state")

    def _redis_down(self, exc: Exception) -> None:
        self._skip_redis_until = time.monotonic() + REDIS_RETRY_INTERVAL
        if not self._redis_failed:
            self._redis_failed = True
            log.warning(
                "circuit breaker: Redis unavailable (%s), using this process's breaker",
                type(exc).__name__,
            )

    @property
    def state(self) -> str:
        if not self._use_redis():
            return self._fallback.state
        try:
            open_until = self._redis.get(self._keys["open_until"])
        except Exception as exc:
            self._redis_down(exc)
            return self._fallback.state
        if open_until is None:
            return CLOSED
        return OPEN if self._clock() < float(open_until) else HALF_OPEN

    def refusal(self) -> PaymentServiceUnavailable | None:
        if not self._use_redis():
            return self._fallback.refusal()
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(self._keys["open_until"])
            pipe.exists(self._keys["trial"])
            open_until, trial = pipe.execute()
        except Exception as exc:
            self._redis_down(exc)
            return self._fallback.refusal()
        if open_until is None:
            return None
        remaining = float(open_until) - self._clock()
        if remaining > 0:
            return _open_error(remaining)
        return _open_error(1.0) if trial else None

    def before_call(self) -> None:
        if not self._use_redis():
            return self._fallback.before_call()
        try:
            open_until = self._redis.get(self._keys["open_until"])
            self._redis_ok()
            if open_until is None:
                return
            remaining = float(open_until) - self._clock()
            if remaining > 0:
                raise _open_error(remaining)
            ttl_ms = int(self.reset_timeout * 1000)
            if not self._redis.set(self._keys["trial"], "1", nx=True, px=ttl_ms):
                raise _open_error(1.0)
        except PaymentServiceUnavailable:
            raise
        except Exception as exc:
            self._redis_down(exc)
            self._fallback.before_call()

    def record_success(self) -> None:
        self._fallback.record_success()
        if not self._use_redis():
            return
        try:
            self._redis.delete(*self._keys.values())
        except Exception as exc:
            self._redis_down(exc)

    def record_failure(self) -> None:
        self._fallback.record_failure()
        if not self._use_redis():
            return
        try:
            pipe = self._redis.pipeline()
            pipe.incr(self._keys["failures"])
            pipe.pexpire(self._keys["failures"], int(self.reset_timeout * 10_000))
            pipe.get(self._keys["trial"])
            failures, _, trial = pipe.execute()
            if trial is not None or failures >= self.failure_threshold:
                open_until = self._clock() + self.reset_timeout
                ttl_ms = int(self.reset_timeout * 10_000)
                pipe = self._redis.pipeline()
                pipe.set(self._keys["open_until"], repr(open_until), px=ttl_ms)
                pipe.delete(self._keys["trial"], self._keys["failures"])
                pipe.execute()
                log.warning(
                    "payment provider circuit breaker opened (shared) after %d failures",
                    failures,
                    extra={"breaker_failures": failures},
                )
        except Exception as exc:
            self._redis_down(exc)


def build_breaker(settings: Settings) -> CircuitBreaker | RedisCircuitBreaker:
    """The breaker the settings ask for: shared through Redis when ``REDIS_URL`` is set."""
    local = CircuitBreaker(settings.payment_breaker_failures, settings.payment_breaker_reset)
    if not settings.redis_url:
        return local
    import redis  # only deployments with REDIS_URL need the client
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No client-side retries: a slow Redis must never slow a payment down.
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=0.25,
        socket_connect_timeout=0.25,
        retry=Retry(NoBackoff(), 0),
    )
    return RedisCircuitBreaker(
        client,
        settings.payment_breaker_failures,
        settings.payment_breaker_reset,
        fallback=local,
    )
