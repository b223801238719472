"""Stripe's HTTP API (DESIGN.md section 5b): PaymentIntents, refunds and signed events.

A payment is one PaymentIntent created and confirmed server-side, off session:
``POST /v1/payment_intents``, form-encoded, under our ``Idempotency-Key``, with the
pinned :data:`STRIPE_API_VERSION`. What an answer means, and whether it is certain:

=============================================  ====================================
Stripe answers                                 we raise or return
=============================================  ====================================
200 ``succeeded``                              the charge, succeeded (certain)
200 ``processing`` (or ``requires_capture``)   the charge, pending
200 ``requires_action``/``_payment_method``/   ``PaymentDeclined``
``_confirmation``                              ``authentication_required`` (or its
                                               last error's code); the PaymentIntent
                                               is canceled
200 ``canceled``                               ``PaymentDeclined`` (certain)
402 card error                                 ``PaymentDeclined`` with its
                                               ``decline_code`` or ``code``; its
                                               PaymentIntent is canceled
400 ``idempotency_error``                      ``PaymentOutcomeUnknown``: an earlier
                                               request under our key may have charged
other 400, 404                                 ``PaymentProviderError`` (not charged)
401, 403                                       ``PaymentProviderError``, CRITICAL log
409 (our key in use)                           ``PaymentInProgress`` once retries ran out
429 (rate limit, ``lock_timeout``)             ``PaymentServiceUnavailable`` with
                                               ``retry_after`` (not charged)
5xx                                            ``PaymentOutcomeUnknown`` (Stripe may
                                               have acted on it)
=============================================  ====================================

``Stripe-Should-Retry`` decides whether an answer is retried (:func:`retry_hint`); the
transport retries 409, 429 and 5xx otherwise, never an ``idempotency_error``. Whatever
the transport sends before the last answer (a read timeout, say) still counts:
``payment_client`` turns "not charged" after a request that may have arrived into
``PaymentOutcomeUnknown``.

Lookups are strongly consistent: ``GET /v1/payment_intents/<id>`` when the id is known,
otherwise the list API over the payment's creation time, filtered on
``metadata[idempotency_key]`` (Search lags and is no proof of absence). Refunds are
``POST /v1/refunds`` and ``GET /v1/refunds?payment_intent=``. Events are verified with
the ``stripe`` package before anything in them is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import requests
import stripe

from errors import (
    InvalidPaymentRequest,
    PaymentDeclined,
    PaymentError,
    PaymentInProgress,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
    RefundDeclined,
    RefundNotAllowed,
)
from money import CURRENCIES, currency_exponent, to_major_units
from payment_states import FailureCode
from providers.base import (
    Answer,
    ChargeLookup,
    ChargeRequest,
    ChargeStatus,
    InvalidEvent,
    InvalidProviderData,
    ProviderCharge,
    ProviderEvent,
    ProviderRefund,
    RefundLookup,
    RefundRequest,
    RefundStatus,
    Transport,
)
from settings import Settings

log = logging.getLogger(__name__)

#: The API version every request asks for, and the one webhook endpoints must be created
#: with: the version stripe-python 16.1.0 is generated from (``stripe.api_version``).
STRIPE_API_VERSION = "2026-10-28.endive"

PAYMENT_INTENTS_PATH = "/v1/payment_intents"
PAYMENT_METHODS_PATH = "/v1/payment_methods"
REFUNDS_PATH = "/v1/refunds"

#: Seconds a webhook's signed timestamp may differ from our clock, either way.
WEBHOOK_TOLERANCE_S = 300
#: Objects per list page (Stripe's maximum) and pages read before a lookup gives up:
#: a list cut short proves nothing about what it did not reach.
LIST_PAGE_SIZE = 100
MAX_LIST_PAGES = 20
#: Seconds of clock difference allowed between us and Stripe when listing by ``created``.
CLOCK_SKEW_S = 300
#: PaymentMethod -> Customer ids remembered (a PaymentMethod never changes Customer).
CUSTOMER_CACHE_SIZE = 10_000

#: Stripe's metadata limits.
METADATA_MAX_KEYS = 50
METADATA_MAX_KEY_LENGTH = 40
METADATA_MAX_VALUE_LENGTH = 500
#: The metadata keys we set ourselves; a caller's metadata may not use them.
PAYMENT_ID = "payment_id"
IDEMPOTENCY_KEY = "idempotency_key"
REFUND_ID = "refund_id"
REASON = "reason"  # a refund reason Stripe has no word for

#: The ``reason`` values a Stripe refund accepts; any other text goes in its metadata.
REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
PAYMENT_METHOD_ID = re.compile(r"pm_[A-Za-z0-9_]{1,252}")
MAX_IDEMPOTENCY_KEY_LENGTH = 255

# Stripe's currency rules, where they differ from ISO 4217 (docs.stripe.com/currencies).
#: Stripe amount units per ISO minor unit: ISK is two-decimal in Stripe's API (100 is
#: one krona) and whole kronur only, so its amounts are always multiples of 100.
UNIT_SCALE = {"ISK": 100}
#: Stripe amounts must be multiples of this: three-decimal amounts end in 0.
AMOUNT_STEP = {"BHD": 10, "JOD": 10, "KWD": 10, "OMR": 10, "TND": 10}
#: At most 8 digits, in Stripe's units.
MAX_STRIPE_AMOUNT = 99_999_999
#: Stripe's published minimum charge per currency (major units); any other currency
#: needs at least :data:`MIN_CHARGE_USD` US dollars' worth at ``money.CURRENCIES``' rates.
#: Stripe applies the minimum of the account's settlement currency: these are the floor
#: it refuses below whatever the settlement, and its own 400 stays the final word.
MIN_CHARGE = {
    code: Decimal(amount)
    for code, amount in (
        pair.split("=")
        for pair in (
            "USD=0.50 AED=2.00 AUD=0.50 BRL=0.50 CAD=0.50 CHF=0.50 CZK=15.00 DKK=2.50 EUR=0.50 "
            "GBP=0.30 HKD=4.00 HUF=175.00 INR=0.50 JPY=50 MXN=10 MYR=2 NOK=3.00 NZD=0.50 "
            "PLN=2.00 RON=2.00 SEK=3.00 SGD=0.50 THB=10"
        ).split()
    )
}
MIN_CHARGE_USD = Decimal("0.50")

#: PaymentIntent statuses with a neutral meaning of their own.
INTENT_STATUSES = {
    "succeeded": ChargeStatus.SUCCEEDED,
    "processing": ChargeStatus.PENDING,
    "requires_capture": ChargeStatus.PENDING,  # never with automatic capture; not final
    "canceled": ChargeStatus.FAILED,
}
#: PaymentIntent statuses that need the customer, who is not present off session.
NEEDS_CUSTOMER = frozenset({"requires_action", "requires_payment_method", "requires_confirmation"})
AUTHENTICATION_REQUIRED = "authentication_required"
REFUND_STATUSES = {
    "succeeded": RefundStatus.SUCCEEDED,
    "pending": RefundStatus.PENDING,
    "requires_action": RefundStatus.PENDING,
    "failed": RefundStatus.FAILED,
    "canceled": RefundStatus.FAILED,
}
#: Event types applied to a payment (by type, whatever the object's status says).
INTENT_EVENTS = {
    "payment_intent.succeeded": ChargeStatus.SUCCEEDED,
    "payment_intent.processing": ChargeStatus.PENDING,
    "payment_intent.payment_failed": ChargeStatus.FAILED,
    "payment_intent.canceled": ChargeStatus.FAILED,
}
REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed"})
CHARGE_STATUSES = {"succeeded": ChargeStatus.SUCCEEDED, "pending": ChargeStatus.PENDING}


def retry_hint(response: requests.Response) -> bool | None:
    """Stripe's advice on retrying an answer: ``Stripe-Should-Retry`` when it sends one.

    An ``idempotency_error`` is never retried: the same request would be refused again.
    """
    if response.status_code == 400 and _error(response).get("type") == "idempotency_error":
        return False
    advice = response.headers.get("Stripe-Should-Retry")
    if advice == "true":
        return True
    if advice == "false":
        return False
    return None


class StripeProvider:
    """Adapter for Stripe's API.

    :param settings: ``PAYMENT_API_KEY`` is the secret key (``sk_live_...``/``sk_test_...``)
        sent as a bearer token with every request.
    :param clock: wall-clock seconds, for the upper end of a lookup's time window.
    """

    name = "stripe"

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time):
        self._headers = {
            "Authorization": f"Bearer {settings.payment_api_key}",
            "Stripe-Version": STRIPE_API_VERSION,
        }
        self._clock = clock
        self._customers = _BoundedCache(CUSTOMER_CACHE_SIZE)

    # -- payments ------------------------------------------------------------------------

    def check_charge(self, request: ChargeRequest) -> None:
        _payment_method(request.payment_method)
        stripe_amount(request.amount_minor, request.currency, charge=True)
        _metadata(
            request.metadata,
            {PAYMENT_ID: request.payment_id, IDEMPOTENCY_KEY: request.idempotency_key},
        )

    def charge(self, transport: Transport, request: ChargeRequest) -> ProviderCharge:
        payment_method = _payment_method(request.payment_method)
        amount = stripe_amount(request.amount_minor, request.currency, charge=True)
        metadata = _metadata(
            request.metadata,
            {PAYMENT_ID: request.payment_id, IDEMPOTENCY_KEY: request.idempotency_key},
        )
        customer = self._customer_of(transport, payment_method)
        # A list of pairs, built the same way from the same payment: byte-identical on
        # every retry and every re-submission, as Stripe's idempotency requires.
        data = [
            ("amount", str(amount)),
            ("currency", request.currency.lower()),
            ("payment_method", payment_method),
            ("payment_method_types[]", "card"),
            ("confirm", "true"),
            ("off_session", "true"),
        ]
        if customer is not None:
            data.append(("customer", customer))
        if request.description:
            data.append(("description", request.description))
        data += metadata
        answer = transport.send(
            "POST",
            PAYMENT_INTENTS_PATH,
            idempotency_key=request.idempotency_key,
            headers=self._headers,
            data=data,
            retry_hint=retry_hint,
        )
        response = answer.response
        if response.ok:
            intent = _answered_object(response)
            return _answered(lambda: self._settle(transport, intent, request.idempotency_key))
        error = _error(response)
        if response.status_code == 402:
            self._abandon(transport, error.get("payment_intent"), request.idempotency_key)
            raise PaymentDeclined(
                _text(error.get("message")) or "the card was declined",
                code=_decline_code(error) or FailureCode.CARD_DECLINED,
            )
        if isinstance(error.get("payment_intent"), dict):  # created, then refused: not charged
            self._abandon(transport, error["payment_intent"], request.idempotency_key)
        raise _failure(answer, error, moves_money=True)

    def _settle(self, transport: Transport, intent: dict, key: str) -> ProviderCharge:
        """The charge a PaymentIntent we just confirmed stands for, or its decline."""
        status = intent.get("status")
        if status in INTENT_STATUSES and status != "canceled":
            return _intent_charge(intent)
        if status in NEEDS_CUSTOMER:
            charged = self._abandon(transport, intent, key)
            if charged is not None:
                return charged
            error = intent.get("last_payment_error")
            error = error if isinstance(error, dict) else {}
            raise PaymentDeclined(
                _text(error.get("message"))
                or "the card needs the customer to authenticate, and the payment was made "
                "without the customer present",
                code=_decline_code(error) or AUTHENTICATION_REQUIRED,
            )
        if status == "canceled":
            failed = _intent_charge(intent)
            raise PaymentDeclined(
                failed.failure_message or "Stripe canceled the payment",
                code=failed.failure_code or FailureCode.CHARGE_FAILED,
            )
        raise PaymentOutcomeUnknown(
            f"Stripe answered with a PaymentIntent in status {str(status)[:40]!r}; "
            "reconciliation will settle it",
            code="provider_response_invalid",
        )

    def _abandon(self, transport: Transport, intent: object, key: str) -> ProviderCharge | None:
        """Cancel a PaymentIntent that waits for a customer who is not there.

        Declining it is not enough: it would stay confirmable. Returns its charge in the
        unlikely case it moved on meanwhile (succeeded or processing), else ``None``.
        A cancel that fails is logged: the PaymentIntent still cannot succeed without
        the customer, and lookups report it failed.
        """
        if not isinstance(intent, dict) or intent.get("status") not in NEEDS_CUSTOMER:
            return None
        intent_id = intent.get("id")
        if not isinstance(intent_id, str) or not intent_id.startswith("pi_"):
            return None
        try:
            answer = transport.send(
                "POST",
                f"{PAYMENT_INTENTS_PATH}/{intent_id}/cancel",
                idempotency_key=derived_key(key, "cancel"),
                headers=self._headers,
                data=[],
                retry_hint=retry_hint,
            )
        except PaymentError as exc:
            log.warning("could not cancel PaymentIntent %s (%s)", intent_id, exc.code)
            return None
        response = answer.response
        body = _json(response) if response.ok else _error(response).get("payment_intent")
        if not isinstance(body, dict) or not isinstance(body.get("status"), str):
            log.warning(
                "could not cancel PaymentIntent %s: HTTP %d", intent_id, response.status_code
            )
            return None
        if body["status"] in ("succeeded", "processing"):
            log.warning("PaymentIntent %s was %s when we canceled it", intent_id, body["status"])
            return _intent_charge(body)
        log.info("canceled PaymentIntent %s: it needed the customer", intent_id)
        return None

    def _customer_of(self, transport: Transport, payment_method: str) -> str | None:
        """The Customer a PaymentMethod is attached to (Stripe then requires ``customer``)."""
        customer = self._customers.get(payment_method)
        if customer is not None:
            return customer
        answer = transport.send(
            "GET",
            f"{PAYMENT_METHODS_PATH}/{payment_method}",
            headers=self._headers,
            retry_hint=retry_hint,
        )
        if not answer.response.ok:
            raise _failure(answer, _error(answer.response), moves_money=False)
        found = _read_object(answer, "PaymentMethod").get("customer")
        if isinstance(found, dict):  # expanded
            found = found.get("id")
        if isinstance(found, str) and found.startswith("cus_"):
            self._customers.put(payment_method, found)
            return found
        return None  # not attached: usable once, nothing worth remembering

    def find_charges(self, transport: Transport, lookup: ChargeLookup) -> list[ProviderCharge]:
        if lookup.provider_charge_id is not None:
            path = f"{PAYMENT_INTENTS_PATH}/{lookup.provider_charge_id}"
            answer = transport.send("GET", path, headers=self._headers, retry_hint=retry_hint)
            if not answer.response.ok:
                raise _failure(answer, _error(answer.response), moves_money=False)
            intents = [_read_object(answer, "PaymentIntent")]
        else:
            window = {
                "created[gte]": str(int(lookup.created_at.timestamp()) - CLOCK_SKEW_S),
                # Up to now: a re-submission creates its PaymentIntent when re-submitted.
                "created[lte]": str(int(self._clock()) + CLOCK_SKEW_S),
            }
            intents = self._list(transport, PAYMENT_INTENTS_PATH, window, lookup.idempotency_key)
            intents.reverse()  # oldest first: the last is the latest attempt
        return [_readable(_lookup_charge, intent) for intent in intents]

    # -- refunds -------------------------------------------------------------------------

    def refund(self, transport: Transport, request: RefundRequest) -> ProviderRefund:
        if not request.provider_charge_id.startswith("pi_"):
            raise InvalidPaymentRequest(
                f"payment's provider_charge_id {request.provider_charge_id[:40]!r} is not a "
                "Stripe PaymentIntent id",
                code="invalid_provider_charge_id",
            )
        amount = stripe_amount(request.amount_minor, request.currency, charge=False)
        reserved = {
            PAYMENT_ID: request.payment_id,
            REFUND_ID: request.refund_id,
            IDEMPOTENCY_KEY: request.idempotency_key,
        }
        data = [("payment_intent", request.provider_charge_id), ("amount", str(amount))]
        if request.reason in REFUND_REASONS:
            data.append(("reason", request.reason))
        elif request.reason:
            reserved[REASON] = request.reason
        data += _metadata(request.metadata, reserved)
        answer = transport.send(
            "POST",
            REFUNDS_PATH,
            idempotency_key=request.idempotency_key,
            headers=self._headers,
            data=data,
            retry_hint=retry_hint,
        )
        response = answer.response
        if response.ok:
            refund = _answered(_refund, _answered_object(response))
            if refund.status is RefundStatus.FAILED:
                raise RefundDeclined(
                    refund.failure_message or "Stripe failed the refund",
                    code=refund.failure_code or "refund_failed",
                )
            return refund
        error = _error(response)
        if response.status_code == 400 and is_over_refund(error):
            raise RefundNotAllowed(
                "Stripe has less left to refund on this payment than the refund's amount: "
                f"{_text(error.get('message')) or 'no detail'}",
                code="amount_exceeds_refundable",
            )
        if response.status_code == 402:
            raise RefundDeclined(
                _text(error.get("message")) or "Stripe declined the refund",
                code=_decline_code(error) or "refund_failed",
            )
        raise _failure(answer, error, moves_money=True)

    def find_refunds(self, transport: Transport, lookup: RefundLookup) -> list[ProviderRefund]:
        if lookup.provider_refund_id is not None:
            path = f"{REFUNDS_PATH}/{lookup.provider_refund_id}"
            answer = transport.send("GET", path, headers=self._headers, retry_hint=retry_hint)
            if not answer.response.ok:
                raise _failure(answer, _error(answer.response), moves_money=False)
            refunds = [_read_object(answer, "Refund")]
        else:
            params = {"payment_intent": lookup.provider_charge_id}
            refunds = self._list(transport, REFUNDS_PATH, params, lookup.idempotency_key)
            refunds.reverse()
        return [_readable(_refund, refund) for refund in refunds]

    def _list(
        self, transport: Transport, path: str, params: Mapping[str, str], key: str
    ) -> list[dict]:
        """Every object of a Stripe list whose ``metadata[idempotency_key]`` is ``key``.

        Reads every page (newest first) or fails: a list cut short is no proof that an
        object is absent, unless a succeeded one was already found.
        """
        found: list[dict] = []
        starting_after: str | None = None
        for _ in range(MAX_LIST_PAGES):
            page_params = {**params, "limit": str(LIST_PAGE_SIZE)}
            if starting_after is not None:
                page_params["starting_after"] = starting_after
            answer = transport.send(
                "GET", path, headers=self._headers, params=page_params, retry_hint=retry_hint
            )
            if not answer.response.ok:
                raise _failure(answer, _error(answer.response), moves_money=False)
            page = _read_object(answer, "list")
            items, has_more = page.get("data"), page.get("has_more")
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise _unreadable_lookup(answer, "list data is not a list of objects")
            found += [item for item in items if _metadata_key(item) == key]
            if has_more is not True or not items:
                return found
            starting_after = items[-1].get("id")
            if not isinstance(starting_after, str):
                raise _unreadable_lookup(answer, "list item without an id")
        if any(item.get("status") == "succeeded" for item in found):
            return found
        raise PaymentServiceUnavailable(
            f"Stripe lists more than {MAX_LIST_PAGES * LIST_PAGE_SIZE} objects for this "
            "lookup; it cannot prove that none is ours",
            code="lookup_too_large",
        )

    # -- events --------------------------------------------------------------------------

    def parse_event(
        self, payload: bytes, headers: Mapping[str, str], secret: str, now: datetime
    ) -> ProviderEvent:
        header = _header(headers, "Stripe-Signature")
        if not header:
            raise InvalidEvent("missing Stripe-Signature header")
        if not secret:
            raise InvalidEvent("no webhook secret is configured")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEvent("the body is not UTF-8") from None
        try:
            stripe.WebhookSignature.verify_header(
                text, header, secret, tolerance=WEBHOOK_TOLERANCE_S
            )
        except stripe.SignatureVerificationError as exc:
            raise InvalidEvent(_signature_failure(str(exc))) from None
        signed_at = _signed_at(header)
        if signed_at > now.timestamp() + WEBHOOK_TOLERANCE_S:
            raise InvalidEvent("Stripe-Signature timestamp is more than 5 minutes in the future")
        if signed_at < now.timestamp() - WEBHOOK_TOLERANCE_S:
            raise InvalidEvent("Stripe-Signature timestamp is more than 5 minutes old")
        try:
            return _event(json.loads(text))
        except (ValueError, KeyError, TypeError, OverflowError, OSError) as exc:
            raise InvalidEvent(
                f"the body is not a Stripe event we can read ({type(exc).__name__})"
            ) from None


# -- amounts and requests ------------------------------------------------------------------


def stripe_amount(amount_minor: int, currency: str, *, charge: bool) -> int:
    """``amount_minor`` (ISO 4217 minor units) in Stripe's units, checked against Stripe's
    rules for ``currency``; ``charge``: also its minimum charge. ``InvalidPaymentRequest``
    for an amount Stripe would refuse."""
    code = currency.upper()
    scale = UNIT_SCALE.get(code, 1)
    amount = amount_minor * scale
    step = AMOUNT_STEP.get(code, 1)
    if amount % step:
        raise InvalidPaymentRequest(
            f"Stripe takes {code} amounts in multiples of {to_major_units(step, code)} "
            f"(got {to_major_units(amount_minor, code)})",
            code="invalid_amount",
        )
    if amount > MAX_STRIPE_AMOUNT:
        raise InvalidPaymentRequest(
            f"Stripe takes at most {to_major_units(MAX_STRIPE_AMOUNT // scale, code)} {code} "
            "in one payment",
            code="amount_too_large",
        )
    if charge and amount_minor < min_charge_minor(code):
        raise InvalidPaymentRequest(
            f"Stripe's minimum charge in {code} is {to_major_units(min_charge_minor(code), code)}",
            code="amount_too_small",
        )
    return amount


def min_charge_minor(currency: str) -> int:
    """The smallest charge Stripe takes in ``currency``, in ISO minor units."""
    exponent = currency_exponent(currency)
    published = MIN_CHARGE.get(currency)
    if published is None:
        published = MIN_CHARGE_USD * CURRENCIES[currency].per_usd
    return math.ceil(published.scaleb(exponent))


def iso_amount(amount: object, currency: object) -> int | None:
    """A Stripe amount in ISO minor units; ``None`` when Stripe gave none."""
    if amount is None:
        return None
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidProviderData(f"amount {str(amount)[:32]!r} is not an integer")
    scale = UNIT_SCALE.get(currency.upper(), 1) if isinstance(currency, str) else 1
    if amount % scale:
        raise InvalidProviderData(f"{currency} amount {amount} is not a whole unit")
    return amount // scale


def derived_key(key: str, operation: str) -> str:
    """An idempotency key of its own for a follow-up ``operation`` on our key's object.

    Stripe scopes keys per endpoint: reusing ours on another one is an error.
    """
    derived = f"{key}:{operation}"
    if len(derived) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        return derived
    return f"{operation}:{hashlib.sha256(key.encode()).hexdigest()}"


def is_over_refund(error: Mapping[str, Any]) -> bool:
    """Whether a 400 says the charge has less left to refund than we asked.

    Stripe's ``code`` for it has changed over time, so its message counts as much: a
    refund we thought possible but Stripe refuses is not refunded either way.
    """
    if error.get("code") in ("charge_already_refunded", "amount_too_large"):
        return True
    message = str(error.get("message") or "").lower()
    return "already been refunded" in message or (
        "refund" in message and ("greater than" in message or "exceeds" in message)
    )


def _payment_method(value: str) -> str:
    if not PAYMENT_METHOD_ID.fullmatch(value):
        raise InvalidPaymentRequest(
            f"payment_method must be a Stripe PaymentMethod id (pm_...), got {value[:40]!r}",
            code="invalid_payment_method",
        )
    return value


def _metadata(
    caller: Mapping[str, Any] | None, reserved: Mapping[str, str]
) -> list[tuple[str, str]]:
    """The caller's metadata plus ours as form fields, within Stripe's limits.

    Text goes as it is; numbers, booleans and nested values as compact JSON; ``None`` is
    left out. Sorted, so the same metadata always encodes the same bytes.
    """
    fields: dict[str, str] = {}
    for key, value in (caller or {}).items():
        if key in reserved:
            raise InvalidPaymentRequest(
                f"metadata key {key!r} is reserved for the payment service", code="invalid_metadata"
            )
        if not isinstance(key, str) or not 0 < len(key) <= METADATA_MAX_KEY_LENGTH:
            raise InvalidPaymentRequest(
                f"metadata key {str(key)[:48]!r} must be 1 to {METADATA_MAX_KEY_LENGTH} "
                "characters for Stripe",
                code="invalid_metadata",
            )
        if "[" in key or "]" in key:
            raise InvalidPaymentRequest(
                f"metadata key {key!r} must not contain square brackets for Stripe",
                code="invalid_metadata",
            )
        if value is not None:
            fields[key] = (
                value
                if isinstance(value, str)
                else json.dumps(value, sort_keys=True, separators=(",", ":"))
            )
    fields.update(reserved)
    for key, text in fields.items():
        if len(text) > METADATA_MAX_VALUE_LENGTH:
            name = key if key in reserved else f"metadata[{key}]"
            raise InvalidPaymentRequest(
                f"{name} must be at most {METADATA_MAX_VALUE_LENGTH} characters for Stripe",
                code="invalid_metadata",
            )
    if len(fields) > METADATA_MAX_KEYS:
        raise InvalidPaymentRequest(
            f"metadata may have at most {METADATA_MAX_KEYS - len(reserved)} keys "
            f"(Stripe allows {METADATA_MAX_KEYS}, {len(reserved)} are the service's)",
            code="invalid_metadata",
        )
    return [(f"metadata[{key}]", fields[key]) for key in sorted(fields)]


# -- answers -------------------------------------------------------------------------------


def _failure(answer: Answer, error: Mapping[str, Any], *, moves_money: bool) -> PaymentError:
    """The error for a Stripe answer that is neither an object nor a decline.

    ``moves_money``: the request could have charged or refunded (a POST under our key),
    so only what Stripe certainly did not act on is "not charged".
    """
    status = answer.response.status_code
    # Stripe's message for bad credentials quotes the key (masked): keep it out.
    detail = _detail(error, with_message=status not in (401, 403))
    if error.get("type") == "idempotency_error":
        log.error("Stripe refused our idempotency key: %s", detail)
        if moves_money:
            return PaymentOutcomeUnknown(
                "Stripe holds another request under this idempotency key "
                f"({detail}); it may have charged, so reconciliation will settle it",
                code="idempotency_error",
            )
        return PaymentProviderError(f"Stripe refused the request: {detail}")
    answered = 400 <= status < 500 and status not in (409, 429)
    if status == 429 or (not moves_money and not answered):
        return PaymentServiceUnavailable(
            f"Stripe unavailable: {answer.summary} ({detail})",
            retry_after=answer.retry_after or 1.0,
        )
    if status == 409:
        return PaymentInProgress(
            f"another request under this idempotency key is still running at Stripe "
            f"({answer.summary})",
            retry_after=answer.retry_after or 1.0,
        )
    if not answered:
        return PaymentOutcomeUnknown(
            f"Stripe answered HTTP {status} ({detail}); it may have acted on the request, "
            "so reconciliation will settle it"
        )
    if status in (401, 403):
        log.critical(
            "Stripe rejected our credentials (HTTP %d, %s): check PAYMENT_API_KEY", status, detail
        )
    return PaymentProviderError(f"Stripe refused the request with HTTP {status}: {detail}")


def _detail(error: Mapping[str, Any], *, with_message: bool = True) -> str:
    names = ("type", "code", "param", "message") if with_message else ("type", "code")
    parts = [_text(error.get(name), 200) for name in names]
    return ", ".join(p for p in parts if p) or "no detail"


def _decline_code(error: Mapping[str, Any]) -> str | None:
    return _text(error.get("decline_code"), 64) or _text(error.get("code"), 64)


def _text(value: object, limit: int = 1000) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def _json(response: requests.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def _error(response: requests.Response) -> dict:
    body = _json(response)
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _answered_object(response: requests.Response) -> dict:
    """The object a money-moving request answered with; unreadable: outcome unknown."""
    body = _json(response)
    if not isinstance(body, dict):
        raise PaymentOutcomeUnknown(
            f"Stripe answered {response.status_code} with a body that is not an object; "
            "reconciliation will settle it",
            code="provider_response_invalid",
        )
    return body


def _read_object(answer: Answer, what: str) -> dict:
    body = _json(answer.response)
    if not isinstance(body, dict):
        raise _unreadable_lookup(answer, f"the {what} is not a JSON object")
    return body


def _unreadable_lookup(answer: Answer, why: str) -> PaymentServiceUnavailable:
    return PaymentServiceUnavailable(
        f"Stripe answered a lookup with HTTP {answer.response.status_code}: {why}",
        code="provider_response_invalid",
    )


T = TypeVar("T")
#: What reading a provider object that is not what it should be raises.
UNREADABLE = (InvalidProviderData, KeyError, TypeError, AttributeError)


def _readable(build: Callable[..., T], *args: Any) -> T:
    """``build(*args)``; an unreadable object is a failed lookup, never a verdict."""
    try:
        return build(*args)
    except UNREADABLE as exc:
        raise PaymentServiceUnavailable(
            f"Stripe answered a lookup with an unreadable object ({type(exc).__name__}: "
            f"{str(exc)[:80]})",
            code="provider_response_invalid",
        ) from None


def _answered(build: Callable[..., T], *args: Any) -> T:
    """``build(*args)``; an unreadable answer to a money-moving request: outcome unknown."""
    try:
        return build(*args)
    except UNREADABLE as exc:
        raise PaymentOutcomeUnknown(
            f"Stripe answered with an unreadable object ({type(exc).__name__}: "
            f"{str(exc)[:80]}); reconciliation will settle it",
            code="provider_response_invalid",
        ) from None


def _metadata_key(item: Mapping[str, Any]) -> object:
    metadata = item.get("metadata")
    return metadata.get(IDEMPOTENCY_KEY) if isinstance(metadata, dict) else None


def _intent_charge(
    intent: Mapping[str, Any], status: ChargeStatus | None = None, failure: str | None = None
) -> ProviderCharge:
    """A PaymentIntent as a :class:`ProviderCharge`, in the status given or its own.

    A failed one carries its ``last_payment_error`` (or its ``cancellation_reason``, or
    ``failure``) as failure code and message.
    """
    if status is None:
        status = INTENT_STATUSES.get(intent["status"], intent["status"])
    error = intent.get("last_payment_error")
    error = error if isinstance(error, dict) else {}
    failed = status is ChargeStatus.FAILED
    return ProviderCharge(
        id=intent["id"],
        status=status,
        amount_minor=iso_amount(intent.get("amount"), intent.get("currency")),
        currency=intent.get("currency"),
        failure_code=(
            _decline_code(error) or _text(intent.get("cancellation_reason"), 64) or failure
            if failed
            else None
        ),
        failure_message=_text(error.get("message")) if failed else None,
    )


def _lookup_charge(intent: Mapping[str, Any]) -> ProviderCharge:
    """A PaymentIntent found by a lookup, in neutral terms.

    A PaymentIntent waiting for a customer after its confirmation ended
    (``requires_action``, or ``requires_payment_method`` with a ``last_payment_error``)
    is failed: off session nobody can complete it, and the charge path cancels it. One
    not confirmed yet (``requires_confirmation``, ``requires_payment_method`` without an
    error) is pending: its confirmation may be running right now.
    """
    status = intent["status"]
    if status == "requires_action":
        return _intent_charge(intent, ChargeStatus.FAILED, AUTHENTICATION_REQUIRED)
    if status == "requires_payment_method" and isinstance(intent.get("last_payment_error"), dict):
        return _intent_charge(intent, ChargeStatus.FAILED)
    if status in ("requires_payment_method", "requires_confirmation"):
        return _intent_charge(intent, ChargeStatus.PENDING)
    return _intent_charge(intent)


def _refund(refund: Mapping[str, Any]) -> ProviderRefund:
    status = REFUND_STATUSES.get(refund["status"], refund["status"])
    failed = status is RefundStatus.FAILED
    return ProviderRefund(
        id=refund["id"],
        status=status,
        amount_minor=iso_amount(refund.get("amount"), refund.get("currency")),
        currency=refund.get("currency"),
        charge_id=refund.get("payment_intent"),
        failure_code=_text(refund.get("failure_reason"), 64) if failed else None,
        failure_message=f"Stripe {refund['status']} the refund" if failed else None,
    )


# -- events --------------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def _signed_at(header: str) -> int:
    """The ``t=`` of a verified ``Stripe-Signature`` (the first one, as the verifier reads)."""
    pairs = (item.split("=", 1) for item in header.split(","))
    return int(next(value for name, value in (p for p in pairs if len(p) == 2) if name == "t"))


def _signature_failure(reason: str) -> str:
    """Our words for the verifier's refusal (its text may quote the header)."""
    if reason.startswith("Timestamp outside the tolerance zone"):
        return "Stripe-Signature timestamp is more than 5 minutes old"
    if reason.startswith("No signatures found matching"):
        return "Stripe-Signature does not match the body"
    if reason.startswith("No signatures found with expected scheme"):
        return "Stripe-Signature has no v1 signature"
    if reason.startswith("Unable to extract timestamp"):
        return "Stripe-Signature header is malformed"
    return "Stripe-Signature verification failed"


