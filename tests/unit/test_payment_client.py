"""PaymentClient with the sandbox adapter: the wire format, retries, errors, deadline, breaker.

The HTTP layer is mocked with ``responses`` (which patches ``HTTPAdapter.send``, so the
real session, adapter and retry loop run); sleeping and jitter are injected.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
import responses
from urllib3.exceptions import EmptyPoolError, MaxRetryError, NewConnectionError

from circuit_breaker import CircuitBreaker
from connection_pool import build_session
from errors import (
    PaymentDeclined,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
)
from payment_client import TIMEOUT_MESSAGE, PaymentClient
from tests.support.charges import charge_request, lookup

URL = "https://provider.test/v1/charges"
CHARGE = {"id": "ch_1", "status": "succeeded", "amount": 2599, "currency": "USD"}


@pytest.fixture
def settings(make_settings):
    return make_settings(
        payment_api_url="https://provider.test",
        payment_api_key="sk_test_abc123",
        payment_max_retries=3,
        payment_backoff_factor=0.25,
        payment_breaker_failures=5,
        payment_breaker_reset=30,
    )


@pytest.fixture
def clock(fake_clock):
    return fake_clock


@pytest.fixture
def client(settings, clock):
    return PaymentClient(
        settings,
        session=build_session(settings),
        breaker=CircuitBreaker(5, 30, clock=clock),
        clock=clock,
        sleep=clock.sleep,
        jitter=lambda factor: 0.0,
    )


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def posts(mocked):
    return [c.request for c in mocked.calls if c.request.method == "POST"]


def test_charge_sends_exact_request(client, mocked):
    mocked.post(URL, json=CHARGE, status=201)
    reply = client.charge(
        charge_request(
            key="key-1", transaction_id="order-7", description="Order 7", metadata={"order": 7}
        )
    )
    assert reply.value.id == "ch_1" and reply.value.status == "succeeded"
    (request,) = posts(mocked)
    assert request.url == URL
    assert request.headers["Authorization"] == "Bearer sk_test_abc123"
    assert request.headers["Idempotency-Key"] == "key-1"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.body) == {
        "amount": 2599,
        "currency": "USD",
        "payment_method": "card",
        "transaction_id": "order-7",
        "description": "Order 7",
        "metadata": {"order": 7},
    }
    timeout = request.req_kwargs["timeout"]
    assert timeout == (3.05, 5.0)


def test_yen_amount_has_no_minor_digits(client, mocked):
    mocked.post(URL, json={**CHARGE, "amount": 500, "currency": "JPY"}, status=201)
    client.charge(charge_request(500, "JPY"))
    assert json.loads(posts(mocked)[0].body)["amount"] == 500


def test_key_is_generated_once_and_reused_on_every_retry(client, mocked, clock):
    mocked.post(URL, status=503)
    mocked.post(URL, status=503)
    mocked.post(URL, json=CHARGE, status=201)
    reply = client.charge(charge_request(key="pay-key"))
    sent = posts(mocked)
    assert len(sent) == 3
    assert {r.headers["Idempotency-Key"] for r in sent} == {"pay-key"}
    assert [a.status for a in reply.attempts] == [503, 503, 201]
    assert clock.sleeps == [0.5]  # urllib3 backoff: 0 then 2 x 0.25 (jitter pinned to 0)


def test_retry_after_is_honoured(client, mocked, clock):
    mocked.post(URL, status=429, headers={"Retry-After": "2"})
    mocked.post(URL, json=CHARGE, status=201)
    client.charge(charge_request(key="k"))
    assert clock.sleeps == [2.0]
    assert len(posts(mocked)) == 2


def test_retry_after_beyond_the_deadline_gives_up_at_once(client, mocked, clock):
    mocked.post(URL, status=503, headers={"Retry-After": "120"})
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge(charge_request(100, key="k"))
    assert info.value.retry_after == 120
    assert clock.sleeps == [] and len(posts(mocked)) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(client, mocked, status, caplog):
    mocked.post(URL, status=status, json={"error": {"code": "bad", "message": "nope"}})
    with pytest.raises(PaymentProviderError, match=f"HTTP {status}"):
        client.charge(charge_request(100, key="k"))
    assert len(posts(mocked)) == 1
    critical = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert bool(critical) == (status in (401, 403))
    assert all("sk_test_abc123" not in r.getMessage() for r in caplog.records)


def test_decline_raises_payment_declined_without_retry(client, mocked):
    mocked.post(
        URL, status=402, json={"error": {"code": "card_declined", "message": "Card declined."}}
    )
    with pytest.raises(PaymentDeclined, match="Card declined.") as info:
        client.charge(charge_request(100, key="k"))
    assert info.value.code == "card_declined"
    assert len(posts(mocked)) == 1


def test_connect_error_is_service_unavailable_after_retries(client, mocked):
    for _ in range(4):
        mocked.post(URL, body=requests.exceptions.ConnectTimeout("connect timed out"))
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge(charge_request(100, key="k"))
    assert isinstance(info.value, requests.exceptions.ConnectionError)  # old except clauses
    assert len(posts(mocked)) == 4  # first attempt + PAYMENT_MAX_RETRIES
    assert info.value.retry_after > 0


def test_read_timeout_on_every_attempt_is_outcome_unknown(client, mocked, caplog):
    for _ in range(4):
        mocked.post(URL, body=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(PaymentOutcomeUnknown) as info:
        client.charge(charge_request(100, key="k"))
    assert isinstance(info.value, requests.exceptions.ConnectionError)
    assert len(posts(mocked)) == 4
    assert {r.headers["Idempotency-Key"] for r in posts(mocked)} == {"k"}
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert messages.count(TIMEOUT_MESSAGE % 5000) == 4
    assert "Payment service connection failed - timeout after 5000ms" in messages


def test_503s_then_exhausted_is_service_unavailable(client, mocked):
    for _ in range(4):
        mocked.post(URL, status=503)
    with pytest.raises(PaymentServiceUnavailable, match="4 attempt"):
        client.charge(charge_request(100, key="k"))


def test_read_timeout_then_503s_is_unknown_not_unavailable(client, mocked):
    """Once a request may have reached the provider, a later 5xx proves nothing."""
    mocked.post(URL, body=requests.exceptions.ReadTimeout("read timed out"))
    for _ in range(3):
        mocked.post(URL, status=503)
    with pytest.raises(PaymentOutcomeUnknown):
        client.charge(charge_request(100, key="k"))


def test_409_in_progress_exhausted_is_unknown(client, mocked):
    for _ in range(4):
        mocked.post(URL, status=409, json={"error": {"code": "request_in_progress"}})
    with pytest.raises(PaymentOutcomeUnknown):
        client.charge(charge_request(100, key="k"))
    assert len(posts(mocked)) == 4


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ('{"id": ', "application/json"),
        ("<html>ok</html>", "text/html"),
        ('{"id": "ch_1"}', "application/json"),
    ],
    ids=["malformed-json", "html", "missing-status"],
)
def test_unreadable_success_is_outcome_unknown(client, mocked, body, content_type):
    mocked.post(URL, body=body, status=200, content_type=content_type)
    with pytest.raises(PaymentOutcomeUnknown) as info:
        client.charge(charge_request(100, key="k"))
    assert info.value.code == "provider_response_invalid"


def test_deadline_bounds_the_total_time(settings, mocked, clock):
    """Each attempt's read timeout is clamped to what is left of PAYMENT_DEADLINE."""
    settings = settings.with_overrides(payment_deadline=12.0, payment_max_retries=10)
    client = PaymentClient(
        settings,
        session=build_session(settings),
        breaker=CircuitBreaker(50, 30),
        clock=clock,
        sleep=clock.sleep,
        jitter=lambda f: 0.0,
    )

    def slow_timeout(request):
        clock.now += request.req_kwargs["timeout"][1]  # the attempt uses its whole timeout
        raise requests.exceptions.ReadTimeout("read timed out")

    mocked.add_callback(responses.POST, URL, callback=slow_timeout)
    started = clock.now
    with pytest.raises(PaymentOutcomeUnknown):
        client.charge(charge_request(100, key="k"))
    assert clock.now - started <= 12.0
    read_timeouts = [c.request.req_kwargs["timeout"][1] for c in mocked.calls]
    assert read_timeouts[0] == 5.0 and read_timeouts[-1] < 5.0
    assert len(read_timeouts) < 11


