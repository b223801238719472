"""The retry loop of connection_pool as a table: what is retried, how often, and for whom."""

from __future__ import annotations

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
