"""Charge requests and charge objects of the provider wire contract (DESIGN.md section 5).

A request is validated into a :class:`ChargeRequest`; its fingerprint decides whether a
repeat of an idempotency key is the same request. The sandbox picks outcomes by payment
method, like a real provider's test tokens, so clients can drive every path:

- ``card_declined``, ``tok_chargeDeclined``, ``insufficient_funds``: declined (402).
- ``pending_then_succeed`` / ``pending_then_fail``: answered 200 ``pending``, settled
  ``succeeded`` / ``failed`` (``card_declined``) later, announced by an event.
- ``refund_fails``: the charge succeeds, every refund of it fails
  (see :mod:`sandbox_provider.refunds`).
- ``refund_pending`` / ``refund_pending_then_fail``: refunds of the charge answer
  ``pending`` and settle ``succeeded`` / ``failed`` later.

Any other method succeeds. Under the ``settle_later_ms`` fault every charge is answered
``pending`` and settles as its method says (a decline settles ``failed``).
``amount_refunded`` counts succeeded and pending refunds: what can no longer be refunded.
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
#: Test payment methods answered ``pending`` and settled later: method -> decline or None.
SETTLE_LATER = {
    "pending_then_succeed": None,
    "pending_then_fail": DECLINES["card_declined"],
}
#: The failure a charge gets when the settle control fails it without naming one.
LATE_FAILURE = ("charge_failed", "The charge failed after it was accepted.")
MAX_TEXT = 500
MAX_DESCRIPTION = 5000


class InvalidRequest(ValueError):
    """The body of a charge or refund request breaks the wire contract."""


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


def json_object(body: bytes) -> dict:
    """The request body as a JSON object, or :class:`InvalidRequest`."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidRequest("body must be a JSON object") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    return data


def is_int(value) -> bool:
    """A JSON whole number (``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_charge_request(body: bytes) -> ChargeRequest:
    """Validate a JSON charge body; raise :class:`InvalidRequest` naming the bad field."""
    data = json_object(body)
    amount = data.get("amount")
    if not is_int(amount) or amount <= 0:
        raise InvalidRequest("amount must be a positive whole number of minor units")
    currency = data.get("currency")
    if not isinstance(currency, str) or currency not in CURRENCY_EXPONENTS:
        raise InvalidRequest(f"currency must be a supported ISO 4217 code, got {currency!r}")
    for name in ("payment_method", "transaction_id"):
        value = data.get(name)
        if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
            raise InvalidRequest(f"{name} must be a non-empty string")
    description = data.get("description")
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_DESCRIPTION
    ):
        raise InvalidRequest("description must be a string or null")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be an object or null")
    return ChargeRequest(
        amount=amount,
        currency=currency,
        payment_method=data["payment_method"],
        transaction_id=data["transaction_id"],
        description=description,
        metadata=metadata,
    )


def make_charge(request: ChargeRequest, idempotency_key: str, settle_later: bool) -> dict:
    """The charge the sandbox records for ``request``.

    ``pending`` when ``settle_later`` or the payment method says so; otherwise its
    final status at once (see :func:`charge_outcome`).
    """
    charge = {
        "id": f"ch_{secrets.token_hex(12)}",
        "object": "charge",
        "status": "pending",
        "amount": request.amount,
        "amount_refunded": 0,
        "currency": request.currency,
        "idempotency_key": idempotency_key,
        "transaction_id": request.transaction_id,
        "payment_method": request.payment_method,
        "description": request.description,
        "metadata": request.metadata,
        "failure_code": None,
        "failure_message": None,
        "created": int(time.time()),
    }
    if settle_later or request.payment_method in SETTLE_LATER:
        return charge
    return settled(charge, *charge_outcome(charge))


def charge_outcome(charge: dict) -> tuple[str, str | None, str | None]:
    """The final (status, failure code, message) the charge's payment method calls for."""
    method = charge["payment_method"]
    failure = DECLINES.get(method) or SETTLE_LATER.get(method)
    return ("failed", *failure) if failure else ("succeeded", None, None)


def settled(charge: dict, status: str, failure_code=None, failure_message=None) -> dict:
    """A copy of ``charge`` in its final ``status``: recorded objects are never mutated."""
    if status == "succeeded":
        failure_code = failure_message = None
    elif failure_code is None:
        failure_code, failure_message = LATE_FAILURE
    return {
        **charge,
        "status": status,
        "failure_code": failure_code,
        "failure_message": failure_message,
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
    if charge["status"] == "pending":
        return 200, charge
    return 201, charge
