"""The sandbox provider's JSON contract (DESIGN.md section 5a), served by ``sandbox_provider/``.

``POST /v1/charges`` and ``POST /v1/refunds`` with a JSON body and ``Authorization:
Bearer <PAYMENT_API_KEY>``; ``GET /v1/charges?idempotency_key=`` and ``GET
/v1/refunds?idempotency_key=`` for reconciliation. Status codes mean: 200/201 a charge
or refund, 402 declined, 400 ``amount_too_large`` a refund over what is left of the
charge, 409 a request under our key is still in progress (so it may move money), 429
and 5xx unavailable (the transport retried them), any other 4xx our request was refused
(401/403: our credentials, logged at CRITICAL).

Events (``POST /v1/webhooks/sandbox``) are signed per Standard Webhooks; the
``standardwebhooks`` package checks the signature before the body is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import requests
from standardwebhooks.webhooks import Webhook

from errors import (
    PaymentDeclined,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
    RefundDeclined,
    RefundNotAllowed,
)
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

CHARGES_PATH = "/v1/charges"
REFUNDS_PATH = "/v1/refunds"
#: Standard Webhooks' tolerance, either way, for an event's signed timestamp.
EVENT_TOLERANCE = timedelta(minutes=5)
T = TypeVar("T")


class SandboxProvider:
    """Adapter for the sandbox contract.

    :param settings: ``PAYMENT_API_KEY`` is the bearer key sent with every request.
    """

    name = "sandbox"

    def __init__(self, settings: Settings):
        self._headers = {"Authorization": f"Bearer {settings.payment_api_key}"}

    def check_charge(self, request: ChargeRequest) -> None:
        """The sandbox takes any payment ``payment_request`` accepts."""

    def charge(self, transport: Transport, request: ChargeRequest) -> ProviderCharge:
        body = {
            "amount": request.amount_minor,
            "currency": request.currency,
            "payment_method": request.payment_method,
            "transaction_id": request.transaction_id,
            "description": request.description,
            "metadata": dict(request.metadata) if request.metadata else {},
        }
        answer = transport.send(
            "POST",
            CHARGES_PATH,
            idempotency_key=request.idempotency_key,
            headers=self._headers,
            json=body,
        )
        return self._charge_from(answer)

    def find_charges(self, transport: Transport, lookup: ChargeLookup) -> list[ProviderCharge]:
        return self._find(transport, CHARGES_PATH, lookup.idempotency_key, _charge)

    def refund(self, transport: Transport, request: RefundRequest) -> ProviderRefund:
        body = {
            "charge": request.provider_charge_id,
            "amount": request.amount_minor,
            "reason": request.reason,
            "metadata": dict(request.metadata) if request.metadata else {},
        }
        answer = transport.send(
            "POST",
            REFUNDS_PATH,
            idempotency_key=request.idempotency_key,
            headers=self._headers,
            json=body,
        )
        response = answer.response
        if response.status_code == 400 and _error_body(response).get("code") == "amount_too_large":
            raise RefundNotAllowed(
                "the provider has less than this left to refund on the charge",
                code="amount_exceeds_refundable",
            )
        refund = self._answered(answer, _refund, "refund")
        if refund.status is RefundStatus.FAILED:
            raise RefundDeclined(
                refund.failure_message or "the provider failed the refund",
                code=refund.failure_code or "refund_failed",
            )
        return refund

    def find_refunds(self, transport: Transport, lookup: RefundLookup) -> list[ProviderRefund]:
        return self._find(transport, REFUNDS_PATH, lookup.idempotency_key, _refund)

    def parse_event(
        self, payload: bytes, headers: Mapping[str, str], secret: str, now: datetime
    ) -> ProviderEvent:
        signed = {name: headers.get(name, "") for name in ("webhook-id", "webhook-timestamp")}
        try:
            sent = datetime.fromtimestamp(int(signed["webhook-timestamp"]), UTC)
        except (ValueError, OverflowError, OSError):
            raise InvalidEvent("missing or unreadable webhook-timestamp header") from None
        if abs(now - sent) > EVENT_TOLERANCE:
            raise InvalidEvent(f"the event was signed {abs(now - sent)} away from now")
        try:
            Webhook(secret).verify(
                payload,
                {**signed, "webhook-signature": headers.get("webhook-signature", "")},
                json_parse=False,
            )
        except Exception as exc:  # the verifier raises several kinds for bad input
            raise InvalidEvent(f"webhook signature not verified ({type(exc).__name__})") from None
        return _event(payload)

    def _find(
        self, transport: Transport, path: str, key: str, parse: Callable[[object], T]
    ) -> list[T]:
        answer = transport.send("GET", path, headers=self._headers, params={"idempotency_key": key})
        response = answer.response
        if response.status_code >= 500 or response.status_code == 429:
            raise PaymentServiceUnavailable(
                f"provider lookup failed: {answer.summary}", retry_after=answer.retry_after or 1.0
            )
        if response.status_code != 200:
            raise self._refused(response)
        try:
            data = response.json()["data"]
            if not isinstance(data, list):
                raise TypeError(f"data is a {type(data).__name__}, not a list")
            return [parse(item) for item in data]
        except (ValueError, KeyError, TypeError) as exc:
            raise PaymentServiceUnavailable(
                f"provider lookup answered with an unreadable body ({type(exc).__name__}: "
                f"{str(exc)[:80]})",
                code="provider_response_invalid",
            ) from None

    def _charge_from(self, answer: Answer) -> ProviderCharge:
        response = answer.response
        if response.status_code == 402:
            error = _error_body(response)
            raise PaymentDeclined(
                str(error.get("message") or "the card was declined")[:1000],
                code=str(error.get("code") or FailureCode.CARD_DECLINED)[:64],
            )
        charge = self._answered(answer, _charge, "charge")
        if charge.status is ChargeStatus.FAILED:
            raise PaymentDeclined(
                charge.failure_message or "the provider failed the charge",
                code=charge.failure_code or FailureCode.CHARGE_FAILED,
            )
        return charge

    def _answered(self, answer: Answer, parse: Callable[[object], T], what: str) -> T:
        """The object of a 200/201 answer to a request that moves money, or the error
        its status means."""
        response = answer.response
        status = response.status_code
        if status in (200, 201):
            try:
                if "json" not in response.headers.get("Content-Type", ""):
                    raise ValueError(f"content type {response.headers.get('Content-Type')!r}")
                return parse(response.json())
            except (ValueError, KeyError, TypeError) as exc:  # InvalidProviderData too
                raise PaymentOutcomeUnknown(
                    f"provider answered {status} with an unreadable {what} "
                    f"({type(exc).__name__}: {str(exc)[:80]}); reconciliation will settle it",
                    code="provider_response_invalid",
                ) from None
        if status == 409:
            raise PaymentOutcomeUnknown(
                f"provider answered {status} after a request that may have been processed; "
                "reconciliation will settle it"
            )
        if status == 429 or status >= 500:
            raise PaymentServiceUnavailable(
                f"provider unavailable: {answer.summary}", retry_after=answer.retry_after or 1.0
            )
        raise self._refused(response)

    @staticmethod
    def _refused(response: requests.Response) -> PaymentProviderError:
        status = response.status_code
        if status in (401, 403):
            log.critical(
                "payment provider rejected our credentials (HTTP %d): check PAYMENT_API_KEY",
                status,
            )
        error = _error_body(response)
        detail = str(error.get("message") or error.get("code") or "no detail")[:200]
        return PaymentProviderError(f"provider rejected the request with HTTP {status}: {detail}")


def _charge(body) -> ProviderCharge:
    """A sandbox charge object as a :class:`ProviderCharge`; ``KeyError`` or
    ``InvalidProviderData`` when it is not one."""
    if not isinstance(body, dict):
        raise InvalidProviderData(f"a charge must be an object, not {type(body).__name__}")
    return ProviderCharge(
        id=body["id"],
        status=body["status"],
        amount_minor=body.get("amount"),
        currency=body.get("currency"),
        failure_code=body.get("failure_code"),
        failure_message=body.get("failure_message"),
    )


def _error_body(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _refund(body) -> ProviderRefund:
    """A sandbox refund object as a :class:`ProviderRefund`."""
    if not isinstance(body, dict):
        raise InvalidProviderData(f"a refund must be an object, not {type(body).__name__}")
    return ProviderRefund(
        id=body["id"],
        status=body["status"],
        amount_minor=body.get("amount"),
        currency=body.get("currency"),
        charge_id=body.get("charge"),
        failure_code=body.get("failure_code") or body.get("failure_reason"),
        failure_message=body.get("failure_message"),
    )


#: Sandbox event types: which object they carry.
EVENT_OBJECTS = {
    "charge.succeeded": _charge,
    "charge.failed": _charge,
    "refund.succeeded": _refund,
    "refund.failed": _refund,
}


def _event(payload: bytes) -> ProviderEvent:
    """A verified sandbox event body as a :class:`ProviderEvent`. The sandbox sends only
    the four types of ``EVENT_OBJECTS``: anything else is not one of its events."""
    try:
        body = json.loads(payload)
        parse = EVENT_OBJECTS[body["type"]]
        created = body["created"]
        if isinstance(created, float) and created.is_integer():
            created = int(created)  # JSON's 5.0 is the integer 5
        if isinstance(created, bool) or not isinstance(created, int) or created < 0:
            raise TypeError("created is not a whole number of seconds since 1970")
        item = body["data"]["object"]
        parsed = parse(item)
        return ProviderEvent(
            id=body["id"],
            type=body["type"],
            created=datetime.fromtimestamp(created, UTC),
            charge=parsed if isinstance(parsed, ProviderCharge) else None,
            refund=parsed if isinstance(parsed, ProviderRefund) else None,
            idempotency_key=item.get("idempotency_key"),
        )
    except (ValueError, KeyError, TypeError, OverflowError, OSError) as exc:
        raise InvalidEvent(
            f"the event body is not a sandbox event ({type(exc).__name__})"
        ) from None
