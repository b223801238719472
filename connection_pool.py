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
not the answer (a provider that trickles a byte at a time never trips them), so the
:class:`Watchdog` shuts the socket of an attempt still running at the deadline. This
module never raises for transport failures; ``PaymentClient`` translates the returned
:class:`Exchange` into errors.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    EmptyPoolError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.util.retry import Retry

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


#: Dead watches (finished before their deadline) tolerated in the heap before compacting.
WATCHDOG_COMPACT_MIN = 256


class DeadlineExceeded(TimeoutError):
    """The deadline passed while an attempt was still connecting or receiving."""


class Watch:
    """One attempt under the :class:`Watchdog`: its deadline and what it is doing.

    ``deadline`` is a value of the watchdog's clock. The rest is the watchdog's, guarded
    by its lock: ``conn``, the connection serving the attempt; ``sending``, the request
    may have started going out; ``done``; ``expired``, the deadline passed first;
    ``cut``, the error kind (``CONNECT`` or ``READ``) once the watchdog shut the
    attempt's connection.
    """

    __slots__ = ("deadline", "conn", "sending", "done", "expired", "cut")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.conn: WatchedConnectionMixin | None = None
        self.sending = False
        self.done = False
        self.expired = False
        self.cut: str | None = None


def _shutdown(sock: socket.socket | None) -> None:
    """Shut ``sock`` down both ways so a read blocked on it returns at once.

    A TLS socket is shut with ``socket.socket.shutdown``: ``SSLSocket.shutdown`` would
    also drop the TLS object under the thread still reading, which would then fail with
    a ValueError instead of a connection error. Failures are ignored (the socket was
    closed meanwhile): they must never stop the watchdog's thread.
    """
    if sock is None:
        return
    shutdown = socket.socket.shutdown if isinstance(sock, socket.socket) else type(sock).shutdown
    with contextlib.suppress(Exception):
        shutdown(sock, socket.SHUT_RDWR)


