"""The retry loop of connection_pool as a table: what is retried, how often, and for whom."""

from __future__ import annotations

import threading
import time

import pytest
import requests
import responses
from urllib3.exceptions import MaxRetryError, NewConnectionError

from connection_pool import (
    CONNECT,
    READ,
    BoundedPoolAdapter,
    Bulkhead,
    build_retry,
    build_session,
    classify_error,
    send_with_retries,
)
from deadline_watchdog import AFTER_SENDING, BEFORE_SENDING, Watchdog, WatchedConnectionMixin

URL = "http://provider.test/v1/charges"
REFUSED = requests.exceptions.ConnectionError(
    MaxRetryError(None, URL, NewConnectionError(None, "Connection refused"))
)
RESET = requests.exceptions.ConnectionError(ConnectionResetError(104, "Connection reset by peer"))
READ_TIMEOUT = requests.exceptions.ReadTimeout("read timed out")


def script(mocked, steps):
    for step in steps:
        if isinstance(step, int):
            mocked.post(URL, status=step, json={})
        else:
            mocked.post(URL, body=step)


# (steps the provider takes, idempotent?, attempts made, final status or error kind)
TABLE = [
    ([201], True, 1, 201),
    ([503, 503, 201], True, 3, 201),
    ([500, 502, 504, 201], True, 4, 201),
    ([429, 201], True, 2, 201),
    ([409, 201], True, 2, 201),
    ([503, 503, 503, 503], True, 4, 503),
    ([400], True, 1, 400),
    ([402], True, 1, 402),
    ([422], True, 1, 422),
    ([REFUSED, 201], True, 2, 201),
    ([READ_TIMEOUT, 201], True, 2, 201),
    ([RESET, 201], True, 2, 201),
    # Without an Idempotency-Key a POST is retried only when nothing was sent.
    ([503, 201], False, 1, 503),
    ([READ_TIMEOUT, 201], False, 1, READ),
    ([RESET, 201], False, 1, READ),
    ([REFUSED, 201], False, 2, 201),
    ([REFUSED] * 4, False, 4, CONNECT),
]


@pytest.mark.parametrize(("steps", "idempotent", "attempts", "final"), TABLE)
def test_retry_table(make_settings, steps, idempotent, attempts, final):
    settings = make_settings(payment_max_retries=3)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        script(mocked, steps)
        exchange = send_with_retries(
            build_session(settings),
            "POST",
            URL,
            retry=build_retry(settings, idempotent=idempotent),
            connect_timeout=1,
            read_timeout=1,
            deadline=float("inf"),
            sleep=lambda s: None,
        )
    assert len(exchange.attempts) == attempts
    if isinstance(final, int):
        assert exchange.response.status_code == final
    else:
        assert exchange.response is None and exchange.error_kind == final


def advice(response):
    """A provider's retry hint read from a header, as Stripe's ``Stripe-Should-Retry``."""
    return {"true": True, "false": False}.get(response.headers.get("Should-Retry", ""))


# (first answer, its advice, idempotent?, attempts made, final status)
HINT_TABLE = [
    (503, "false", True, 1, 503),  # the provider says no: a retryable status is not retried
    (409, "false", True, 1, 409),
    (400, "true", True, 2, 201),  # it says yes: a final status is retried
    (503, None, True, 2, 201),  # no advice: the status decides
    (400, None, True, 1, 400),
    (400, "true", False, 1, 400),  # a POST without an Idempotency-Key: never, whatever it says
]


@pytest.mark.parametrize(("status", "hint", "idempotent", "attempts", "final"), HINT_TABLE)
def test_a_retry_hint_overrides_the_status_decision(
    make_settings, status, hint, idempotent, attempts, final
):
    settings = make_settings(payment_max_retries=3)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.post(URL, status=status, json={}, headers={"Should-Retry": hint} if hint else {})
        mocked.post(URL, status=201, json={})
        exchange = send_with_retries(
            build_session(settings),
            "POST",
            URL,
            retry=build_retry(settings, idempotent=idempotent),
            connect_timeout=1,
            read_timeout=1,
            deadline=float("inf"),
            sleep=lambda s: None,
            retry_hint=advice,
        )
    assert len(exchange.attempts) == attempts
    assert exchange.response.status_code == final


