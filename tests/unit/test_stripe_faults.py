"""The provider fault rows on the Stripe path that localstripe cannot play, over ``responses``.

localstripe ignores ``Idempotency-Key``: a retry after a lost answer makes a second
PaymentIntent there instead of Stripe's replay (or Stripe's 409 while the first request
still runs), and it cannot list PaymentIntents by ``created``, which reconciliation does
for a payment whose PaymentIntent id it never learnt. So these rows run here, through
the real lifecycle (``PaymentService`` over the in-memory store), ``PaymentClient`` (retry
loop, deadline, breaker, money rule) and ``StripeProvider``, with Stripe's answers scripted
in the shapes its API documents, under the fault suite's settings
(``tests/faults/harness.py`` ``BASE_ENV``):

- the rows marked ``unit (responses)`` in ``STRIPE`` (tests/faults/test_provider_faults.py)
  in full: the answer, what is stored, reconciliation and the same key again;
- the reconciliation of the rows whose ``unknown`` answer is played end to end
  (tests/faults/test_stripe_faults.py): the same first answers, then the list lookup
  finds the PaymentIntent the fault left behind (or none), then the same key again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
import requests
import responses
from urllib3.exceptions import ProtocolError

from circuit_breaker import CircuitBreaker
from connection_pool import build_session
from errors import PaymentError
from payment_client import PaymentClient
from payment_handler import PaymentService
from payment_request import build_request
from payment_states import PaymentStatus
from providers.stripe import StripeProvider
from tests.faults.test_provider_faults import (
    RECONCILED_IN_UNIT,
    STRIPE,
    UNIT,
    StripeRow,
)
from tests.support.clock import FakeClock
from tests.support.memory_store import MemoryPaymentStore, MemoryRefundStore
from tests.unit.lifecycle import EPOCH
from tests.unit.test_stripe_provider import (
    API,
    API_ERROR,
    INTENTS,
    KEY_IN_USE,
    PM,
    SECRET_KEY,
    intent,
    invalid_request,
    page,
    payment_method,
)

KEY = "order-stripe-fault-1"
FIRST_PI = "pi_3PfaultFirstIntent00001"
SECOND_PI = "pi_3PfaultResubmitted00002"

# -- what Stripe does on the wire --------------------------------------------------------

#: The request went out; no answer came before the read timeout.
READ_TIMEOUT = requests.exceptions.ReadTimeout("Read timed out. (read timeout=0.5)")
#: The request went out; the connection was reset before (or while) the answer came.
RESET = requests.exceptions.ConnectionError(
    ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))
)
#: The answer trickles in until the deadline cuts the exchange (the watchdog's doing).
PAST_DEADLINE = "past the deadline"


def stripe_json(status: int, body: object, **headers: str) -> tuple[int, dict, str]:
    return (
        status,
        {"Content-Type": "application/json", "Request-Id": "req_1", **headers},
        (json.dumps(body)),
    )


def answered(status: str = "succeeded", pi: str = FIRST_PI, **fields) -> dict:
    return intent(status, id=pi, amount=1000, key=KEY, **fields)


SUCCEEDED = stripe_json(200, answered())
#: Stripe's answer to a retry under a key whose request completed: the first answer again.
REPLAYED = stripe_json(200, answered(), **{"Idempotent-Replayed": "true"})
IN_PROGRESS = stripe_json(409, KEY_IN_USE)
BAD_REQUEST = stripe_json(
    400, invalid_request("Invalid integer: abc", "parameter_invalid_integer", "amount")
)
WITHOUT_STATUS = stripe_json(200, {k: v for k, v in answered().items() if k != "status"})


def server_error(status: int) -> tuple[int, dict, str]:
    return stripe_json(status, API_ERROR)


@dataclass
class Scenario:
    """Stripe's answers to our ``POST /v1/payment_intents``, in order, and whether the
    fault left a succeeded PaymentIntent behind (what the list lookup then finds)."""

    answers: list
    charged: bool


SCENARIOS: dict[str, Scenario] = {
    # Full rows: the answer is lost after Stripe acted; a retry under the key meets the
    # request still running (409) or its stored answer (a replay).
    "read timeout (provider takes 1 s, then charges)": Scenario(
        [READ_TIMEOUT, IN_PROGRESS, IN_PROGRESS], charged=True
    ),
    "hang after charging": Scenario([READ_TIMEOUT, REPLAYED], charged=True),
    "connection reset mid-response (after charging)": Scenario([RESET, REPLAYED], charged=True),
    # Reconciliation of the rows played end to end up to their unknown answer.
    "hang (never answers, never charges)": Scenario([READ_TIMEOUT] * 3, charged=False),
    **{
        f"{status} on every attempt": Scenario([server_error(status)] * 3, charged=False)
        for status in (500, 502, 503, 504)
    },
    "409 in progress on every attempt": Scenario([IN_PROGRESS] * 3, charged=False),
    "answer trickled a byte every 400 ms (after charging), past the 3 s deadline": Scenario(
        [PAST_DEADLINE], charged=True
    ),
    "read timeout, then 400 on the retry": Scenario([READ_TIMEOUT, BAD_REQUEST], charged=False),
    "malformed JSON after charging": Scenario(
        [(200, {"Content-Type": "application/json"}, '{"id": "pi_3Pfau')], charged=True
    ),
    "HTML page (wrong content type) after charging": Scenario(
        [(200, {"Content-Type": "text/html"}, "<html><body>Degraded</body></html>")],
        charged=True,
    ),
    "200 without `status` after charging": Scenario([WITHOUT_STATUS], charged=True),
}


# -- the lifecycle under test --------------------------------------------------------------


@dataclass
class StripeLife:
    service: PaymentService
    store: MemoryPaymentStore
    clock: FakeClock
    deadline: float
    posts: list = field(default_factory=list)

    def pay(self) -> tuple[int, PaymentError | None]:
        """``POST /v1/payments`` with ``KEY``, as the HTTP status it answers."""
        request = build_request(
            "10.00", PM, transaction_id=KEY, currency="USD", settings=self.service.settings
        )
        try:
            result = self.service.process(request)
        except PaymentError as exc:
            return exc.http_status, exc
        return (201 if result.status == PaymentStatus.SUCCEEDED else 202), None

    def stored(self) -> str:
        payment = self.store.find_by_key(KEY)
        if payment is None:
            return "not stored"
        if payment.status == PaymentStatus.FAILED:
            return f"failed: {payment.failure_code}"
        return payment.status.value


@pytest.fixture
def life(make_settings, fake_clock):
    settings = make_settings(
        payment_provider="stripe",
        payment_api_url=API,
        payment_api_key=SECRET_KEY,
        payment_connect_timeout=0.5,
        payment_read_timeout=0.5,
        payment_deadline=3.0,
        payment_max_retries=2,
        payment_backoff_factor=0.05,
        payment_breaker_failures=5,
        payment_breaker_reset=30.0,
    )

    def now():
        return EPOCH + timedelta(seconds=fake_clock.now)

    client = PaymentClient(
        settings,
        provider=StripeProvider(settings, clock=lambda: now().timestamp()),
        session=build_session(settings),
        breaker=CircuitBreaker(5, 30, clock=fake_clock),
        clock=fake_clock,
        sleep=fake_clock.sleep,
        jitter=lambda factor: 0.0,
    )
    store = MemoryPaymentStore(clock=now)
    service = PaymentService(
        settings,
        client=client,
        store=store,
        refund_store=MemoryRefundStore(store),
        now=now,
        sleep=fake_clock.sleep,
    )
    return StripeLife(service, store, fake_clock, settings.payment_deadline)


def stripe(life: StripeLife, scenario: Scenario) -> responses.RequestsMock:
    """Stripe as the scenario has it: its answers to our POSTs, then a PaymentIntent
    made by every later one (a re-submission), and the list of what it holds."""
    answers = list(scenario.answers)
    held: list[dict] = [answered()] if scenario.charged else []

    def create(request):
        life.posts.append(request)
        if answers:
            step = answers.pop(0)
            if step is PAST_DEADLINE:
                life.clock.advance(life.deadline + 0.1)  # each byte came within the timeout
                raise requests.exceptions.ReadTimeout("no complete answer within the deadline")
            if isinstance(step, Exception):
                raise step
            return step
        made = answered(pi=SECOND_PI)
        held.append(made)
        return stripe_json(200, made)

    def listing(request):
        assert {"created[gte]", "created[lte]", "limit"} <= set(request.params)
        return stripe_json(200, page(*reversed(held)))

    mock = responses.RequestsMock(assert_all_requests_are_fired=False)
    mock.get(f"{API}/v1/payment_methods/{PM}", json=payment_method())
    mock.add_callback(responses.POST, INTENTS, callback=create)
    mock.add_callback(responses.GET, INTENTS, callback=listing)
    mock.held = held  # type: ignore[attr-defined]
    return mock


def unit_rows() -> list[str]:
    return [fault for fault, row in STRIPE.items() if row.run in (UNIT, RECONCILED_IN_UNIT)]


def test_every_row_run_here_has_a_scenario():
    assert sorted(SCENARIOS) == sorted(unit_rows())


@pytest.mark.parametrize("fault", unit_rows())
def test_stripe_fault_row(fault, life):
    expected: StripeRow = STRIPE[fault]
    with stripe(life, SCENARIOS[fault]) as mock:
        status, error = life.pay()
        assert status == expected.status, error
        assert life.stored() == expected.stored
        assert len(life.posts) == expected.requests
        assert {r.headers["Idempotency-Key"] for r in life.posts} == {KEY}
        assert len({r.body for r in life.posts}) == 1  # byte-identical on every retry
        assert life.store.find_by_key(KEY).attempts == expected.attempts
        assert getattr(error, "retry_after", None) == expected.retry_after
        assert len(mock.held) == expected.intents

        if expected.settled:
            life.clock.advance(1)
            report = life.service.reconcile(older_than_seconds=0)
            assert (report.examined, report.errors) == (1, 0)
            assert life.stored() == expected.settled
            stored = life.store.find_by_key(KEY)
            if expected.settled == "succeeded":
                assert stored.provider_charge_id == FIRST_PI

        # The same key again: a charge Stripe made is replayed without a request; one it
        # never made is re-submitted under the same key and made once.
        posts = len(life.posts)
        again, _ = life.pay()
        assert again == 201 and life.stored() == "succeeded"
        resubmitted = expected.settled == "failed: not_received"
        assert len(life.posts) - posts == (1 if resubmitted else 0)
        assert sum(i["status"] == "succeeded" for i in mock.held) == 1
        assert life.store.find_by_key(KEY).provider_charge_id == (
            SECOND_PI if resubmitted else FIRST_PI
        )


def test_a_payment_method_read_without_an_answer_has_certainly_not_charged(life):
    # A GET cannot move money: its timeouts are no reason to call the payment unknown.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{API}/v1/payment_methods/{PM}", body=READ_TIMEOUT)
        mock.add_callback(responses.POST, INTENTS, callback=lambda request: SUCCEEDED)
        status, error = life.pay()
        assert not [c for c in mock.calls if c.request.method == "POST"]
    assert (status, life.stored()) == (503, "failed: provider_unavailable"), error
