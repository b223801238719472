"""The sandbox provider's JSON contract (DESIGN.md section 5a), served by ``sandbox_provider/``.

``POST /v1/charges`` with a JSON body and ``Authorization: Bearer <PAYMENT_API_KEY>``;
``GET /v1/charges?idempotency_key=`` for reconciliation. Status codes mean:
200/201 a charge, 402 declined, 409 a request under our key is still in progress (so
it may charge), 429 and 5xx unavailable (the transport retried them), any other 4xx our
request was refused (401/403: our credentials, logged at CRITICAL).
"""

from __future__ import annotations

import logging

import requests

from errors import (
    PaymentDeclined,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
)
from payment_states import FailureCode
from providers.base import (
    Answer,
    ChargeLookup,
    ChargeRequest,
    ChargeStatus,
    InvalidProviderData,
    ProviderCharge,
    Transport,
)
from settings import Settings

log = logging.getLogger(__name__)

CHARGES_PATH = "/v1/charges"


class SandboxProvider:
    """Adapter for the sandbox contract.

    :param settings: ``PAYMENT_API_KEY`` is the bearer key sent with every request.
    """

    name = "sandbox"

    def __init__(self, settings: Settings):
        self._headers = {"Authorization": f"Bearer {settings.payment_api_key}"}

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
        answer = transport.send(
            "GET",
            CHARGES_PATH,
            headers=self._headers,
            params={"idempotency_key": lookup.idempotency_key},
        )
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
            return [_charge(item) for item in data]
        except (ValueError, KeyError, TypeError) as exc:
            raise PaymentServiceUnavailable(
                f"provider lookup answered with an unreadable body ({type(exc).__name__}: "
                f"{str(exc)[:80]})",
                code="provider_response_invalid",
            ) from None

    def _charge_from(self, answer: Answer) -> ProviderCharge:
        response = answer.response
        status = response.status_code
        if status in (200, 201):
            return self._accepted(response)
        if status == 402:
            error = _error_body(response)
            raise PaymentDeclined(
                str(error.get("message") or "the card was declined")[:1000],
                code=str(error.get("code") or FailureCode.CARD_DECLINED)[:64],
            )
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
    def _accepted(response: requests.Response) -> ProviderCharge:
        try:
            if "json" not in response.headers.get("Content-Type", ""):
                raise ValueError(f"content type {response.headers.get('Content-Type')!r}")
            charge = _charge(response.json())
        except (ValueError, KeyError, TypeError) as exc:  # InvalidProviderData is a ValueError
            raise PaymentOutcomeUnknown(
                f"provider answered {response.status_code} with an unreadable charge "
                f"({type(exc).__name__}: {str(exc)[:80]}); reconciliation will settle it",
                code="provider_response_invalid",
            ) from None
        if charge.status is ChargeStatus.FAILED:
            raise PaymentDeclined(
                charge.failure_message or "the provider failed the charge",
                code=charge.failure_code or FailureCode.CHARGE_FAILED,
            )
        return charge

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