def test_a_hinted_retry_still_spends_the_retry_budget(make_settings):
    settings = make_settings(payment_max_retries=2)
    with responses.RequestsMock() as mocked:
        mocked.post(URL, status=400, json={}, headers={"Should-Retry": "true"})
        exchange = send_with_retries(
            build_session(settings),
            "POST",
            URL,
            retry=build_retry(settings, idempotent=True),
            connect_timeout=1,
            read_timeout=1,
            deadline=float("inf"),
            sleep=lambda s: None,
            retry_hint=advice,
        )
    assert len(exchange.attempts) == 3 and exchange.gave_up == "exhausted"
    assert exchange.response.status_code == 400


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (REFUSED, CONNECT),
        (requests.exceptions.ConnectTimeout("connect timed out"), CONNECT),
        (READ_TIMEOUT, READ),
        (RESET, READ),
        (requests.exceptions.SSLError("certificate verify failed"), "tls"),
    ],
)
def test_errors_are_classified_by_whether_the_request_went_out(error, kind):
    assert classify_error(error) == kind


def test_session_mounts_a_blocking_bounded_pool(make_settings):
    session = build_session(make_settings(payment_pool_maxsize=7, payment_pool_timeout=0.5))
    adapter = session.get_adapter("https://provider.example")
    assert isinstance(adapter, BoundedPoolAdapter)
    pool = adapter.poolmanager.connection_from_url("https://provider.example")
    assert pool.block is True and pool.pool.maxsize == 7
    assert session.verify is True and session.trust_env is False


def test_bulkhead_waits_while_calls_are_young_and_refuses_when_all_are_stuck(fake_clock):
    clock = fake_clock
    bulkhead = Bulkhead(size=2, patience=0.25, clock=clock)
    holders = [bulkhead.enter(), bulkhead.enter()]
    waiter = bulkhead.enter()  # a third caller: the pool makes it wait for a connection
    assert waiter is not None and not bulkhead.is_saturated()
    clock.now += 0.3  # both connections held longer than anyone would wait
    assert bulkhead.is_saturated()
    assert bulkhead.enter() is None
    bulkhead.leave(waiter)  # the waiter gave up after PAYMENT_POOL_TIMEOUT
    bulkhead.leave(holders[0])  # one call finished: its connection is free again
    assert not bulkhead.is_saturated()
    assert bulkhead.enter() is not None


# -- the deadline watchdog -----------------------------------------------------------


class FakeSocket:
    """A socket that records being shut down; a duplicate shares its state, as in the kernel."""

    def __init__(self, shut: threading.Event | None = None):
        self.shut = shut or threading.Event()
        self.closed = False

    def shutdown(self, how):
        self.shut.set()

    def dup(self):
        return FakeSocket(self.shut)

    def close(self):
        self.closed = True


class FakeTransport:
    """The part of urllib3's HTTPConnection the watched connection builds on, minus bytes."""

    def __init__(self, sock=None, **kwargs):
        self.sock = sock

    @property
    def is_connected(self):
        return self.sock is not None and not self.sock.shut.is_set()

    def _new_conn(self):
        return FakeSocket()

    def connect(self):
        self.sock = self._new_conn()

    def request(self, method, url, **kwargs):
        if self.sock is None:
            self.connect()

    def close(self):
        if self.sock is not None:
            self.sock.close()
        self.sock = None


class FakeConnection(WatchedConnectionMixin, FakeTransport):
    pass


@pytest.fixture
def watchdog(fake_clock):
    """A watchdog on the fake clock whose thread never runs: the test calls expire_due."""
    return Watchdog(clock=fake_clock, start=False)


def connected() -> FakeConnection:
    return FakeConnection(sock=FakeSocket())