class Watchdog:
    """Shuts the socket of an attempt still running at its deadline: one thread per process.

    Running attempts' deadlines sit in a heap; the thread (started by the first watch)
    sleeps until the earliest and is woken early only by a watch due before that. With
    deadlines of one length that is rare: the thread wakes about once per deadline, not
    once per attempt. Watching an attempt costs a heap push and finishing it a flag,
    each under one lock; a finished watch stays in the heap until it comes due or the
    heap is compacted, and never fires.

    A connection serves one watch from the moment the pool hands it out to the moment it
    is handed back (:meth:`bind`, :meth:`release`). At the deadline the watchdog shuts
    only a connection still bound to that watch, under the same lock, so a connection
    already back in the pool or serving another attempt is never shut by a stale watch.
    The blocked read then returns at once and urllib3 raises; the attempt is ``CONNECT``
    if nothing can have been sent yet, else ``READ``.

    :param clock: the real monotonic clock; tests pass a fake one.
    :param start: run the thread on the first watch; tests call :meth:`expire_due`.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, start: bool = True):
        self._clock = clock
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._dead = 0  # finished watches still in the heap
        self._start = start
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf  # when the thread will next look at the heap by itself

    def watch(self, deadline: float) -> Watch:
        """Watch an attempt that must be over by ``deadline`` (a ``clock()`` value)."""
        watch = Watch(deadline)
        with self._lock:
            heapq.heappush(self._heap, (deadline, next(self._order), watch))
            if self._start and self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="provider-deadline-watchdog", daemon=True
                )
                self._thread.start()
            elif deadline < self._wake_at:
                self._wake_at = deadline
                self._wakeup.notify()
        return watch

    def finish(self, watch: Watch) -> str | None:
        """The attempt is over: its watch never fires now. Returns how it was cut, if it was."""
        with self._lock:
            watch.done = True
            if not watch.expired:  # still in the heap
                self._dead += 1
                self._drop_dead()
            return watch.cut

    def bind(self, conn: WatchedConnectionMixin, watch: Watch) -> None:
        """``conn`` now serves ``watch`` (the pool handed it out); cut it if already late."""
        with self._lock:
            conn._deadline_watch = watch
            watch.conn = conn
            if watch.expired:
                self._cut(watch, conn)

    def release(self, conn: WatchedConnectionMixin) -> bool:
        """``conn`` goes back to the pool; ``True`` if its watch cut it (close it instead)."""
        with self._lock:
            watch, conn._deadline_watch = conn._deadline_watch, None
            if watch is None:
                return False
            if watch.conn is conn:
                watch.conn = None
            return watch.cut is not None

    def connecting(self, conn: WatchedConnectionMixin, started: bool) -> None:
        """``conn`` starts or ends connecting (TCP, then TLS): a cut meanwhile is ``CONNECT``."""
        with self._lock:
            conn._connecting = started
            handshake_sock, conn._handshake_sock = conn._handshake_sock, None
            watch = conn._deadline_watch
            if not started and watch is not None and watch.cut is not None:
                _shutdown(conn.sock)  # cut while its socket was not yet in place
        if handshake_sock is not None:
            handshake_sock.close()

    def new_socket(
        self, conn: WatchedConnectionMixin, sock: socket.socket, handshake: bool
    ) -> None:
        """``conn`` opened ``sock``; ``handshake``: a TLS handshake on it comes next.

        The handshake detaches ``sock`` into a TLS socket that only exists once the
        handshake is over, so the watchdog keeps a duplicate to shut meanwhile (closed
        by :meth:`connecting` when connecting ends).
        """
        with self._lock:
            watch = conn._deadline_watch
            if watch is None:
                return
            if watch.cut is not None:
                _shutdown(sock)
            elif handshake:
                with contextlib.suppress(OSError):  # out of descriptors: per-read timeouts only
                    conn._handshake_sock = sock.dup()

    def expire_due(self) -> float | None:
        """Cut every watch whose deadline has passed; seconds until the next one, if any."""
        with self._lock:
            now = self._clock()
            due = self._expire_due(now)
            return None if due is None else due - now

    def _expire_due(self, now: float) -> float | None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            watch = heapq.heappop(heap)[2]
            if watch.done:
                self._dead -= 1
                continue
            watch.expired = True
            if watch.conn is not None:
                self._cut(watch, watch.conn)
        self._drop_dead()
        return heap[0][0] if heap else None

    def _cut(self, watch: Watch, conn: WatchedConnectionMixin) -> None:
        connected = conn.sock is not None and not conn._connecting
        watch.cut = READ if watch.sending and connected else CONNECT
        _shutdown(conn.sock)
        _shutdown(conn._handshake_sock)

    def _drop_dead(self) -> None:
        """Pop finished watches off the top; compact when they are most of the heap."""
        heap = self._heap
        while heap and heap[0][2].done:
            heapq.heappop(heap)
            self._dead -= 1
        if self._dead > WATCHDOG_COMPACT_MIN and self._dead * 2 > len(heap):
            heap[:] = [entry for entry in heap if not entry[2].done]
            heapq.heapify(heap)
            self._dead = 0

    def _run(self) -> None:
        with self._lock:
            while True:
                now = self._clock()
                due = self._expire_due(now)
                self._wake_at = math.inf if due is None else due
                self._wakeup.wait(None if due is None else due - now)


class _CurrentAttempt(threading.local):
    watch: Watch | None = None


_current = _CurrentAttempt()  # the attempt this thread is sending, for the pool to bind
_watchdog = Watchdog()


def _reset_watchdog() -> None:
    """A forked child has no watchdog thread: start a new watchdog on its first attempt."""
    global _watchdog
    _watchdog = Watchdog()


os.register_at_fork(after_in_child=_reset_watchdog)

if TYPE_CHECKING:
    _ConnectionBase = HTTPConnection
    _PoolBase = HTTPConnectionPool
else:
    _ConnectionBase = _PoolBase = object


class WatchedConnectionMixin(_ConnectionBase):
    """Tells the watchdog when a urllib3 connection connects and starts sending."""

    _deadline_watch: Watch | None = None
    _connecting = False
    _handshake_sock: socket.socket | None = None
    _tls_handshake = False

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watchdog.new_socket(self, sock, self._tls_handshake)
        return sock

    def connect(self) -> None:
        _watchdog.connecting(self, True)
        try:
            super().connect()
        finally:
            _watchdog.connecting(self, False)

    def request(self, *args, **kwargs) -> None:
        watch = self._deadline_watch
        if watch is not None:
            watch.sending = True
        super().request(*args, **kwargs)


class WatchedHTTPConnection(WatchedConnectionMixin, HTTPConnection):
    pass


class WatchedHTTPSConnection(WatchedConnectionMixin, HTTPSConnection):
    _tls_handshake = True


class _BoundedWaitMixin(_PoolBase):
    """A pool that waits ``pool_wait`` at most and binds connections to the watched attempt.

    The attempt is this thread's (``_current``): urllib3 sends on the caller's thread.
    """

    pool_wait: float

    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout=self.pool_wait if timeout is None else timeout)
        watch = _current.watch
        if watch is not None and isinstance(conn, WatchedConnectionMixin):
            _watchdog.bind(conn, watch)
        return conn

    def _put_conn(self, conn) -> None:
        if (
            isinstance(conn, WatchedConnectionMixin)
            and conn._deadline_watch is not None
            and _watchdog.release(conn)
        ):
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


def _watch_attempt(allowed: float) -> Watch | None:
    """Put the attempt this thread is about to send under the watchdog, in real time."""
    if math.isinf(allowed):
        return None
    watch = _current.watch = _watchdog.watch(time.monotonic() + allowed)
    return watch


def _finish_attempt(watch: Watch | None) -> str | None:
    """Take the attempt off the watchdog; how the deadline cut it, if it did."""
    if watch is None:
        return None
    _current.watch = None
    return _watchdog.finish(watch)


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
    **kwargs,
) -> Exchange:
    """Send ``method url`` until it gets a final answer, ``retry`` is spent, or ``deadline``.

    ``deadline`` is a ``clock()`` value. Every attempt's connect and read timeouts are
    clamped to the time left; backoff and ``Retry-After`` sleeps never cross the
    deadline (a ``Retry-After`` that would is not waited for at all). An attempt still
    running at the deadline (a provider trickling its answer) is cut by the watchdog,
    which keeps real time whatever ``clock`` is: it is recorded as a timeout of the
    time it was allowed, ``READ`` once the request may have gone out, and the exchange
    gives up.
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
        watch = _watch_attempt(remaining)
        try:
            response = session.request(method, url, timeout=timeout, **kwargs)
        except (requests.exceptions.RequestException, EmptyPoolError) as exc:
            error, kind = exc, classify_error(exc)
        except Exception as exc:  # a cut socket may surface below requests' translation
            if watch is None or watch.cut is None:
                raise
            error = exc
        finally:
            cut = _finish_attempt(watch)
        duration = clock() - started
        expired = None
        if cut is not None:
            if response is not None:
                response.close()  # whatever arrived before the cut is not an answer
            response, error, kind = None, _deadline_error(cut, remaining, error), cut
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
        has_retry_after = response is not None and "Retry-After" in response.headers
        if response is not None and not retry.is_retry(
            method, response.status_code, has_retry_after
        ):
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
