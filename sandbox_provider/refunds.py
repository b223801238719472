"""Refund requests and refund objects of the provider wire contract (DESIGN.md section 5a).

A refund names a succeeded charge and an amount (absent: all that is left). Its outcome
follows the payment method of the charge, so clients can drive every path:

- ``refund_fails``: every refund of the charge answers ``failed``
  (``failure_reason`` ``"declined"``).
- ``refund_pending``: refunds answer ``pending`` and settle ``succeeded`` later.
- ``refund_pending_then_fail``: refunds answer ``pending`` and settle ``failed`` later.

Any other charge's refunds succeed. Under the ``settle_later_ms`` fault every refund is
answered ``pending`` and settles as the charge's method says. Every refund, whatever its
status, is answered 200: a failed refund is a fact about the refund, not a refused request.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

from sandbox_provider.charges import MAX_TEXT, InvalidRequest, is_int, json_object

#: Payment methods whose charges' refunds fail: method -> failure reason.
REFUND_FAILURES = {
    "refund_fails": "declined",
    "refund_pending_then_fail": "declined",
}
#: Payment methods whose charges' refunds are answered ``pending`` and settled later.
REFUNDS_SETTLE_LATER = frozenset({"refund_pending", "refund_pending_then_fail"})
#: Refund statuses that take money back from the charge (or will).
COUNTED = frozenset({"succeeded", "pending"})


class RefundRefused(Exception):
    """The ledger will not refund: ``status`` and ``code`` are the answer's."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class RefundRequest:
    charge: str
    amount: int | None
    reason: str | None
    metadata: dict | None

    @property
    def fingerprint(self) -> str:
        """Canonical form; marked as a refund, so a charge's key reused here is a reuse."""
        return "refund:" + json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))


def parse_refund_request(body: bytes) -> RefundRequest:
    """Validate a JSON refund body; raise :class:`InvalidRequest` naming the bad field."""
    data = json_object(body)
    charge = data.get("charge")
    if not isinstance(charge, str) or not charge or len(charge) > MAX_TEXT:
        raise InvalidRequest("charge must be a charge id")
    amount = data.get("amount")
    if amount is not None and (not is_int(amount) or amount <= 0):
        raise InvalidRequest("amount must be a positive whole number of minor units or absent")
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_TEXT):
        raise InvalidRequest("reason must be a string or null")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be an object or null")
    return RefundRequest(charge=charge, amount=amount, reason=reason, metadata=metadata)


def make_refund(
    request: RefundRequest, charge: dict, amount: int, idempotency_key: str, settle_later: bool
) -> dict:
    """The refund the sandbox records: ``pending``, or at once what ``charge`` calls for."""
    refund = {
        "id": f"re_{secrets.token_hex(12)}",
        "object": "refund",
        "status": "pending",
        "charge": charge["id"],
        "amount": amount,
        "currency": charge["currency"],
        "idempotency_key": idempotency_key,
        "reason": request.reason,
        "metadata": request.metadata,
        "failure_reason": None,
        "created": int(time.time()),
    }
    if settle_later or charge["payment_method"] in REFUNDS_SETTLE_LATER:
        return refund
    return settled_refund(refund, *refund_outcome(charge))


def refund_outcome(charge: dict) -> tuple[str, str | None]:
    """The final (status, failure reason) of refunds of ``charge``."""
    reason = REFUND_FAILURES.get(charge["payment_method"])
    return ("failed", reason) if reason else ("succeeded", None)


def settled_refund(refund: dict, status: str, failure_reason: str | None = None) -> dict:
    """A copy of ``refund`` in its final ``status``."""
    reason = (failure_reason or "declined") if status == "failed" else None
    return {**refund, "status": status, "failure_reason": reason}
