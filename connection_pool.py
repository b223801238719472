"""The outbound HTTP session to the payment provider: pooled, bounded, retried, deadlined.

One ``requests.Session`` per process (rebuilt after ``fork``), with an ``HTTPAdapter``
whose connection pool is the bulkhead: at most ``PAYMENT_POOL_MAXSIZE`` connections per
host, and a caller waits at most ``PAYMENT_POOL_TIMEOUT`` for a free one instead of
opening a connection that would be discarded ("Connection pool is full") or waiting
forever (requests never passes a pool timeout to urllib3, psf/requests#3825).

Retries are decided by a ``urllib3.util.Retry`` value chosen per request: a POST is
retried after a read error or a retryable status only when it carries an
``Idempotency-Key`` (the provider deduplicates on it). The loop lives here rather than
inside urllib3 because urllib3 has no wall-clock deadline and does not report attempts:
every attempt gets ``(connect, read)`` timeouts clamped to what is left of the deadline,
and is recorded so the caller can audit it. Those timeouts bound each socket operation,
not the answer (a provider that trickles a byte at a time never trips them), so
``deadline_watchdog`` shuts the socket of an attempt still running at the deadline. This
module never raises for transport failures; ``PaymentClient`` translates the returned
:class:`Exchange` into errors.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    EmptyPoolError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.util.retry import Retry

import deadline_watchdog
from deadline_watchdog import (
    AFTER_SENDING,
    DeadlineExceeded,
    WatchedHTTPConnection,
    WatchedHTTPSConnection,
    finish_attempt,
    watch_attempt,
)
from settings import Settings, get_settings

#: Statuses retried with the same Idempotency-Key (DESIGN.md section 5).
RETRYABLE_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
#: Seconds: an attempt is not started with less time than this left before the deadline.
MIN_ATTEMPT_TIME = 0.05
USER_AGENT = "payment-service/0.1 (+requests)"

# Error kinds of one attempt, in the language of urllib3's Retry.
CONNECT = "connect"  # the server did not receive the request
READ = "read"  # the request was sent; assume the server began processing it
TLS = "tls"  # certificate or handshake failure: a configuration problem, never retried
POOL_BUSY = "pool_busy"  # no free outbound connection within PAYMENT_POOL_TIMEOUT


if TYPE_CHECKING:
    _PoolBase = HTTPConnectionPool
else:
    _PoolBase = object


class _BoundedWaitMixin(_PoolBase):
    """A pool that waits ``pool_wait`` at most and binds connections to the watched attempt."""

    pool_wait: float

    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout=self.pool_wait if timeout is None else timeout)
        deadline_watchdog.bind_to_current_attempt(conn)
        return conn

    def _put_conn(self, conn) -> None:
        if deadline_watchdog.release(conn):
            conn.close()  # cut at the deadline: never reused
        super()._put_conn(conn)


def _bounded_pool_class(base: type[HTTPConnectionPool], pool_timeout: float) -> type:
    """A urllib3 pool class whose ``_get_conn`` waits at most ``pool_timeout`` by default."""
    connection_cls = (
        WatchedHTTPSConnection if issubclass(base, HTTPSConnectionPool) else WatchedHTTPConnection
    )
    return type(
        f"BoundedWait{base.__name__}",
        (_BoundedWaitMixin, base),
        {"pool_wait": pool_timeout, "ConnectionCls": connection_cls},
    )


class BoundedPoolAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` with a blocking pool of ``pool_maxsize`` and a bounded wait.

    :param pool_maxsize: connections kept (and allowed) per host: the bulkhead.
    :param pool_timeout: seconds to wait for a free connection before
        ``urllib3.exceptions.EmptyPoolError``.
    """

    __attrs__ = [*HTTPAdapter.__attrs__, "_pool_timeout"]  # kept when pickled

    def __init__(self, pool_maxsize: int, pool_timeout: float):
        self._pool_timeout = pool_timeout
        # max_retries: urllib3 never retries on its own; send_with_retries decides.
        super().__init__(
            pool_connections=4,
            pool_maxsize=pool_maxsize,
            pool_block=True,
            max_retries=Retry(0, read=False, redirect=False),
        )

    def init_poolmanager(self, connections, maxsize, block=True, **pool_kwargs):
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _bounded_pool_class(HTTPConnectionPool, self._pool_timeout),
            "https": _bounded_pool_class(HTTPSConnectionPool, self._pool_timeout),
        }