def test_breaker_opens_after_failures_and_lets_a_trial_through(settings, mocked, clock):
    settings = settings.with_overrides(payment_max_retries=0)
    breaker = CircuitBreaker(5, 30, clock=clock)
    client = PaymentClient(
        settings, session=build_session(settings), breaker=breaker, clock=clock, sleep=clock.sleep
    )
    refused = MaxRetryError(None, URL, NewConnectionError(None, "Connection refused"))
    mocked.post(URL, body=requests.exceptions.ConnectionError(refused))
    for _ in range(5):
        with pytest.raises(PaymentServiceUnavailable):
            client.charge(charge_request(100, key="k"))
    assert breaker.state == "open"
    calls_when_opened = len(mocked.calls)
    started = time.perf_counter()
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge(charge_request(100, key="k"))
    assert time.perf_counter() - started < 0.01
    assert info.value.code == "breaker_open" and 0 < info.value.retry_after <= 30
    assert len(mocked.calls) == calls_when_opened  # nothing sent while open

    clock.now += 30
    mocked.replace(responses.POST, URL, json=CHARGE, status=201)
    assert client.charge(charge_request(key="k")).value.status == "succeeded"  # the trial call
    assert breaker.state == "closed"


def test_declines_do_not_open_the_breaker(client, mocked):
    mocked.post(URL, status=402, json={"error": {"code": "card_declined"}})
    for _ in range(10):
        with pytest.raises(PaymentDeclined):
            client.charge(charge_request(100, key="k"))
    assert client.breaker.state == "closed"


