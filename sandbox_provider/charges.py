"""Charge requests and charge objects of the provider wire contract (DESIGN.md section 5).

A request is validated into a :class:`ChargeRequest`; its fingerprint decides whether a
repeat of an idempotency key is the same request. The sandbox declines by payment
method, like a real provider's test tokens, so clients can drive the decline path.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

from money import CURRENCY_EXPONENTS

#: Test payment methods the sandbox declines: method -> (failure code, message).
DECLINES = {
    "card_declined": ("card_declined", "Your card was declined."),
    "tok_chargeDeclined": ("card_declined", "Your card was declined."),
    "insufficient_funds": ("insufficient_funds", "Your card has insufficient funds."),
}
MAX_TEXT = 500
MAX_DESCRIPTION = 5000


class InvalidCharge(ValueError):
    """The body of a charge request breaks the wire contract."""


@dataclass(frozen=True)
class ChargeRequest:
    amount: int
    currency: str
    payment_method: str
    transaction_id: str
    description: str | None
    metadata: dict | None

    @property
    def fingerprint(self) -> str:
        """Canonical form: two requests with this equal are the same request."""
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))


def parse_charge_request(body: bytes) -> ChargeRequest:
    """Validate a JSON charge body; raise :class:`InvalidCharge` naming the bad field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidCharge("body must be a JSON object") from None
    if not isinstance(data, dict):
        raise InvalidCharge("body must be a JSON object")
    amount = data.get("amount")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise InvalidCharge("amount must be a positive whole number of minor units")
    currency = data.get("currency")
    if not isinstance(currency, str) or currency not in CURRENCY_EXPONENTS:
        raise InvalidCharge(f"currency must be a supported ISO 4217 code, got {currency!r}")
    for name in ("payment_method", "transaction_id"):
        value = data.get(name)
        if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
            raise InvalidCharge(f"{name} must be a non-empty string")
    description = data.get("description")
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_DESCRIPTION
    ):
        raise InvalidCharge("description must be a string or null")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidCharge("metadata must be an object or null")
    return ChargeRequest(
        amount=amount,
        currency=currency,
        payment_method=data["payment_method"],
        transaction_id=data["transaction_id"],
        description=description,
        metadata=metadata,
    )


def make_charge(request: ChargeRequest, idempotency_key: str) -> dict:
    """The charge the sandbox records for ``request``: succeeded, or failed if declined."""
    failure_code, failure_message = DECLINES.get(request.payment_method, (None, None))
    return {
        "id": f"ch_{secrets.token_hex(12)}",
        "object": "charge",
        "status": "failed" if failure_code else "succeeded",
        "amount": request.amount,
        "currency": request.currency,
        "idempotency_key": idempotency_key,
        "transaction_id": request.transaction_id,
        "payment_method": request.payment_method,
        "description": request.description,
        "metadata": request.metadata,
        "failure_code": failure_code,
        "failure_message": failure_message,
        "created": int(time.time()),
    }


def charge_reply(charge: dict) -> tuple[int, dict]:
    """The status and body that answer the request that created ``charge``."""
    if charge["status"] == "failed":
        error = {
            "code": charge["failure_code"],
            "message": charge["failure_message"],
            "charge": charge["id"],
        }
        return 402, {"error": error}
    return 201, charge
