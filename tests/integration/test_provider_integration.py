"""PaymentClient against the real sandbox process over real sockets: pooling, bulkhead, TLS."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from circuit_breaker import CircuitBreaker
from connection_pool import build_session
from errors import PaymentOutcomeUnknown, PaymentServiceUnavailable
from payment_client import PaymentClient
from tests.support.charges import charge_request
from tests.support.sandbox import SandboxProcess


@pytest.fixture
def client_for(make_settings):
    """A client with its own session and breaker for a sandbox URL."""

    def build(url, **overrides):
        settings = make_settings(
            payment_api_url=url, **{"payment_connect_timeout": 0.5, **overrides}
        )
        return PaymentClient(
            settings, session=build_session(settings), breaker=CircuitBreaker(1000, 30)
        )

    return build


def pool_full_warnings(caplog):
    return [r for r in caplog.records if "Connection pool is full" in r.getMessage()]


def test_sequential_charges_reuse_one_connection(sandbox, client_for):
    client = client_for(sandbox.url, payment_pool_maxsize=4)
    for _ in range(200):
        assert client.charge(charge_request(100)).value.status == "succeeded"
    state = sandbox.state()
    assert state["charges"] == 200
    assert state["connections_accepted"] <= 4  # in practice 1: keep-alive


def test_many_threads_share_a_small_pool_without_discarding(sandbox, client_for, caplog):
    caplog.set_level(logging.WARNING, logger="urllib3")
    sandbox.set_faults(latency_ms=10)
    client = client_for(sandbox.url, payment_pool_maxsize=8, payment_pool_timeout=5)
    with ThreadPoolExecutor(32) as pool:
        results = list(
            pool.map(lambda _: client.charge(charge_request(250)).value.status, range(320))
        )
    assert results.count("succeeded") == 320
    assert pool_full_warnings(caplog) == []
    assert sandbox.state()["connections_accepted"] <= 8


def test_calls_through_one_client_overlap(sandbox, client_for):
    """The breaker and the pool never serialize: 16 calls of 0.5 s take about 0.5 s."""
    sandbox.set_faults(latency_ms=500)
    client = client_for(sandbox.url, payment_pool_maxsize=16)
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(lambda _: client.charge(charge_request(100)).value.status, range(16))
        )
    elapsed = time.monotonic() - started
    assert statuses == ["succeeded"] * 16
    assert elapsed < 2.5  # serialized would be 8 s


def test_bulkhead_fails_fast_when_every_connection_is_busy(sandbox, client_for):
    """With the provider hanging, calls beyond PAYMENT_POOL_MAXSIZE fail within the pool timeout."""
    sandbox.set_faults(hang=True)
    client = client_for(
        sandbox.url,
        payment_pool_maxsize=2,
        payment_pool_timeout=0.25,
        payment_read_timeout=3,
        payment_deadline=3,
        payment_max_retries=0,
    )
    holders = [threading.Thread(target=_swallow, args=(client,)) for _ in range(2)]
    for t in holders:
        t.start()
    sandbox.wait_for_state(lambda s: s["requests"].get("POST /v1/charges", 0) >= 2)
    started = time.monotonic()
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge(charge_request(100))
    assert info.value.code == "outbound_pool_busy"
    assert time.monotonic() - started < 1.0
    # Both holders have now hung longer than PAYMENT_POOL_TIMEOUT: refuse without waiting,
    # so a stuck provider cannot tie up the worker's other threads 0.25 s at a time.
    started = time.monotonic()
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge(charge_request(100))
    assert info.value.code == "outbound_pool_busy"
    assert time.monotonic() - started < 0.1
    assert sandbox.state()["requests"]["POST /v1/charges"] == 2
    sandbox.set_faults()  # heal: the hung requests are dropped
    for t in holders:
        t.join(10)


def _swallow(client):
    with contextlib.suppress(Exception):  # the holders only occupy connections
        client.charge(charge_request(100))


def test_hanging_provider_is_outcome_unknown_within_the_deadline(sandbox, client_for, caplog):
    sandbox.set_faults(hang=True)
    client = client_for(
        sandbox.url, payment_read_timeout=0.4, payment_deadline=1.5, payment_max_retries=5
    )
    started = time.monotonic()
    with pytest.raises(PaymentOutcomeUnknown):
        client.charge(charge_request(100, key="hang-1"))
    assert time.monotonic() - started < 1.5 + 0.5
    timeouts = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("Payment service connection failed - timeout after")
    ]
    assert "Payment service connection failed - timeout after 400ms" in timeouts


def test_connection_refused_is_service_unavailable(client_for, unused_port):
    client = client_for(f"http://127.0.0.1:{unused_port}", payment_max_retries=2)
    started = time.monotonic()
    with pytest.raises(PaymentServiceUnavailable, match="unreachable"):
        client.charge(charge_request(100))
    assert time.monotonic() - started < 3


def test_tls_provider_is_verified_with_the_private_ca(client_for):
    with SandboxProcess(tls=True) as tls_sandbox:
        assert tls_sandbox.url.startswith("https://")
        trusted = client_for(tls_sandbox.url, ca_bundle=tls_sandbox.ca_bundle)
        for _ in range(5):
            assert trusted.charge(charge_request(300)).value.status == "succeeded"
        assert tls_sandbox.state()["connections_accepted"] == 1  # one handshake, kept alive

        untrusted = client_for(tls_sandbox.url, payment_max_retries=0)
        with pytest.raises(PaymentServiceUnavailable) as info:
            untrusted.charge(charge_request(300))
        assert info.value.code == "provider_tls_error"
        assert tls_sandbox.state()["charges"] == 5