def _event(body: Any) -> ProviderEvent:
    """A verified event body in neutral terms; ``KeyError``/``TypeError``/``ValueError``
    when it is not an event or its object is not what its type says."""
    event_type, created, obj = body["type"], body["created"], body["data"]["object"]
    if not isinstance(event_type, str) or not isinstance(obj, dict):
        raise TypeError("type or data.object has the wrong type")
    if isinstance(created, bool) or not isinstance(created, int):
        raise TypeError("created is not a Unix time")
    charge = refund = None
    lookup = False
    if event_type in INTENT_EVENTS:
        charge = _intent_charge(obj, INTENT_EVENTS[event_type])
    elif event_type in REFUND_EVENTS:
        refund = _refund(obj)
    elif event_type == "charge.refunded":
        lookup = True  # only a signal: the refund's own state is asked for
        intent_id = obj.get("payment_intent")
        if isinstance(intent_id, str):
            charge = ProviderCharge(
                id=intent_id,
                status=CHARGE_STATUSES.get(obj["status"], ChargeStatus.FAILED),
                amount_minor=iso_amount(obj.get("amount"), obj.get("currency")),
                currency=obj.get("currency"),
            )
    return ProviderEvent(
        id=body["id"],
        type=event_type,
        created=datetime.fromtimestamp(created, UTC),
        charge=charge,
        refund=refund,
        idempotency_key=_event_key(obj),
        lookup=lookup,
    )


def _event_key(obj: Mapping[str, Any]) -> str | None:
    """Our idempotency key from an object's metadata; ``None`` for one that is not ours."""
    key = _metadata_key(obj)
    if (
        isinstance(key, str)
        and 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH
        and key.isascii()
        and key.isprintable()
    ):
        return key
    return None


class _BoundedCache:
    """A thread-safe mapping that forgets its least recently used entries beyond ``size``."""

    def __init__(self, size: int):
        self._size = size
        self._items: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
