"""PaymentClient at the unit level: the exact wire format, retries, errors, deadline, breaker.

The HTTP layer is mocked with ``responses`` (which patches ``HTTPAdapter.send``, so the
real session, adapter and retry loop run); sleeping and jitter are injected.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
import responses
from urllib3.exceptions import MaxRetryError, NewConnectionError

from circuit_breaker import CircuitBreaker
from connection_pool import build_session
from errors import (
    InvalidPaymentRequest,
    PaymentDeclined,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
)
from payment_handler import TIMEOUT_MESSAGE, PaymentClient

URL = "https://provider.test/v1/charges"
CHARGE = {"id": "ch_1", "status": "succeeded", "amount": 2599, "currency": "USD"}


class FakeClock:
    """A monotonic clock the test advances; ``sleep`` advances it too."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


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
def clock():
    return FakeClock()


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
    charge = client.charge(
        25.99,
        "USD",
        idempotency_key="key-1",
        payment_method="card",
        transaction_id="order-7",
        description="Order 7",
        metadata={"order": 7},
    )
    assert charge.id == "ch_1" and charge.status == "succeeded"
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
    client.charge(500, "JPY", idempotency_key="k")
    assert json.loads(posts(mocked)[0].body)["amount"] == 500


def test_key_is_generated_once_and_reused_on_every_retry(client, mocked, clock):
    mocked.post(URL, status=503)
    mocked.post(URL, status=503)
    mocked.post(URL, json=CHARGE, status=201)
    charge = client.charge("25.99")
    sent = posts(mocked)
    assert len(sent) == 3
    keys = {r.headers["Idempotency-Key"] for r in sent}
    assert len(keys) == 1 and next(iter(keys)).startswith("pay-")
    assert [a.status for a in charge.attempts] == [503, 503, 201]
    assert clock.sleeps == [0.5]  # urllib3 backoff: 0 then 2 x 0.25 (jitter pinned to 0)


def test_retry_after_is_honoured(settings, mocked):
    """429 + Retry-After: 1 really waits about a second (real clock, real sleep)."""
    client = PaymentClient(settings, session=build_session(settings), breaker=CircuitBreaker(5, 30))
    mocked.post(URL, status=429, headers={"Retry-After": "1"})
    mocked.post(URL, json=CHARGE, status=201)
    started = time.monotonic()
    client.charge("25.99", idempotency_key="k")
    assert 0.9 <= time.monotonic() - started < 3.0
    assert len(posts(mocked)) == 2


def test_retry_after_beyond_the_deadline_gives_up_at_once(client, mocked, clock):
    mocked.post(URL, status=503, headers={"Retry-After": "120"})
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge("1.00", idempotency_key="k")
    assert info.value.retry_after == 120
    assert clock.sleeps == [] and len(posts(mocked)) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried(client, mocked, status, caplog):
    mocked.post(URL, status=status, json={"error": {"code": "bad", "message": "nope"}})
    with pytest.raises(PaymentProviderError, match=f"HTTP {status}"):
        client.charge("1.00", idempotency_key="k")
    assert len(posts(mocked)) == 1
    critical = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert bool(critical) == (status in (401, 403))
    assert all("sk_test_abc123" not in r.getMessage() for r in caplog.records)


def test_decline_raises_payment_declined_without_retry(client, mocked):
    mocked.post(
        URL, status=402, json={"error": {"code": "card_declined", "message": "Card declined."}}
    )
    with pytest.raises(PaymentDeclined, match="Card declined.") as info:
        client.charge("1.00", idempotency_key="k")
    assert info.value.code == "card_declined"
    assert len(posts(mocked)) == 1


def test_connect_error_is_service_unavailable_after_retries(client, mocked):
    for _ in range(4):
        mocked.post(URL, body=requests.exceptions.ConnectTimeout("connect timed out"))
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge("1.00", idempotency_key="k")
    assert isinstance(info.value, requests.exceptions.ConnectionError)  # old except clauses
    assert len(posts(mocked)) == 4  # first attempt + PAYMENT_MAX_RETRIES
    assert info.value.retry_after > 0