def build_session(settings: Settings) -> requests.Session:
    """A session for the provider: bounded pool, keep-alive, TLS verification always on.

    ``trust_env`` is off so requests does not re-read proxy and netrc settings on every
    call; the CA bundle (``REQUESTS_CA_BUNDLE``) is read once through the settings.
    """
    session = requests.Session()
    session.trust_env = False
    session.verify = settings.ca_bundle or True
    session.headers["User-Agent"] = USER_AGENT
    adapter = BoundedPoolAdapter(settings.payment_pool_maxsize, settings.payment_pool_timeout)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


_session_lock = threading.Lock()
_session: requests.Session | None = None


def get_session() -> requests.Session:
    """The process's provider session, built on first use (one per process)."""
    global _session
    if _session is None:
        with _session_lock:
            if _session is None:
                _session = build_session(get_settings())
    return _session


def reset_session() -> None:
    """Forget the session; the next call builds a new one (after fork, in tests).

    The inherited sockets are not closed here: after a fork they are shared with the
    parent, which is still using them.
    """
    global _session, _session_lock
    _session = None
    _session_lock = threading.Lock()


os.register_at_fork(after_in_child=reset_session)


class Bulkhead:
    """Counts this process's provider calls and refuses one at once when waiting is futile.

    The pool already bounds connections, and a caller waits ``patience``
    (``PAYMENT_POOL_TIMEOUT``) for a free one: right when the provider is fast, since a
    connection frees within milliseconds. When every connection is held by a call that
    has already run longer than that wait, the provider is stuck; a gthread worker that
    lets each new payment wait would tie up its remaining threads, 0.25 s at a time, and
    health checks would queue behind them. Then the call is refused without waiting.

    :param size: outbound connections (``PAYMENT_POOL_MAXSIZE``).
    :param patience: seconds a caller would wait for a connection.
    """

    def __init__(self, size: int, patience: float, *, clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.patience = patience
        self._clock = clock
        self._lock = threading.Lock()
        self._started: dict[object, float] = {}

    def is_saturated(self) -> bool:
        """Every connection is (most likely) held by a call older than ``patience``."""
        with self._lock:
            return self._saturated(self._clock())

    def _saturated(self, now: float) -> bool:
        if len(self._started) < self.size:
            return False
        # The oldest `size` calls are the ones holding connections; the rest are waiting.
        holders = sorted(self._started.values())[: self.size]
        return now - holders[-1] > self.patience

    def enter(self) -> object | None:
        """Register a call; ``None`` (nothing registered) when saturated."""
        now = self._clock()
        with self._lock:
            if self._saturated(now):
                return None
            token = object()
            self._started[token] = now
            return token

    def leave(self, token: object) -> None:
        with self._lock:
            self._started.pop(token, None)


def build_retry(settings: Settings, idempotent: bool) -> Retry:
    """The retry policy of one request.

    Connect errors are always safe to retry (nothing was sent). Read errors and
    retryable statuses are retried only for idempotent requests: a GET, or a POST that
    carries an Idempotency-Key. Backoff jitter is added by :func:`send_with_retries`
    (injectable), not by urllib3, so tests can pin it.
    """
    retries = settings.payment_max_retries
    return Retry(
        total=retries,
        connect=retries,
        read=retries if idempotent else 0,
        status=retries if idempotent else 0,
        other=0,
        redirect=False,
        allowed_methods=None if idempotent else Retry.DEFAULT_ALLOWED_METHODS,
        status_forcelist=RETRYABLE_STATUSES,
        backoff_factor=settings.payment_backoff_factor,
        respect_retry_after_header=True,
        raise_on_status=False,
    )


@dataclass(frozen=True)
class Attempt:
    """One request on the wire, as the audit trail records it."""

    number: int
    started_at: datetime
    duration: float
    status: int | None = None
    error: str | None = None
    error_kind: str | None = None
    timeout: float | None = None  # the timeout that expired, seconds

    @property
    def may_have_been_processed(self) -> bool:
        """Sent without an answer: assume the provider began processing it."""
        return self.error_kind == READ


@dataclass
class Exchange:
    """What happened to one logical request: the final response or error, and every attempt."""

    response: requests.Response | None = None
    error: Exception | None = None
    error_kind: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    gave_up: str | None = None  # "deadline", "retry_after_beyond_deadline", "exhausted"
    retry_after: float | None = None

    @property
    def may_have_been_processed(self) -> bool:
        return any(a.may_have_been_processed for a in self.attempts)


def classify_error(exc: Exception) -> str:
    """The kind of a transport error: CONNECT, READ, TLS or POOL_BUSY."""
    if isinstance(exc, EmptyPoolError):
        return POOL_BUSY
    if isinstance(exc, requests.exceptions.SSLError):
        return TLS
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return CONNECT
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return READ
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = exc.args[0] if exc.args else None
        if isinstance(reason, MaxRetryError):
            reason = reason.reason
        if isinstance(reason, (NewConnectionError, ConnectTimeoutError)):
            return CONNECT
        return READ  # reset or disconnect after the request went out
    return READ


def describe_error(exc: Exception) -> str:
    """A short, secret-free description of a transport error for logs and the audit row."""
    kind = classify_error(exc)
    reason = exc.args[0] if exc.args else exc
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    text = str(getattr(reason, "args", [reason])[-1] if isinstance(reason, Exception) else reason)
    return f"{kind}: {type(reason).__name__}: {text}"[:255]


def _retry_error_for(kind: str, url: str) -> Exception:
    if kind == CONNECT:
        return ConnectTimeoutError(url)
    return ReadTimeoutError(None, url, kind)  # type: ignore[arg-type]  # Retry reads the type only


def _deadline_error(kind: str, allowed: float, cause: Exception | None) -> Exception:
    """The error of an attempt the watchdog cut, as requests reports a timeout of that kind."""
    exceeded = DeadlineExceeded(f"no complete answer within the deadline ({allowed:.3f} s)")
    timeout = (
        requests.exceptions.ConnectTimeout if kind == CONNECT else requests.exceptions.ReadTimeout
    )
    error = timeout(exceeded)
    error.__cause__ = cause
    return error


def _retry_after(retry: Retry, response: requests.Response | None) -> float | None:
    """The server's ``Retry-After`` in seconds, or ``None`` (absent or unparseable)."""
    if response is None:
        return None
    try:
        return retry.get_retry_after(response.raw)
    except Exception:
        return None


def is_retryable(
    retry: Retry,
    method: str,
    response: requests.Response,
    hint: Callable[[requests.Response], bool | None] | None = None,
) -> bool:
    """Whether ``retry`` lets ``method`` be sent again after ``response``.

    ``hint`` is the provider's advice on this answer (Stripe's ``Stripe-Should-Retry``):
    ``True`` retries it as if its status were retryable, ``False`` never retries it,
    ``None`` leaves the decision to the status. The method rule and the retry budget
    apply either way, so a POST without an Idempotency-Key is never retried on a hint.
    """
    status = response.status_code
    has_retry_after = "Retry-After" in response.headers
    advice = hint(response) if hint is not None else None
    if advice is None:
        return retry.is_retry(method, status, has_retry_after)
    if not advice:
        return False
    return retry.new(status_forcelist={status}).is_retry(method, status, has_retry_after)


def default_jitter(backoff_factor: float) -> float:
    """Uniform jitter in ``[0, backoff_factor)`` so retrying clients do not stampede."""
    return random.uniform(0, backoff_factor)


def send_with_retries(
    session: requests.Session,
    method: str,
    url: str,
    *,
    retry: Retry,
    connect_timeout: float,
    read_timeout: float,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[float], float] = default_jitter,
    on_attempt: Callable[[Attempt], None] | None = None,
    retry_hint: Callable[[requests.Response], bool | None] | None = None,
    **kwargs,
) -> Exchange:
    """Send ``method url`` until it gets a final answer, ``retry`` is spent, or ``deadline``.

    ``deadline`` is a ``clock()`` value. Every attempt's connect and read timeouts are
    clamped to the time left; backoff and ``Retry-After`` sleeps never cross the
    deadline (a ``Retry-After`` that would is not waited for at all). An attempt still
    running at the deadline (a provider trickling its answer) is cut by the watchdog,
    which keeps real time whatever ``clock`` is: it is recorded as a timeout of the
    time it was allowed, ``READ`` once the request may have gone out, and the exchange
    gives up. ``retry_hint`` is the provider's own advice on an answer (see
    :func:`is_retryable`).
    """
    exchange = Exchange()
    number = 0
    while True:
        remaining = deadline - clock()
        if remaining < MIN_ATTEMPT_TIME:
            exchange.gave_up = "deadline"
            return exchange
        number += 1
        timeout = (min(connect_timeout, remaining), min(read_timeout, remaining))
        started_wall, started = datetime.now(UTC), clock()
        response: requests.Response | None = None
        error: Exception | None = None
        kind: str | None = None
        watch = watch_attempt(remaining)
        try:
            response = session.request(method, url, timeout=timeout, **kwargs)
        except (requests.exceptions.RequestException, EmptyPoolError) as exc:
            error, kind = exc, classify_error(exc)
        except Exception as exc:  # a cut socket may surface below requests' translation
            if watch is None or watch.cut is None:
                raise
            error = exc
        finally:
            cut = finish_attempt(watch)
        duration = clock() - started
        expired = None
        if cut is not None:
            if response is not None:
                response.close()  # whatever arrived before the cut is not an answer
            kind = READ if cut == AFTER_SENDING else CONNECT
            response, error = None, _deadline_error(kind, remaining, error)
            expired = remaining
        elif kind == CONNECT and isinstance(error, requests.exceptions.ConnectTimeout):
            expired = timeout[0]
        elif kind == READ and isinstance(error, requests.exceptions.ReadTimeout):
            expired = timeout[1]
        attempt = Attempt(
            number=number,
            started_at=started_wall,
            duration=duration,
            status=response.status_code if response is not None else None,
            error=describe_error(error) if error is not None else None,
            error_kind=kind,
            timeout=expired,
        )
        exchange.attempts.append(attempt)
        exchange.response, exchange.error, exchange.error_kind = response, error, kind
        if on_attempt is not None:
            on_attempt(attempt)

        if cut is not None:
            exchange.gave_up = "deadline"
            return exchange
        if kind in (POOL_BUSY, TLS):
            return exchange  # local overload or configuration: retrying cannot help
        if response is not None and not is_retryable(retry, method, response, retry_hint):
            return exchange
        try:
            if response is not None:
                retry = retry.increment(method, url, response=response.raw)
            else:
                retry = retry.increment(method, url, error=_retry_error_for(kind or READ, url))
        except Exception:  # MaxRetryError, or urllib3 re-raising a non-retryable error
            exchange.gave_up = "exhausted"
            return exchange

        delay = retry.get_backoff_time() + jitter(retry.backoff_factor)
        retry_after = _retry_after(retry, response)
        if retry_after is not None:
            exchange.retry_after = delay = retry_after
        if clock() + delay + MIN_ATTEMPT_TIME > deadline:
            exchange.gave_up = "deadline" if retry_after is None else "retry_after_beyond_deadline"
            return exchange
        if response is not None:
            response.close()  # return the connection to the pool before sleeping
        if delay > 0:
            sleep(delay)
