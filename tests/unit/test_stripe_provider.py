"""PaymentClient with the Stripe adapter: the wire format, every answer's meaning, events.

The HTTP layer is mocked with ``responses`` (the real session, retry loop, breaker and
money rule run); bodies are shaped like Stripe's documented objects and errors. What
localstripe cannot do (idempotency errors, 409/429/5xx, ``Stripe-Should-Retry``,
pagination, signed events) is covered here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

import pytest
import requests
import responses
import stripe

from circuit_breaker import CircuitBreaker
from connection_pool import build_session
from errors import (
    InvalidPaymentRequest,
    PaymentDeclined,
    PaymentInProgress,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
    RefundNotAllowed,
)
from payment_client import PaymentClient
from providers import load_provider
from providers.base import (
    ChargeLookup,
    ChargeStatus,
    InvalidEvent,
    RefundLookup,
    RefundRequest,
    RefundStatus,
)
from providers.stripe import (
    STRIPE_API_VERSION,
    StripeProvider,
    derived_key,
    stripe_amount,
)
from tests.support.charges import CREATED_AT, charge_request

API = "https://stripe.test"
INTENTS = f"{API}/v1/payment_intents"
REFUNDS = f"{API}/v1/refunds"
SECRET_KEY = "sk_test_51Hx0TopSecretKey4242"
PM = "pm_1Q0PsIJvEtkwdCNYMSaVuRz6"
PI = "pi_3MtwBwLkdIwHu7ix28a3tqPa"
KEY = "order-7-key"
PAYMENT_ID = "pay_000000000000000000000007"
NOW = CREATED_AT.timestamp() + 120
WEBHOOK_SECRET = "whsec_test_5WbX5kEWLlfzsGNjH64I8lOOqUB6e8FH"


# -- Stripe's objects, as its API documents them ------------------------------------------


def intent(status="succeeded", *, id=PI, amount=2599, currency="usd", key=KEY, **fields):
    """A PaymentIntent as Stripe returns it."""
    body = {
        "id": id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_received": amount if status == "succeeded" else 0,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": "automatic",
        "client_secret": f"{id}_secret_Dm43xiq1k0ywrRRjDoi8y1gkM",
        "confirmation_method": "automatic",
        "created": int(NOW),
        "currency": currency,
        "customer": None,
        "description": None,
        "last_payment_error": None,
        "latest_charge": "ch_3MtwBwLkdIwHu7ix2j8L4bJ0" if status == "succeeded" else None,
        "livemode": False,
        "metadata": {"idempotency_key": key, "payment_id": PAYMENT_ID} if key else {},
        "next_action": None,
        "payment_method": PM,
        "payment_method_types": ["card"],
        "status": status,
    }
    return {**body, **fields}


def card_error(code, decline_code=None, message="Your card was declined.", pi_status=None):
    """A 402 card error; Stripe attaches the PaymentIntent it left behind."""
    error = {
        "type": "card_error",
        "code": code,
        "doc_url": f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}",
        "message": message,
        "charge": "ch_3MtwBwLkdIwHu7ix2j8L4bJ0",
        "request_log_url": "https://dashboard.stripe.com/test/logs/req_xn6Ha7gH6QNpWa",
    }
    if decline_code:
        error["decline_code"] = decline_code
    if pi_status:
        last_error = {k: v for k, v in error.items() if k != "request_log_url"}
        error["payment_intent"] = intent(pi_status, last_payment_error=last_error)
    return {"error": error}


def invalid_request(message, code=None, param=None, type="invalid_request_error"):
    error = {"type": type, "message": message}
    if code:
        error |= {"code": code, "doc_url": f"https://stripe.com/docs/error-codes/{code}"}
    if param:
        error["param"] = param
    return {"error": error}


IDEMPOTENCY_ERROR = invalid_request(
    f"Keys for idempotent requests can only be used with the same parameters they were first "
    f"used with. Try using a key other than '{KEY}' if you meant to execute a different "
    "request.",
    type="idempotency_error",
)
KEY_IN_USE = invalid_request(
    "There is currently another in-progress request using this Idempotent Key (that probably "
    f"means you submitted twice, and the other request is still going through): {KEY}. Please "
    "try again later.",
    code="idempotency_key_in_use",
)
RATE_LIMITED = invalid_request(
    "Request rate limit exceeded. Learn more about rate limits here "
    "https://stripe.com/docs/rate-limits.",
    code="rate_limit",
)
LOCK_TIMEOUT = invalid_request(
    "This object cannot be accessed right now because another API request or Stripe process "
    "is currently accessing it. If you see this error intermittently, retry the request.",
    code="lock_timeout",
)
API_ERROR = {"error": {"type": "api_error", "message": "An unknown error occurred"}}


def refund(status="succeeded", *, id="re_3MtwBwLkdIwHu7ix2ECQ1hSV", amount=1000, key="refund-1"):
    return {
        "id": id,
        "object": "refund",
        "amount": amount,
        "balance_transaction": "txn_3MtwBwLkdIwHu7ix2kKc0F7o",
        "charge": "ch_3MtwBwLkdIwHu7ix2j8L4bJ0",
        "created": int(NOW),
        "currency": "usd",
        "metadata": {"idempotency_key": key, "payment_id": PAYMENT_ID, "refund_id": "ref_1"},
        "payment_intent": PI,
        "reason": None,
        "receipt_number": None,
        "status": status,
        **({"failure_reason": "expired_or_canceled_card"} if status == "failed" else {}),
    }


def page(*objects, has_more=False, url="/v1/payment_intents"):
    return {"object": "list", "data": list(objects), "has_more": has_more, "url": url}


# -- the client under test --------------------------------------------------------------


@pytest.fixture
def settings(make_settings):
    return make_settings(
        payment_provider="stripe",
        payment_api_url=API,
        payment_api_key=SECRET_KEY,
        payment_max_retries=3,
        payment_backoff_factor=0.25,
    )


@pytest.fixture
def client(settings, fake_clock):
    return PaymentClient(
        settings,
        provider=StripeProvider(settings, clock=lambda: NOW),
        session=build_session(settings),
        breaker=CircuitBreaker(50, 30, clock=fake_clock),
        clock=fake_clock,
        sleep=fake_clock.sleep,
        jitter=lambda factor: 0.0,
    )


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(f"{API}/v1/payment_methods/{PM}", json=payment_method())
        yield rsps


def payment_method(customer=None):
    return {
        "id": PM,
        "object": "payment_method",
        "card": {"brand": "visa", "exp_month": 8, "exp_year": 2030, "last4": "4242"},
        "created": int(NOW),
        "customer": customer,
        "livemode": False,
        "metadata": {},
        "type": "card",
    }


def payment(**fields):
    """Our payment ``KEY`` of 25.99 USD with the PaymentMethod ``PM``."""
    return charge_request(**{"key": KEY, "payment_method": PM, "payment_id": PAYMENT_ID, **fields})


def calls(mocked, method, url):
    return [c.request for c in mocked.calls if c.request.method == method and c.request.url == url]


def form(request) -> list[tuple[str, str]]:
    return parse_qsl(request.body, keep_blank_values=True)


def test_the_provider_is_chosen_by_payment_provider(settings):
    assert isinstance(load_provider(settings), StripeProvider)


def test_the_pinned_api_version_is_the_one_stripe_python_is_built_for():
    assert stripe.api_version == STRIPE_API_VERSION


# -- charging -----------------------------------------------------------------------------


def test_a_charge_is_one_confirmed_off_session_payment_intent(client, mocked):
    mocked.post(INTENTS, json=intent())
    reply = client.charge(payment(description="Order 7", metadata={"order": "7", "lines": 2}))
    charge = reply.value
    assert (charge.id, charge.status, charge.amount_minor, charge.currency) == (
        PI,
        ChargeStatus.SUCCEEDED,
        2599,
        "USD",
    )
    (request,) = calls(mocked, "POST", INTENTS)
    assert request.headers["Authorization"] == f"Bearer {SECRET_KEY}"
    assert request.headers["Stripe-Version"] == STRIPE_API_VERSION
    assert request.headers["Idempotency-Key"] == KEY
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert form(request) == [
        ("amount", "2599"),
        ("currency", "usd"),
        ("payment_method", PM),
        ("payment_method_types[]", "card"),
        ("confirm", "true"),
        ("off_session", "true"),
        ("description", "Order 7"),
        ("metadata[idempotency_key]", KEY),
        ("metadata[lines]", "2"),
        ("metadata[order]", "7"),
        ("metadata[payment_id]", PAYMENT_ID),
    ]


def test_every_retry_sends_the_same_bytes_under_the_same_key(client, mocked, fake_clock):
    mocked.post(INTENTS, status=503, json=API_ERROR)
    mocked.post(INTENTS, status=503, json=API_ERROR)
    mocked.post(INTENTS, json=intent())
    reply = client.charge(payment(metadata={"b": "2", "a": "1"}))
    sent = calls(mocked, "POST", INTENTS)
    assert len(sent) == 3 and len({r.body for r in sent}) == 1
    assert {r.headers["Idempotency-Key"] for r in sent} == {KEY}
    assert reply.value.status is ChargeStatus.SUCCEEDED
    assert fake_clock.sleeps == [0.5]


def test_processing_is_pending(client, mocked):
    mocked.post(INTENTS, json=intent("processing"))
    assert client.charge(payment()).value.status is ChargeStatus.PENDING


def test_a_card_decline_carries_its_decline_code_and_cancels_the_payment_intent(client, mocked):
    body = card_error(
        "card_declined", "insufficient_funds", "Your card has insufficient funds.",
        pi_status="requires_payment_method",
    )  # fmt: skip
    mocked.post(INTENTS, status=402, json=body)
    mocked.post(f"{INTENTS}/{PI}/cancel", json=intent("canceled", cancellation_reason=None))
    with pytest.raises(PaymentDeclined, match="insufficient funds") as info:
        client.charge(payment())
    assert info.value.code == "insufficient_funds"
    assert len(calls(mocked, "POST", INTENTS)) == 1  # a decline is never retried
    (cancel,) = calls(mocked, "POST", f"{INTENTS}/{PI}/cancel")
    assert cancel.headers["Idempotency-Key"] == f"{KEY}:cancel"


def test_authentication_required_off_session_is_a_decline_and_is_canceled(client, mocked):
    body = card_error(
        "authentication_required", "authentication_required",
        "Your card was declined. This transaction requires authentication.",
        pi_status="requires_payment_method",
    )  # fmt: skip
    mocked.post(INTENTS, status=402, json=body)
    mocked.post(f"{INTENTS}/{PI}/cancel", json=intent("canceled"))
    with pytest.raises(PaymentDeclined) as info:
        client.charge(payment())
    assert info.value.code == "authentication_required"
    assert len(calls(mocked, "POST", f"{INTENTS}/{PI}/cancel")) == 1


def test_a_decline_without_a_payment_intent_cancels_nothing(client, mocked):
    mocked.post(INTENTS, status=402, json=card_error("expired_card", message="Expired."))
    with pytest.raises(PaymentDeclined) as info:
        client.charge(payment())
    assert info.value.code == "expired_card"
    assert [c.request.method for c in mocked.calls] == ["GET", "POST"]


@pytest.mark.parametrize(
    "status", ["requires_action", "requires_payment_method", "requires_confirmation"]
)
def test_a_payment_intent_waiting_for_the_customer_is_canceled_and_declined(client, mocked, status):
    next_action = {"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}}
    mocked.post(INTENTS, json=intent(status, next_action=next_action))
    mocked.post(f"{INTENTS}/{PI}/cancel", json=intent("canceled"))
    with pytest.raises(PaymentDeclined) as info:
        client.charge(payment())
    assert info.value.code == "authentication_required"
    assert len(calls(mocked, "POST", f"{INTENTS}/{PI}/cancel")) == 1


def test_a_cancel_that_fails_still_declines_and_is_logged(client, mocked, caplog):
    mocked.post(INTENTS, json=intent("requires_action"))
    mocked.post(f"{INTENTS}/{PI}/cancel", status=500, json=API_ERROR)
    with pytest.raises(PaymentDeclined):
        client.charge(payment())
    assert any("could not cancel PaymentIntent" in r.getMessage() for r in caplog.records)


def test_a_payment_intent_that_succeeded_before_its_cancel_is_a_success(client, mocked):
    mocked.post(INTENTS, json=intent("requires_action"))
    unexpected = invalid_request(
        "You cannot cancel this PaymentIntent because it has a status of succeeded.",
        code="payment_intent_unexpected_state",
    )
    unexpected["error"]["payment_intent"] = intent("succeeded")
    mocked.post(f"{INTENTS}/{PI}/cancel", status=400, json=unexpected)
    assert client.charge(payment()).value.status is ChargeStatus.SUCCEEDED


def test_a_canceled_payment_intent_is_declined(client, mocked):
    mocked.post(INTENTS, json=intent("canceled", cancellation_reason="automatic"))
    with pytest.raises(PaymentDeclined) as info:
        client.charge(payment())
    assert info.value.code == "automatic"


def test_an_idempotency_error_is_never_retried_and_may_have_charged(client, mocked, caplog):
    mocked.post(
        INTENTS, status=400, json=IDEMPOTENCY_ERROR, headers={"Stripe-Should-Retry": "true"}
    )
    with pytest.raises(PaymentOutcomeUnknown) as info:
        client.charge(payment())
    assert info.value.code == "idempotency_error"
    assert len(calls(mocked, "POST", INTENTS)) == 1
    assert any(r.levelname == "ERROR" for r in caplog.records)


def test_an_invalid_request_is_refused_without_retry(client, mocked):
    mocked.post(
        INTENTS,
        status=400,
        json=invalid_request("No such PaymentMethod: 'pm_x'", "resource_missing", "payment_method"),
    )
    with pytest.raises(PaymentProviderError, match="resource_missing"):
        client.charge(payment())
    assert len(calls(mocked, "POST", INTENTS)) == 1


def test_key_in_use_is_retried_then_in_progress(client, mocked):
    mocked.post(INTENTS, status=409, json=KEY_IN_USE)
    with pytest.raises(PaymentInProgress) as info:
        client.charge(payment())
    assert len(calls(mocked, "POST", INTENTS)) == 4
    assert info.value.retry_after > 0


def test_key_in_use_then_the_first_requests_answer(client, mocked):
    mocked.post(INTENTS, status=409, json=KEY_IN_USE)
    mocked.post(INTENTS, json=intent())
    assert client.charge(payment()).value.status is ChargeStatus.SUCCEEDED


def test_rate_limited_with_retry_after_waits_as_told_then_is_unavailable(
    client, mocked, fake_clock
):
    mocked.post(INTENTS, status=429, json=RATE_LIMITED, headers={"Retry-After": "2"})
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge(payment())
    assert info.value.retry_after == 2.0
    assert fake_clock.sleeps == [2.0, 2.0, 2.0]
    assert len(calls(mocked, "POST", INTENTS)) == 4


def test_rate_limited_without_retry_after_backs_off_then_is_unavailable(client, mocked, fake_clock):
    mocked.post(INTENTS, status=429, json=RATE_LIMITED)
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.charge(payment())
    assert info.value.retry_after == 1.0
    assert fake_clock.sleeps == [0.5, 1.0]  # urllib3 backoff: 0, 0.5, 1.0 (jitter pinned)


def test_a_lock_timeout_is_retried_as_stripe_advises(client, mocked):
    mocked.post(INTENTS, status=429, json=LOCK_TIMEOUT, headers={"Stripe-Should-Retry": "true"})
    mocked.post(INTENTS, json=intent())
    assert client.charge(payment()).value.status is ChargeStatus.SUCCEEDED


def test_a_500_is_indeterminate(client, mocked):
    mocked.post(INTENTS, status=500, json=API_ERROR)
    with pytest.raises(PaymentOutcomeUnknown):
        client.charge(payment())
    assert len(calls(mocked, "POST", INTENTS)) == 4


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_gateway_error_after_retries_may_have_charged(client, mocked, status):
    mocked.post(INTENTS, status=status, body="<html>Bad gateway</html>", content_type="text/html")
    with pytest.raises(PaymentOutcomeUnknown):
        client.charge(payment())


def test_should_retry_false_stops_a_retryable_status(client, mocked):
    mocked.post(INTENTS, status=500, json=API_ERROR, headers={"Stripe-Should-Retry": "false"})
    with pytest.raises(PaymentOutcomeUnknown):
        client.charge(payment())
    assert len(calls(mocked, "POST", INTENTS)) == 1


def test_should_retry_true_retries_a_status_that_is_otherwise_final(client, mocked):
    mocked.post(
        INTENTS,
        status=400,
        json=invalid_request("Try again.", "processing_error"),
        headers={"Stripe-Should-Retry": "true"},
    )
    mocked.post(INTENTS, json=intent())
    assert client.charge(payment()).value.status is ChargeStatus.SUCCEEDED
    assert len(calls(mocked, "POST", INTENTS)) == 2


@pytest.mark.parametrize("status", [401, 403])
def test_bad_credentials_are_critical_and_never_show_the_key(client, mocked, caplog, status):
    masked = f"Invalid API Key provided: sk_test_{'*' * 20}4242"
    mocked.post(INTENTS, status=status, json=invalid_request(masked))
    with pytest.raises(PaymentProviderError) as info:
        client.charge(payment())
    assert len(calls(mocked, "POST", INTENTS)) == 1
    assert [r.levelname for r in caplog.records].count("CRITICAL") == 1
    shown = [r.getMessage() for r in caplog.records] + [str(info.value)]
    assert not any(SECRET_KEY in text or "4242" in text for text in shown)


def test_an_unreadable_success_is_indeterminate(client, mocked):
    mocked.post(INTENTS, body="<html>ok</html>", content_type="text/html")
    with pytest.raises(PaymentOutcomeUnknown) as info:
        client.charge(payment())
    assert info.value.code == "provider_response_invalid"


def test_an_unknown_status_is_indeterminate(client, mocked):
    mocked.post(INTENTS, json=intent("requires_reconfirmation"))
    with pytest.raises(PaymentOutcomeUnknown):
        client.charge(payment())


# -- what is refused before anything is sent ---------------------------------------------


@pytest.mark.parametrize("value", ["card", "tok_visa", "pm_", "pm_bad id", "card_1Mx"])
def test_payment_method_must_be_a_payment_method_id(client, mocked, value):
    with pytest.raises(InvalidPaymentRequest, match="pm_") as info:
        client.charge(payment(payment_method=value))
    assert info.value.code == "invalid_payment_method"
    assert not mocked.calls


@pytest.mark.parametrize(
    ("amount_minor", "currency", "code"),
    [
        (49, "USD", "amount_too_small"),
        (29, "GBP", "amount_too_small"),
        (49, "JPY", "amount_too_small"),
        (600, "KRW", "amount_too_small"),  # 0.50 USD is about 700 KRW
        (100_000_000, "USD", "amount_too_large"),
        (1_000_000, "ISK", "amount_too_large"),  # 8 digits in Stripe's two-decimal ISK
        (1005, "KWD", "invalid_amount"),  # three decimals: the last one must be 0
    ],
)
def test_amounts_stripe_refuses_are_refused_before_sending(
    client, mocked, amount_minor, currency, code
):
    with pytest.raises(InvalidPaymentRequest) as info:
        client.charge(payment(amount_minor=amount_minor, currency=currency))
    assert info.value.code == code
    assert not mocked.calls


@pytest.mark.parametrize(
    ("amount_minor", "currency", "sent"),
    [(50, "USD", 50), (30, "GBP", 30), (50, "JPY", 50), (1010, "KWD", 1010), (500, "ISK", 50000)],
)
def test_amounts_are_sent_in_stripes_units(amount_minor, currency, sent):
    assert stripe_amount(amount_minor, currency, charge=True) == sent


def test_icelandic_kronur_are_two_decimal_at_stripe_both_ways(client, mocked):
    mocked.post(INTENTS, json=intent(amount=50000, currency="isk"))
    reply = client.charge(payment(amount_minor=500, currency="ISK"))
    assert ("amount", "50000") in form(calls(mocked, "POST", INTENTS)[0])
    assert (reply.value.amount_minor, reply.value.currency) == (500, "ISK")


@pytest.mark.parametrize(
    ("metadata", "named"),
    [
        ({"payment_id": "mine"}, "payment_id"),
        ({"idempotency_key": "mine"}, "idempotency_key"),
        ({"k" * 41: "v"}, "k" * 41),
        ({"note": "x" * 501}, "metadata[note]"),
        ({"a[b]": "v"}, "a[b]"),
        ({f"key{i}": "v" for i in range(49)}, "at most 48 keys"),
    ],
    ids=["reserved-payment-id", "reserved-key", "long-key", "long-value", "brackets", "51-keys"],
)
def test_metadata_beyond_stripes_limits_is_refused_naming_the_field(
    client, mocked, metadata, named
):
    with pytest.raises(InvalidPaymentRequest) as info:
        client.charge(payment(metadata=metadata))
    assert named in info.value.message and info.value.code == "invalid_metadata"
    assert not mocked.calls


def test_metadata_up_to_the_limit_is_sent_as_text(client, mocked):
    mocked.post(INTENTS, json=intent())
    metadata = {f"key{i}": i for i in range(46)} | {"nested": {"b": 1, "a": True}, "gone": None}
    client.charge(payment(metadata=metadata))
    sent = dict(form(calls(mocked, "POST", INTENTS)[0]))
    assert sent["metadata[key7]"] == "7" and sent["metadata[nested]"] == '{"a":true,"b":1}'
    assert "metadata[gone]" not in sent
    assert len([k for k in sent if k.startswith("metadata[")]) == 49


def test_a_payment_method_attached_to_a_customer_is_charged_with_it_and_remembered(client, mocked):
    mocked.replace(
        responses.GET, f"{API}/v1/payment_methods/{PM}", json=payment_method("cus_NffrFeUfNV2Hib")
    )
    mocked.post(INTENTS, json=intent(customer="cus_NffrFeUfNV2Hib"))
    client.charge(payment())
    client.charge(payment(key="order-8-key"))
    assert len(calls(mocked, "GET", f"{API}/v1/payment_methods/{PM}")) == 1
    for request in calls(mocked, "POST", INTENTS):
        assert ("customer", "cus_NffrFeUfNV2Hib") in form(request)


def test_an_unknown_payment_method_is_refused_before_charging(client, mocked):
    mocked.replace(
        responses.GET,
        f"{API}/v1/payment_methods/{PM}",
        status=404,
        json=invalid_request(f"No such PaymentMethod: '{PM}'", "resource_missing", "id"),
    )
    with pytest.raises(PaymentProviderError, match="resource_missing"):
        client.charge(payment())
    assert not calls(mocked, "POST", INTENTS)


def test_a_follow_up_key_stays_within_stripes_255_characters():
    assert derived_key("k" * 200, "cancel") == "k" * 200 + ":cancel"
    long = derived_key("k" * 250, "cancel")
    assert len(long) <= 255 and long != derived_key("k" * 251, "cancel")


# -- lookups ------------------------------------------------------------------------------


def charge_lookup(provider_charge_id=None) -> ChargeLookup:
    return ChargeLookup(PAYMENT_ID, KEY, provider_charge_id, CREATED_AT)


def test_a_known_payment_intent_is_read_by_id(client, mocked):
    mocked.get(f"{INTENTS}/{PI}", json=intent("succeeded"))
    (charge,) = client.find_charges(charge_lookup(PI)).value
    assert (charge.id, charge.status) == (PI, ChargeStatus.SUCCEEDED)
    assert not calls(mocked, "GET", INTENTS)


def list_calls(mocked):
    return [
        c.request for c in mocked.calls if c.request.path_url.startswith("/v1/payment_intents?")
    ]


def test_an_unknown_id_lists_payment_intents_around_the_payment_and_filters_on_our_key(
    client, mocked
):
    others = [intent(id=f"pi_other{i}", key=f"someone-else-{i}") for i in range(3)]
    mocked.get(INTENTS, json=page(others[0], intent(id="pi_new"), others[1], has_more=True))
    mocked.get(INTENTS, json=page(intent("canceled", id="pi_old"), others[2]))
    charges = client.find_charges(charge_lookup()).value
    assert [(c.id, c.status) for c in charges] == [
        ("pi_old", ChargeStatus.FAILED),
        ("pi_new", ChargeStatus.SUCCEEDED),
    ]
    first, second = list_calls(mocked)
    created = int(CREATED_AT.timestamp())
    assert first.params == {
        "created[gte]": str(created - 300),
        "created[lte]": str(int(NOW) + 300),
        "limit": "100",
    }
    assert second.params == {**first.params, "starting_after": "pi_other1"}


def test_no_payment_intent_under_our_key_means_stripe_never_saw_it(client, mocked):
    mocked.get(INTENTS, json=page(intent(id="pi_other", key="someone-else")))
    assert client.find_charges(charge_lookup()).value == []


@pytest.mark.parametrize(
    ("status", "extra", "neutral", "code"),
    [
        ("requires_action", {}, ChargeStatus.FAILED, "authentication_required"),
        (
            "requires_payment_method",
            {"last_payment_error": {"type": "card_error", "code": "card_declined",
                                    "decline_code": "do_not_honor", "message": "Declined."}},
            ChargeStatus.FAILED,
            "do_not_honor",
        ),
        ("requires_payment_method", {}, ChargeStatus.PENDING, None),
        ("requires_confirmation", {}, ChargeStatus.PENDING, None),
        ("processing", {}, ChargeStatus.PENDING, None),
        ("canceled", {"cancellation_reason": "abandoned"}, ChargeStatus.FAILED, "abandoned"),
    ],
)  # fmt: skip
def test_lookup_statuses(client, mocked, status, extra, neutral, code):
    mocked.get(f"{INTENTS}/{PI}", json=intent(status, **extra))
    (charge,) = client.find_charges(charge_lookup(PI)).value
    assert (charge.status, charge.failure_code) == (neutral, code)


def test_several_payment_intents_under_one_key_are_all_reported(client, mocked):
    mocked.get(
        INTENTS,
        json=page(intent(id="pi_second"), intent("canceled", id="pi_first")),
    )
    charges = client.find_charges(charge_lookup()).value
    assert [(c.id, c.status) for c in charges] == [
        ("pi_first", ChargeStatus.FAILED),
        ("pi_second", ChargeStatus.SUCCEEDED),
    ]


def test_a_list_too_long_to_read_proves_nothing(client, mocked):
    mocked.get(INTENTS, json=page(intent(id="pi_other", key="someone-else"), has_more=True))
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.find_charges(charge_lookup())
    assert info.value.code == "lookup_too_large"
    assert len(list_calls(mocked)) == 20


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_failed_lookup_is_unavailable_not_a_verdict(client, mocked, status):
    mocked.get(INTENTS, status=status, json=API_ERROR)
    with pytest.raises(PaymentServiceUnavailable):
        client.find_charges(charge_lookup())


def test_a_fractional_krona_is_not_one_of_our_payment_intents(client, mocked):
    mocked.get(f"{INTENTS}/{PI}", json=intent(amount=50050, currency="isk"))
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.find_charges(charge_lookup(PI))
    assert info.value.code == "provider_response_invalid"


def test_an_unreadable_lookup_is_unavailable_not_a_verdict(client, mocked):
    mocked.get(INTENTS, json={"object": "list", "data": {"id": PI}, "has_more": False})
    with pytest.raises(PaymentServiceUnavailable) as info:
        client.find_charges(charge_lookup())
    assert info.value.code == "provider_response_invalid"


# -- refunds ------------------------------------------------------------------------------


def refund_request(amount_minor=1000, reason=None, **fields) -> RefundRequest:
    values = dict(
        refund_id="ref_1",
        payment_id=PAYMENT_ID,
        idempotency_key="refund-1",
        provider_charge_id=PI,
        amount_minor=amount_minor,
        currency="USD",
        reason=reason,
        metadata=None,
        created_at=CREATED_AT,
    )
    return RefundRequest(**{**values, **fields})


def test_a_refund_is_posted_against_the_payment_intent_under_its_own_key(client, mocked):
    mocked.post(REFUNDS, json=refund())
    reply = client.refund(refund_request(reason="requested_by_customer", metadata={"ticket": "9"}))
    assert (reply.value.id, reply.value.status, reply.value.charge_id) == (
        "re_3MtwBwLkdIwHu7ix2ECQ1hSV",
        RefundStatus.SUCCEEDED,
        PI,
    )
    (request,) = calls(mocked, "POST", REFUNDS)
    assert request.headers["Idempotency-Key"] == "refund-1"
    assert form(request) == [
        ("payment_intent", PI),
        ("amount", "1000"),
        ("reason", "requested_by_customer"),
        ("metadata[idempotency_key]", "refund-1"),
        ("metadata[payment_id]", PAYMENT_ID),
        ("metadata[refund_id]", "ref_1"),
        ("metadata[ticket]", "9"),
    ]


def test_a_reason_stripe_has_no_word_for_goes_in_metadata(client, mocked):
    mocked.post(REFUNDS, json=refund())
    client.refund(refund_request(reason="customer changed their mind"))
    sent = dict(form(calls(mocked, "POST", REFUNDS)[0]))
    assert "reason" not in sent and sent["metadata[reason]"] == "customer changed their mind"


@pytest.mark.parametrize("status", ["pending", "requires_action"])
def test_a_refund_stripe_has_not_settled_is_pending(client, mocked, status):
    mocked.post(REFUNDS, json=refund(status))
    assert client.refund(refund_request()).value.status is RefundStatus.PENDING


@pytest.mark.parametrize("status", ["failed", "canceled"])
def test_a_refund_stripe_failed_is_declined(client, mocked, status):
    mocked.post(REFUNDS, json=refund(status))
    with pytest.raises(PaymentDeclined):
        client.refund(refund_request())


@pytest.mark.parametrize(
    "body",
    [
        invalid_request(
            "Charge ch_3MtwBwLkdIwHu7ix2j8L4bJ0 has already been refunded.",
            "charge_already_refunded",
        ),
        invalid_request(
            "Refund amount ($30.00) is greater than unrefunded amount on charge ($25.99)",
            param="amount",
        ),
    ],
    ids=["already-refunded", "greater-than-unrefunded"],
)
def test_refunding_more_than_is_left_is_refund_not_allowed(client, mocked, body):
    mocked.post(REFUNDS, status=400, json=body)
    with pytest.raises(RefundNotAllowed) as info:
        client.refund(refund_request(amount_minor=3000))
    assert info.value.code == "amount_exceeds_refundable" and info.value.http_status == 422
    assert len(calls(mocked, "POST", REFUNDS)) == 1


def test_another_refund_refusal_is_a_provider_error(client, mocked):
    mocked.post(REFUNDS, status=400, json=invalid_request("Charge is disputed.", "charge_disputed"))
    with pytest.raises(PaymentProviderError):
        client.refund(refund_request())


def test_a_refund_without_an_answer_may_have_been_made(client, mocked):
    for _ in range(4):
        mocked.post(REFUNDS, body=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(PaymentOutcomeUnknown):
        client.refund(refund_request())


def test_refunds_are_found_on_the_payment_intent_by_their_key(client, mocked):
    mocked.get(
        REFUNDS,
        json=page(
            refund(id="re_other", key="refund-2"),
            refund("pending", id="re_ours"),
            has_more=True,
            url="/v1/refunds",
        ),
    )
    mocked.get(REFUNDS, json=page(refund(id="re_old", key="refund-0"), url="/v1/refunds"))
    lookup = RefundLookup("ref_1", PAYMENT_ID, "refund-1", PI, None, CREATED_AT)
    (found,) = client.find_refunds(lookup).value
    assert (found.id, found.status) == ("re_ours", RefundStatus.PENDING)
    first, second = [c.request for c in mocked.calls]
    assert first.params == {"payment_intent": PI, "limit": "100"}
    assert second.params["starting_after"] == "re_ours"


def test_a_known_refund_is_read_by_id(client, mocked):
    mocked.get(f"{REFUNDS}/re_1", json=refund("failed", id="re_1"))
    lookup = RefundLookup("ref_1", PAYMENT_ID, "refund-1", PI, "re_1", CREATED_AT)
    (found,) = client.find_refunds(lookup).value
    assert (found.status, found.failure_code) == (RefundStatus.FAILED, "expired_or_canceled_card")


# -- events -------------------------------------------------------------------------------


def event(event_type="payment_intent.succeeded", obj=None, created=None):
    body = {
        "id": "evt_3MtwBwLkdIwHu7ix0vjtxwdE",
        "object": "event",
        "api_version": STRIPE_API_VERSION,
        "created": created or int(time.time()),
        "data": {"object": intent() if obj is None else obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": "req_xn6Ha7gH6QNpWa", "idempotency_key": KEY},
        "type": event_type,
    }
    return json.dumps(body).encode()


def signed(payload: bytes, at: float | None = None, secret: str = WEBHOOK_SECRET) -> dict:
    header = stripe.WebhookSignature.generate_signature_header(
        payload.decode(), secret, timestamp=int(at if at is not None else time.time())
    )
    return {"Stripe-Signature": header}


@pytest.fixture
def provider(settings):
    return StripeProvider(settings)


def parse(provider, payload, headers, secret=WEBHOOK_SECRET):
    return provider.parse_event(payload, headers, secret, datetime.now(UTC))


def test_a_signed_event_is_read(provider):
    parsed = parse(provider, event(), signed(event()))
    assert parsed.id == "evt_3MtwBwLkdIwHu7ix0vjtxwdE" and parsed.type == "payment_intent.succeeded"
    assert parsed.charge.id == PI and parsed.charge.status is ChargeStatus.SUCCEEDED
    assert parsed.idempotency_key == KEY and parsed.lookup is False


def test_the_signature_is_an_hmac_of_the_timestamp_and_the_body(provider):
    payload, at = event(), int(time.time())
    digest = hmac.new(WEBHOOK_SECRET.encode(), f"{at}.".encode() + payload, hashlib.sha256)
    header = f"t={at},v1={digest.hexdigest()}"
    assert parse(provider, payload, {"stripe-signature": header}).charge.id == PI


def test_during_a_secret_roll_any_v1_signature_may_match(provider):
    payload, at = event(), int(time.time())
    old = signed(payload, at, "whsec_old_secret")["Stripe-Signature"]
    new = signed(payload, at)["Stripe-Signature"]
    header = f"{old},v1={new.split('v1=')[1]},v0=ignored"
    assert parse(provider, payload, {"Stripe-Signature": header}).id.startswith("evt_")


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "missing Stripe-Signature"),
        ({"Stripe-Signature": "garbage"}, "malformed"),
        ({"Stripe-Signature": f"t={int(time.time())}"}, "no v1 signature"),
        ({"Stripe-Signature": f"t={int(time.time())},v1={'0' * 64}"}, "does not match"),
    ],
    ids=["missing", "malformed", "no-v1", "bad-signature"],
)
def test_an_unverified_delivery_is_refused(provider, headers, why):
    with pytest.raises(InvalidEvent, match=why) as info:
        parse(provider, event(), headers)
    assert WEBHOOK_SECRET not in str(info.value)


def test_a_body_changed_after_signing_is_refused(provider):
    headers = signed(event())
    with pytest.raises(InvalidEvent, match="does not match"):
        parse(provider, event("payment_intent.canceled"), headers)


def test_a_signature_made_with_another_secret_is_refused(provider):
    with pytest.raises(InvalidEvent, match="does not match"):
        parse(provider, event(), signed(event(), secret="whsec_someone_else"))


@pytest.mark.parametrize(
    ("offset", "why"), [(-600, "5 minutes old"), (600, "5 minutes in the future")]
)
def test_a_signature_ten_minutes_off_is_refused(provider, offset, why):
    payload = event()
    with pytest.raises(InvalidEvent, match=why):
        parse(provider, payload, signed(payload, time.time() + offset))


def test_a_signature_within_five_minutes_is_accepted(provider):
    payload = event()
    assert parse(provider, payload, signed(payload, time.time() + 240)).id
    assert parse(provider, payload, signed(payload, time.time() - 240)).id


def test_a_signed_body_that_is_not_an_event_is_refused(provider):
    payload = b'{"hello": "world"}'
    with pytest.raises(InvalidEvent, match="not a Stripe event"):
        parse(provider, payload, signed(payload))


def test_without_a_secret_nothing_is_accepted(provider):
    with pytest.raises(InvalidEvent, match="secret"):
        parse(provider, event(), signed(event()), secret="")


FAILED_PI = intent(
    "requires_payment_method",
    last_payment_error={"type": "card_error", "code": "card_declined",
                        "decline_code": "insufficient_funds", "message": "Insufficient funds."},
)  # fmt: skip


@pytest.mark.parametrize(
    ("event_type", "obj", "charge", "refund_status", "key"),
    [
        ("payment_intent.succeeded", intent(), ChargeStatus.SUCCEEDED, None, KEY),
        ("payment_intent.processing", intent("processing"), ChargeStatus.PENDING, None, KEY),
        ("payment_intent.payment_failed", FAILED_PI, ChargeStatus.FAILED, None, KEY),
        ("payment_intent.canceled", intent("canceled"), ChargeStatus.FAILED, None, KEY),
        ("refund.created", refund("pending"), None, RefundStatus.PENDING, "refund-1"),
        ("refund.updated", refund(), None, RefundStatus.SUCCEEDED, "refund-1"),
        ("refund.failed", refund("failed"), None, RefundStatus.FAILED, "refund-1"),
        ("customer.created", {"id": "cus_1", "object": "customer", "metadata": {}}, None, None,
         None),
    ],
)  # fmt: skip
def test_event_types_map_to_charges_and_refunds(
    provider, event_type, obj, charge, refund_status, key
):
    payload = event(event_type, obj)
    parsed = parse(provider, payload, signed(payload))
    assert (parsed.charge.status if parsed.charge else None) == charge
    assert (parsed.refund.status if parsed.refund else None) == refund_status
    assert parsed.idempotency_key == key and parsed.lookup is False


def test_a_declined_payment_event_carries_the_decline_code(provider):
    payload = event("payment_intent.payment_failed", FAILED_PI)
    charge = parse(provider, payload, signed(payload)).charge
    assert (charge.id, charge.failure_code) == (PI, "insufficient_funds")


def test_a_refund_event_names_the_payment_intent_as_its_charge(provider):
    payload = event("refund.updated", refund())
    assert parse(provider, payload, signed(payload)).refund.charge_id == PI


def test_charge_refunded_only_asks_for_a_lookup(provider):
    charge_object = {
        "id": "ch_3MtwBwLkdIwHu7ix2j8L4bJ0",
        "object": "charge",
        "amount": 2599,
        "amount_refunded": 2599,
        "currency": "usd",
        "metadata": {},
        "payment_intent": PI,
        "refunded": True,
        "status": "succeeded",
    }
    payload = event("charge.refunded", charge_object)
    parsed = parse(provider, payload, signed(payload))
    assert parsed.lookup is True and parsed.charge.id == PI and parsed.refund is None


def test_an_event_created_time_is_kept(provider):
    created = int(time.time()) - 3600  # Stripe retries deliveries for days
    payload = event(created=created)
    parsed = parse(provider, payload, signed(payload))
    assert parsed.created == datetime.fromtimestamp(created, UTC)
    assert parsed.created < datetime.now(UTC) - timedelta(minutes=59)