def test_read_timeout_on_every_attempt_is_outcome_unknown(client, mocked, caplog):
    for _ in range(4):
        mocked.post(URL, body=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(PaymentOutcomeUnknown) as info:
        client.charge("1.00", idempotency_key="k")
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
        client.charge("1.00", idempotency_key="k")


def test_read_timeout_then_503s_is_unknown_not_unavailable(client, mocked):
    """Once a request may have reached the provider, a later 5xx proves nothing."""
    mocked.post(URL, body=requests.exceptions.ReadTimeout("read timed out"))
    for _ in range(3):
        mocked.post(URL, status=503)
    with pytest.raises(PaymentOutcomeUnknown):
        client.charge("1.00", idempotency_key="k")


def test_409_in_progress_exhausted_is_unknown(client, mocked):
    for _ in range(4):
        mocked.post(URL, status=409, json={"error": {"code": "request_in_progress"}})
    with pytest.raises(PaymentOutcomeUnknown):
        client.charge("1.00", idempotency_key="k")
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
        client.charge("1.00", idempotency_key="k")
    assert info.value.code == "provider_response_invalid"


def test_deadline_bounds_the_total_time(settings, mocked):
    """Each attempt's read timeout is clamped to what is left of PAYMENT_DEADLINE."""
    clock = FakeClock()
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
        client.charge("1.00", idempotency_key="k")
    assert clock.now - started <= 12.0
    read_timeouts = [c.request.req_kwargs["timeout"][1] for c in mocked.calls]
    assert read_timeouts[0] == 5.0 and read_timeouts[-1] < 5.0
    assert len(read_timeouts) < 11


def test_invalid_amount_sends_nothing(client, mocked):
    with pytest.raises(InvalidPaymentRequest):
        client.charge("1.001", "USD")
    assert len(mocked.calls) == 0


def test_breaker_opens_after_failures_and_lets_a_trial_through(settings, mocked):
    clock = FakeClock()
    settings = settings.with_overrides(payment_max_retries=0)
    breaker = CircuitBreaker(5, 30, clock=clock)
    client = PaymentClient(
        settings, session=build_session(settings), breaker=breaker, clock=clock, sleep=clock.sleep
    )
    refused = MaxRetryError(None, URL, NewConnectionError(None, "Connection refused"))
    mocked.post(URL, body=requests.exceptions.ConnectionError(refused))
    for _ in range(5):
        with pytest.raises(PaymentServiceUnavailable):
            client.charge("1.00")
    assert breaker.state == "open"
    calls_when_opened = len(mocked.calls)
    started = time.perf_counter()
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge("1.00")
    assert time.perf_counter() - started < 0.01
    assert info.value.code == "breaker_open" and 0 < info.value.retry_after <= 30
    assert len(mocked.calls) == calls_when_opened  # nothing sent while open

    clock.now += 30
    mocked.replace(responses.POST, URL, json=CHARGE, status=201)
    assert client.charge("25.99").status == "succeeded"  # the trial call
    assert breaker.state == "closed"


def test_declines_do_not_open_the_breaker(client, mocked):
    mocked.post(URL, status=402, json={"error": {"code": "card_declined"}})
    for _ in range(10):
        with pytest.raises(PaymentDeclined):
            client.charge("1.00")
    assert client.breaker.state == "closed"


def test_lookup_by_key(client, mocked):
    mocked.get(URL, json={"data": [CHARGE]})
    charges, attempts = client.find_charges("key-9")
    assert charges == [CHARGE] and len(attempts) == 1
    assert mocked.calls[0].request.params == {"idempotency_key": "key-9"}


def test_a_charge_for_another_amount_is_not_taken_as_success(client, mocked, caplog):
    mocked.post(URL, json={**CHARGE, "amount": 2600}, status=201)
    with pytest.raises(PaymentOutcomeUnknown) as info:
        client.charge("25.99", idempotency_key="k")
    assert info.value.code == "provider_amount_mismatch"
    assert any(r.levelname == "CRITICAL" for r in caplog.records)