def test_watchdog_shuts_the_socket_of_an_attempt_still_receiving_at_its_deadline(
    watchdog, fake_clock
):
    watch = watchdog.watch(fake_clock() + 2)
    conn = connected()
    watchdog.bind(conn, watch)
    conn.request("POST", "/v1/charges")
    fake_clock.advance(1.9)
    assert watchdog.expire_due() == pytest.approx(0.1)
    assert not conn.sock.shut.is_set()
    fake_clock.advance(0.1)
    assert watchdog.expire_due() is None
    assert conn.sock.shut.is_set()
    assert watchdog.finish(watch) == AFTER_SENDING


def test_a_finished_watch_never_fires(watchdog, fake_clock):
    watchdog.watch(fake_clock() + 1)  # an older attempt, still running: due first
    watch = watchdog.watch(fake_clock() + 2)
    conn = connected()
    watchdog.bind(conn, watch)
    conn.request("POST", "/v1/charges")
    assert watchdog.finish(watch) is None  # answered; the connection is still checked out
    fake_clock.advance(10)
    watchdog.expire_due()
    assert not conn.sock.shut.is_set()
    assert watchdog.release(conn) is False


def test_a_connection_reused_by_another_attempt_is_not_shut_by_a_stale_watch(watchdog, fake_clock):
    first = watchdog.watch(fake_clock() + 2)
    conn = connected()
    watchdog.bind(conn, first)
    conn.request("POST", "/v1/charges")
    watchdog.release(conn)  # answered and handed back; `first` is not finished yet
    second = watchdog.watch(fake_clock() + 5)
    watchdog.bind(conn, second)
    conn.request("POST", "/v1/charges")
    fake_clock.advance(3)  # the first attempt's deadline passes while the second runs
    watchdog.expire_due()
    assert not conn.sock.shut.is_set()
    assert watchdog.finish(first) is None
    assert watchdog.finish(second) is None
    assert watchdog.release(conn) is False


def start_connecting(watchdog, conn, handshake):
    watchdog.connecting(conn, True)
    sock = FakeSocket()
    watchdog.new_socket(conn, sock, handshake)
    conn.sock = sock


def connect_and_send(watchdog, conn):
    start_connecting(watchdog, conn, handshake=False)
    watchdog.connecting(conn, False)
    conn.request("POST", "/v1/charges")


@pytest.mark.parametrize(
    ("phase", "kind"),
    [
        (lambda watchdog, conn: None, BEFORE_SENDING),  # waiting to connect
        (lambda watchdog, conn: start_connecting(watchdog, conn, handshake=False), BEFORE_SENDING),
        (lambda watchdog, conn: start_connecting(watchdog, conn, handshake=True), BEFORE_SENDING),
        (lambda watchdog, conn: watchdog.connecting(conn, False), BEFORE_SENDING),  # nothing sent
        (connect_and_send, AFTER_SENDING),
    ],
    ids=["before_connect", "tcp_connect", "tls_handshake", "connected_not_sent", "sent"],
)
def test_a_cut_is_a_read_error_only_once_the_request_may_have_gone_out(
    watchdog, fake_clock, phase, kind
):
    watch = watchdog.watch(fake_clock() + 1)
    conn = FakeConnection()
    watchdog.bind(conn, watch)
    phase(watchdog, conn)
    fake_clock.advance(1)
    watchdog.expire_due()
    assert watchdog.finish(watch) == kind


def test_a_tls_handshake_is_cut_through_a_duplicate_of_its_socket(watchdog, fake_clock):
    watch = watchdog.watch(fake_clock() + 1)
    conn = FakeConnection()
    watchdog.bind(conn, watch)
    watchdog.connecting(conn, True)
    raw = FakeSocket()
    watchdog.new_socket(conn, raw, handshake=True)
    # The TLS handshake has detached `raw`; conn.sock is not set until it is over.
    fake_clock.advance(1)
    watchdog.expire_due()
    assert raw.shut.is_set()
    watchdog.connecting(conn, False)
    assert conn._handshake_sock is None  # the duplicate is closed once connecting ends


