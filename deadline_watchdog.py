"""A wall-clock deadline for provider requests: the socket of a late attempt is shut.

urllib3's timeouts bound each socket operation, not the answer: a provider that trickles
its answer a byte at a time never trips them. Here one thread per process keeps the
deadlines of the attempts in flight and, when one passes, shuts that attempt's socket,
so the read blocked on it returns at once and urllib3 raises. ``connection_pool`` puts
every attempt under a watch (:func:`watch_attempt`, :func:`finish_attempt`) and gives its
pool the watched connection classes, which tell the watchdog when they connect and send;
the pool binds a connection to the attempt it serves (:func:`bind_to_current_attempt`,
:func:`release`).

How an attempt was cut tells the caller what the provider may have seen:
:data:`BEFORE_SENDING` (waiting for a connection, connecting, TLS handshake, connected
but not sending) or :data:`AFTER_SENDING` (the request may have been received).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from urllib3.connection import HTTPConnection, HTTPSConnection

#: How an attempt was cut: nothing can have been sent yet, or the request may have gone out.
BEFORE_SENDING, AFTER_SENDING = "before_sending", "after_sending"


#: Dead watches (finished before their deadline) tolerated in the heap before compacting.
WATCHDOG_COMPACT_MIN = 256


class DeadlineExceeded(TimeoutError):
    """The deadline passed while an attempt was still connecting or receiving."""


class Watch:
    """One attempt under the :class:`Watchdog`: its deadline and what it is doing.

    ``deadline`` is a value of the watchdog's clock. The rest is the watchdog's, guarded
    by its lock: ``conn``, the connection serving the attempt; ``sending``, the request
    may have started going out; ``done``; ``expired``, the deadline passed first;
    ``cut``, :data:`BEFORE_SENDING` or :data:`AFTER_SENDING` once the watchdog shut the
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
    The blocked read then returns at once and urllib3 raises; the cut is
    :data:`BEFORE_SENDING` if nothing can have been sent yet, else :data:`AFTER_SENDING`.

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
        """``conn`` starts or ends connecting (TCP, then TLS): a cut meanwhile is before sending."""
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
        watch.cut = AFTER_SENDING if watch.sending and connected else BEFORE_SENDING
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
else:
    _ConnectionBase = object


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


def watch_attempt(allowed: float) -> Watch | None:
    """Put the attempt this thread is about to send under the watchdog, in real time."""
    if math.isinf(allowed):
        return None
    watch = _current.watch = _watchdog.watch(time.monotonic() + allowed)
    return watch


def finish_attempt(watch: Watch | None) -> str | None:
    """Take the attempt off the watchdog; how the deadline cut it, if it did."""
    if watch is None:
        return None
    _current.watch = None
    return _watchdog.finish(watch)


def bind_to_current_attempt(conn) -> None:
    """The pool hands ``conn`` out: it serves this thread's watched attempt, if any.

    urllib3 sends on the caller's thread, so the attempt is this thread's.
    """
    watch = _current.watch
    if watch is not None and isinstance(conn, WatchedConnectionMixin):
        _watchdog.bind(conn, watch)


def release(conn) -> bool:
    """``conn`` goes back to the pool; ``True`` if a deadline cut it (close it instead)."""
    return (
        isinstance(conn, WatchedConnectionMixin)
        and conn._deadline_watch is not None
        and _watchdog.release(conn)
    )
