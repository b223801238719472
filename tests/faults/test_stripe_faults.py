"""The provider fault rows on the Stripe path, end to end: gunicorn, a fault proxy, localstripe.

Every row of ``STRIPE`` (tests/faults/test_provider_faults.py) run end to end starts a
fresh service (``harness.BASE_ENV``, ``PAYMENT_PROVIDER=stripe``, ``PAYMENT_API_URL`` the
fault proxy of tests/support/fault_proxy.py in front of localstripe) on a fresh database
and sends one payment, with a new PaymentMethod, under the proxy's faults. It checks what
we answer and store, how many ``POST /v1/payment_intents`` reached "Stripe", our audit
trail, and what localstripe then holds under the key: a payment stored ``succeeded`` is
localstripe's one succeeded PaymentIntent for its key.

Where localstripe cannot play a part (it ignores ``Idempotency-Key``, so an answer lost
after it acted cannot be replayed; it cannot list PaymentIntents by ``created``, so an
``unknown`` payment cannot be reconciled against it), tests/unit/test_stripe_faults.py
plays it over ``responses``. What can be done here still is: a payment Stripe never
charged, sent again under its key while ``unknown``, is re-submitted and charged once.
"""

from __future__ import annotations

import contextlib
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import pytest
import requests

from tests.faults.harness import (
    attempt_count,
    blackhole_port,
    new_key,
    payment_by_key,
    refusing_port,
    running_service,
)
from tests.faults.test_provider_faults import (
    END_TO_END,
    RECONCILED_IN_UNIT,
    ROWS,
    STRIPE,
    StripeRow,
    stored_state,
)
from tests.support.fault_proxy import (
    DROP_AFTER,
    HANG,
    HANG_AFTER,
    HTML,
    MALFORMED_JSON,
    PASS,
    RESET,
    RESET_AFTER,
    WITHOUT_STATUS,
    Fault,
    FaultProxy,
    answer,
    latency,
    trickle,
    with_status,
)
from tests.support.localstripe import CARD_DECLINED_ON_CHARGE, CARD_OK, LocalStripeProcess

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres]


@dataclass(frozen=True)
class Play:
    """How a row is provoked: the proxy's script and then its fault for the rest, or a
    provider URL where nothing answers; the card; the service's extra environment;
    payments sent (under the same faults) before the measured one."""

    script: tuple[Fault, ...] = ()
    then: Fault = PASS
    provider: str = "proxy"  # or "refused", "blackhole"
    card: str = CARD_OK
    env: dict = field(default_factory=dict)
    failures_first: int = 0


PLAYS: dict[str, Play] = {
    "healthy provider": Play(),
    "connection refused": Play(provider="refused"),
    "connect timeout (accept queue full)": Play(provider="blackhole"),
    "hang (never answers, never charges)": Play(then=HANG),
    "connection reset before the charge": Play(script=(RESET,)),
    **{f"{status} on every attempt": Play(then=answer(status)) for status in (500, 502, 503, 504)},
    "503 once, then healthy": Play(script=(answer(503),)),
    "429 with Retry-After: 1 on every attempt": Play(then=answer(429, retry_after=1)),
    "429 with Retry-After: 30 (beyond the deadline)": Play(then=answer(429, retry_after=30)),
    "429 without Retry-After on every attempt": Play(then=answer(429)),
    "409 in progress on every attempt": Play(then=answer(409)),
    "answer trickled a byte every 400 ms (after charging), past the 3 s deadline": Play(
        script=(trickle(0.4),)
    ),
    "read timeout, then 400 on the retry": Play(script=(HANG, answer(400))),
    "malformed JSON after charging": Play(script=(MALFORMED_JSON,)),
    "HTML page (wrong content type) after charging": Play(script=(HTML,)),
    "200 without `status` after charging": Play(script=(WITHOUT_STATUS,)),
    "card declined (402)": Play(card=CARD_DECLINED_ON_CHARGE),
    # localstripe takes any key that looks like a secret key (sk_...), so this one is not.
    "provider refuses our API key (401)": Play(env={"PAYMENT_API_KEY": "rk_faults_not_a_key"}),
    "breaker open (after 2 failed payments)": Play(
        then=answer(503), env={"PAYMENT_BREAKER_FAILURES": "2"}, failures_first=2
    ),
}