def test_lookup_by_key(client, mocked):
    mocked.get(URL, json={"data": [CHARGE]})
    reply = client.find_charges(lookup("key-9"))
    assert [(c.id, c.status, c.amount_minor) for c in reply.value] == [("ch_1", "succeeded", 2599)]
    assert len(reply.attempts) == 1
    assert mocked.calls[0].request.params == {"idempotency_key": "key-9"}


def test_a_charge_for_another_amount_is_not_taken_as_success(client, mocked, caplog):
    mocked.post(URL, json={**CHARGE, "amount": 2600}, status=201)
    with pytest.raises(PaymentOutcomeUnknown) as info:
        client.charge(charge_request(key="k"))
    assert info.value.code == "provider_amount_mismatch"
    assert any(r.levelname == "CRITICAL" for r in caplog.records)


TLS_FAILURE = requests.exceptions.SSLError("certificate verify failed")
POOL_BUSY = EmptyPoolError(None, "Pool reached maximum size and no more connections are allowed.")


@pytest.mark.parametrize(
    "then",
    [POOL_BUSY, TLS_FAILURE, 400, 401, 404, 422],
    ids=["pool-busy", "tls-error", "400", "401", "404", "422"],
)
def test_after_a_read_timeout_only_a_definitive_answer_settles_the_charge(client, mocked, then):
    """The first attempt may have charged: what follows it cannot prove it did not."""
    mocked.post(URL, body=requests.exceptions.ReadTimeout("read timed out"))
    if isinstance(then, int):
        mocked.post(URL, status=then, json={"error": {"code": "invalid_request"}})
    else:
        mocked.post(URL, body=then)
    with pytest.raises(PaymentOutcomeUnknown) as info:
        client.charge(charge_request(100, key="k"))
    assert "attempt 1 may have reached the provider" in info.value.message
    assert [a.error_kind for a in info.value.attempts][0] == "read"


def test_after_a_read_timeout_a_decline_is_definitive(client, mocked):
    mocked.post(URL, body=requests.exceptions.ReadTimeout("read timed out"))
    mocked.post(URL, status=402, json={"error": {"code": "card_declined"}})
    with pytest.raises(PaymentDeclined):
        client.charge(charge_request(100, key="k"))


@pytest.mark.parametrize(
    ("then", "code"),
    [(POOL_BUSY, "outbound_pool_busy"), (TLS_FAILURE, "provider_tls_error")],
    ids=["pool-busy", "tls-error"],
)
def test_without_a_request_that_may_have_arrived_local_failures_mean_not_charged(
    client, mocked, then, code
):
    mocked.post(URL, body=then)
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge(charge_request(100, key="k"))
    assert info.value.code == code


@pytest.mark.parametrize(
    "data",
    [
        {"data": [CHARGE, "not an object"]},
        {"data": {"id": "ch_1"}},
        {"data": [{**CHARGE, "id": 7}]},
    ],
    ids=["non-object-item", "not-a-list", "non-text-id"],
)
def test_an_unreadable_lookup_is_an_error_not_a_verdict(client, mocked, data):
    mocked.get(URL, json=data)
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.find_charges(lookup("k"))
    assert info.value.code == "provider_response_invalid"


def test_provider_failure_codes_and_messages_are_bounded(client, mocked):
    mocked.get(
        URL,
        json={
            "data": [
                {
                    **CHARGE,
                    "status": "failed",
                    "failure_code": "c" * 300,
                    "failure_message": "m\n" * 2000,
                }
            ]
        },
    )
    reply = client.find_charges(lookup("k"))
    (charge,) = reply.value
    assert charge.failure_code == "c" * 64 and len(charge.failure_message) <= 1000
    assert "\n" not in charge.failure_message