def test_a_socket_opened_after_the_cut_is_shut_at_once(watchdog, fake_clock):
    watch = watchdog.watch(fake_clock() + 1)
    conn = FakeConnection()
    watchdog.bind(conn, watch)
    watchdog.connecting(conn, True)  # TCP connect in progress: no socket to shut yet
    fake_clock.advance(1)
    watchdog.expire_due()
    sock = FakeSocket()
    watchdog.new_socket(conn, sock, handshake=False)
    assert sock.shut.is_set()
    assert watchdog.finish(watch) == BEFORE_SENDING


def test_a_connection_handed_out_after_the_deadline_is_cut_at_once(watchdog, fake_clock):
    watch = watchdog.watch(fake_clock() + 1)
    fake_clock.advance(1)  # the attempt was still waiting for a free connection
    watchdog.expire_due()
    conn = connected()
    watchdog.bind(conn, watch)
    assert conn.sock.shut.is_set()
    assert watchdog.finish(watch) == BEFORE_SENDING
    assert watchdog.release(conn) is True  # the pool closes it instead of keeping it


def test_the_watchdog_sleeps_until_the_earliest_running_deadline(watchdog, fake_clock):
    watchdog.watch(fake_clock() + 5)
    assert watchdog.expire_due() == pytest.approx(5)
    watchdog.watch(fake_clock() + 9)
    assert watchdog.expire_due() == pytest.approx(5)
    watchdog.watch(fake_clock() + 1)
    assert watchdog.expire_due() == pytest.approx(1)


class StallingSession:
    """Sends through a real bounded pool whose connection never completes an answer.

    What urllib3 does with a connection, minus the bytes: take it from the pool, send,
    wait for the answer (here: until its socket is shut down), hand it back.
    """

    def __init__(self):
        self.pool = BoundedPoolAdapter(1, 0.25).poolmanager.connection_from_url(URL)
        self.pool.ConnectionCls = FakeConnection
        self.sockets: list[FakeSocket] = []

    def request(self, method, url, timeout, **kwargs):
        conn = self.pool._get_conn()
        try:
            conn.request(method, url)
            self.sockets.append(conn.sock)
            if not conn.sock.shut.wait(10):
                raise AssertionError("the watchdog never shut the socket")
            raise requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")
        finally:
            self.pool._put_conn(conn)


def test_the_deadline_cuts_a_stalled_attempt_in_real_time_whatever_the_clock(
    make_settings, fake_clock
):
    session = StallingSession()
    started = time.monotonic()
    exchange = send_with_retries(
        session,
        "POST",
        URL,
        retry=build_retry(make_settings(payment_max_retries=3), idempotent=True),
        connect_timeout=1,
        read_timeout=1,
        deadline=fake_clock() + 0.2,  # the fake clock never moves: only real time can cut
        clock=fake_clock,
        sleep=fake_clock.sleep,
    )
    assert time.monotonic() - started < 2
    [attempt] = exchange.attempts
    assert (attempt.error_kind, attempt.timeout) == (READ, pytest.approx(0.2))
    assert attempt.error.startswith("read: DeadlineExceeded")
    assert exchange.gave_up == "deadline" and exchange.may_have_been_processed
    assert exchange.response is None
    assert isinstance(exchange.error, requests.exceptions.ReadTimeout)
    [sock] = session.sockets
    assert sock.closed  # closed when handed back: the cut connection is never reused


def test_an_attempt_answered_before_the_deadline_is_untouched(make_settings, fake_clock):
    settings = make_settings()
    with responses.RequestsMock() as mocked:
        mocked.post(URL, status=201, json={})
        exchange = send_with_retries(
            build_session(settings),
            "POST",
            URL,
            retry=build_retry(settings, idempotent=True),
            connect_timeout=1,
            read_timeout=1,
            deadline=fake_clock() + 5,
            clock=fake_clock,
        )
    assert exchange.response.status_code == 201 and exchange.gave_up is None
    assert exchange.attempts[0].timeout is None