def end_to_end_rows() -> list[str]:
    return [row.fault for row in ROWS if STRIPE[row.fault].run in (END_TO_END, RECONCILED_IN_UNIT)]


def test_every_fault_row_has_a_stripe_outcome_and_every_end_to_end_one_a_play():
    assert sorted(STRIPE) == sorted(row.fault for row in ROWS)
    assert sorted(PLAYS) == sorted(end_to_end_rows())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def proxy(localstripe: LocalStripeProcess):
    with FaultProxy(localstripe.url) as running:
        yield running


@pytest.fixture
def faults(proxy: FaultProxy):
    """The proxy without faults and with zeroed counters (before and after)."""
    proxy.reset()
    yield proxy
    proxy.reset()  # frees requests a row left hanging


@pytest.fixture
def stripe_service():
    """Start gunicorn services with PAYMENT_PROVIDER=stripe; all stop when the test ends."""
    with ExitStack() as stack:

        def start(provider_url: str, **env):
            return stack.enter_context(
                running_service(None, provider_url=provider_url, PAYMENT_PROVIDER="stripe", **env)
            )

        yield start


@contextlib.contextmanager
def provider_url(kind: str, proxy: FaultProxy):
    if kind == "refused":
        with refusing_port() as url:
            yield url
    elif kind == "blackhole":
        with blackhole_port() as url:
            yield url
    else:
        yield proxy.url


# --------------------------------------------------------------------------- the rows


def assert_stripe_books(service, localstripe: LocalStripeProcess, keys: list[str]) -> None:
    """Our payments under ``keys`` against localstripe's PaymentIntents under them: at
    most one succeeded PaymentIntent per key; ``succeeded`` here is exactly that one
    (id and amount), ``failed`` here has none (``unknown`` waits for reconciliation)."""
    for key in keys:
        ours = payment_by_key(service.database_url, key)
        intents = localstripe.payment_intents(key)
        succeeded = [i for i in intents if i["status"] == "succeeded"]
        assert len(succeeded) <= 1, f"{key} was charged twice: {succeeded}"
        if ours is None:
            assert not intents, key
        elif ours["status"] == "succeeded":
            (charged,) = succeeded
            assert (ours["provider_charge_id"], ours["amount_minor"]) == (
                charged["id"],
                charged["amount"],
            )
            assert ours["currency"].lower() == charged["currency"]
        elif ours["status"] == "failed":
            assert not succeeded, key


def expected_log(response, expected: StripeRow) -> tuple[str, str, str] | None:
    """The application record every answer of this kind writes (level, logger, start)."""
    if expected.status == 202:
        return ("ERROR", "payment_handler", "payment outcome unknown")
    if expected.status == 502:
        return ("CRITICAL", "providers.stripe", "Stripe rejected our credentials (HTTP 401")
    if expected.status >= 500:
        return ("WARNING", "service.problems", "payment request failed")
    return None


def has_record(service, response, wanted: tuple[str, str, str]) -> bool:
    return any(
        (r["level"], r["logger"]) == wanted[:2] and r["message"].startswith(wanted[2])
        for r in service.logs_for(response)
    )


