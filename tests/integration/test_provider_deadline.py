"""PAYMENT_DEADLINE bounds the whole exchange against the real sandbox, trickled answers too.

The sandbox's ``trickle_ms`` fault records the charge, then sends its answer one byte
at a time: every socket read succeeds, so only the wall-clock deadline can end it.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from connection_pool import READ, build_retry, build_session, send_with_retries
from tests.support.sandbox import SandboxProcess

DEADLINE = 2.0
#: Generous on a loaded machine: the cut itself takes milliseconds.
MARGIN = 1.0
TRICKLE_MS = 400


@pytest.fixture(scope="module")
def tls_sandbox_process():
    with SandboxProcess(tls=True) as process:
        yield process


@pytest.fixture(params=["http", "https"])
def provider(request):
    """The sandbox over plain HTTP or over TLS, empty and healthy."""
    if request.param == "http":
        yield request.getfixturevalue("sandbox")
        return
    process = request.getfixturevalue("tls_sandbox_process")
    process.reset()
    yield process
    process.reset()  # sends the rest of anything still trickling


@pytest.fixture
def settings_for(make_settings):
    def build(provider, **overrides):
        return make_settings(
            payment_api_url=provider.url,
            ca_bundle=provider.ca_bundle,
            payment_connect_timeout=1,
            payment_read_timeout=1,  # per socket read: a byte every 0.4 s never trips it
            payment_deadline=DEADLINE,
            payment_max_retries=3,
            **overrides,
        )

    return build


def charge(session, provider, settings, key):
    return send_with_retries(
        session,
        "POST",
        f"{provider.url}/v1/charges",
        retry=build_retry(settings, idempotent=True),
        connect_timeout=settings.payment_connect_timeout,
        read_timeout=settings.payment_read_timeout,
        deadline=time.monotonic() + settings.payment_deadline,
        json={"amount": 1000, "currency": "USD", "payment_method": "card", "transaction_id": key},
        headers={**provider.auth_headers, "Idempotency-Key": key},
    )


def new_key() -> str:
    return f"deadline_{uuid.uuid4().hex}"


def test_a_trickled_answer_is_cut_at_the_deadline_and_the_charge_is_unknown(provider, settings_for):
    settings = settings_for(provider)
    provider.set_faults(trickle_ms=TRICKLE_MS)
    key = new_key()
    started = time.monotonic()
    exchange = charge(build_session(settings), provider, settings, key)
    elapsed = time.monotonic() - started
    assert DEADLINE - 0.1 < elapsed < DEADLINE + MARGIN
    [attempt] = exchange.attempts
    assert attempt.error_kind == READ and attempt.may_have_been_processed
    assert round(attempt.timeout * 1000) == DEADLINE * 1000  # the incident log's number
    assert exchange.gave_up == "deadline" and exchange.response is None
    # The provider charged: "unknown" is the truth, "not charged" would be a lie.
    [charged] = provider.ledger()
    assert (charged["idempotency_key"], charged["status"]) == (key, "succeeded")


def test_the_session_answers_again_after_a_cut_on_a_new_connection(provider, settings_for):
    settings = settings_for(provider)
    session = build_session(settings)
    provider.set_faults(trickle_ms=TRICKLE_MS)
    assert charge(session, provider, settings, new_key()).gave_up == "deadline"
    provider.set_faults()
    started = time.monotonic()
    exchange = charge(session, provider, settings, new_key())
    assert time.monotonic() - started < MARGIN
    assert exchange.response.status_code == 201
    assert [a.error for a in exchange.attempts] == [None]
    assert provider.state()["connections_accepted"] == 2  # the cut one was not reused


def test_watched_attempts_in_parallel_answer_normally(sandbox, settings_for):
    """Many attempts watched at once on a shared pool: none is cut, none fails."""
    threads, per_thread = 8, 25
    settings = settings_for(sandbox, payment_pool_maxsize=threads, payment_pool_timeout=5)
    session = build_session(settings)
    sandbox.set_faults(latency_ms=5)

    def charge_many(_):
        return [
            charge(session, sandbox, settings, new_key()).response.status_code
            for _ in range(per_thread)
        ]

    with ThreadPoolExecutor(threads) as pool:
        statuses = [status for batch in pool.map(charge_many, range(threads)) for status in batch]
    assert statuses == [201] * threads * per_thread
    assert sandbox.state()["connections_accepted"] <= threads