@pytest.mark.parametrize("fault", end_to_end_rows())
def test_stripe_fault_row(fault, faults, stripe_service, localstripe):
    expected, play = STRIPE[fault], PLAYS[fault]
    keys = [new_key() for _ in range(play.failures_first + 1)]
    methods = [localstripe.payment_method(play.card) for _ in keys]
    with provider_url(play.provider, faults) as url:
        service = stripe_service(url, **play.env)
        faults.set_faults(*play.script, then=play.then)
        for key, method in zip(keys[:-1], methods, strict=False):
            assert service.pay(key, payment_method=method).status_code == 202
        key, method = keys[-1], methods[-1]
        before = faults.count()
        response = service.pay(key, payment_method=method)
        requests = faults.count() - before
        faults.set_faults()  # frees hung requests and trickling answers

    assert response.status_code == expected.status, response.text
    expected_type = "application/json" if expected.status < 300 else "application/problem+json"
    assert response.headers["Content-Type"] == expected_type
    assert response.headers.get("Retry-After") == expected.retry_after
    stored = payment_by_key(service.database_url, key)
    assert stored_state(stored) == expected.stored
    assert requests == expected.requests
    assert (stored["attempts"] if stored else 0) == expected.attempts
    if stored is not None:
        assert stored["attempts"] == attempt_count(service.database_url, stored["id"])
    assert len(localstripe.payment_intents(key)) == expected.intents
    log = expected_log(response, expected)
    if log is not None:
        assert has_record(service, response, log), service.logs_for(response)
    if expected.status >= 500:
        assert "Traceback" not in service.stderr()

    if expected.settled == "succeeded":
        # The fault hid a charge: localstripe holds it; reconciliation (unit) finds it.
        (intent,) = localstripe.payment_intents(key)
        assert intent["status"] == "succeeded" and intent["amount"] == 1000
    elif expected.settled or expected.stored == "succeeded":
        # The same key again: a charge that happened replays without a request; one
        # Stripe never received is re-submitted under the same key and charged once.
        again = service.pay(key, payment_method=method)
        assert again.status_code == 201, again.text
        replayed = expected.stored == "succeeded"
        assert again.headers.get("Idempotent-Replayed") == ("true" if replayed else None)
        assert faults.count() - before - requests == (0 if replayed else 1)
        assert [i["status"] for i in localstripe.payment_intents(key)] == ["succeeded"]
    assert_stripe_books(service, localstripe, keys)


# --------------------------------------------------------------------------- the proxy itself


def post_intent(proxy: FaultProxy, localstripe: LocalStripeProcess, key: str, timeout=2.0):
    data = {
        "amount": "1000",
        "currency": "usd",
        "payment_method": localstripe.payment_method(),
        "confirm": "true",
        "metadata[idempotency_key]": key,
    }
    headers = {"Authorization": f"Bearer {localstripe.api_key}", "Idempotency-Key": key}
    return requests.post(
        f"{proxy.url}/v1/payment_intents", data=data, headers=headers, timeout=timeout
    )


@pytest.mark.parametrize(
    ("fault", "error", "made"),
    [
        (HANG, requests.exceptions.ReadTimeout, 0),
        (RESET, requests.exceptions.ConnectionError, 0),
        (HANG_AFTER, requests.exceptions.ReadTimeout, 1),
        (RESET_AFTER, requests.exceptions.ConnectionError, 1),
        (DROP_AFTER, requests.exceptions.ConnectionError, 1),
    ],
    ids=["hang", "reset", "hang-after", "reset-after", "drop-after"],
)
def test_the_proxy_loses_answers_before_or_after_forwarding(
    fault, error, made, faults, localstripe
):
    key = new_key()
    faults.set_faults(fault)
    with pytest.raises(error):
        post_intent(faults, localstripe, key, timeout=0.5)
    faults.set_faults()
    assert len(localstripe.payment_intents(key)) == made
    assert faults.count() == 1 and faults.log()[-1][2] == fault.kind


def test_the_proxy_answers_as_stripe_and_rewrites_what_it_forwards(faults, localstripe):
    faults.set_faults(
        answer(429, retry_after=7, should_retry=True),
        with_status("processing"),
        latency(0.2),
        then=answer(500),
    )
    limited = post_intent(faults, localstripe, new_key())
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit"
    assert (limited.headers["Retry-After"], limited.headers["Stripe-Should-Retry"]) == ("7", "true")
    key = new_key()
    rewritten = post_intent(faults, localstripe, key)
    assert rewritten.status_code == 200 and rewritten.json()["status"] == "processing"
    assert [i["status"] for i in localstripe.payment_intents(key)] == ["succeeded"]
    started = time.monotonic()
    assert post_intent(faults, localstripe, new_key()).status_code == 200
    assert time.monotonic() - started >= 0.2
    for _ in range(2):
        assert post_intent(faults, localstripe, new_key()).json()["error"]["type"] == "api_error"
    # Only the route is faulted: every other request is forwarded as it came.
    faults.set_faults(then=answer(503))
    method = localstripe.payment_method()
    read = requests.get(
        f"{faults.url}/v1/payment_methods/{method}",
        headers={"Authorization": f"Bearer {localstripe.api_key}"},
        timeout=5,
    )
    assert read.status_code == 200 and read.json()["id"] == method
    assert faults.count("GET", f"/v1/payment_methods/{method}") == 1
