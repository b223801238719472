"""A provider adapter that plays a script, keeping a ledger like a real provider would.

For unit tests of the lifecycle: the real ``PaymentClient`` runs it (breaker, bulkhead,
the money rule), but no request goes anywhere. Charges are idempotent by key, as at a
real provider: charging a key that already has a charge returns that charge.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from errors import (
    PaymentDeclined,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
)
from providers.base import ChargeLookup, ChargeRequest, ChargeStatus, ProviderCharge, Transport

#: Script steps for ``charge``.
SUCCEED = "succeed"  # charge and answer
PENDING = "pending"  # accept; settle later
DECLINE = "decline"  # refuse the card (402)
UNAVAILABLE = "unavailable"  # unreachable: certainly not charged
REJECT = "reject"  # refuse our request (4xx): certainly not charged
LOST_ANSWER = "lost_answer"  # charge, then the answer is lost (read timeout)
NO_ANSWER = "no_answer"  # the request may have arrived; nothing was charged


class ScriptedProvider:
    """Answers ``charge`` calls with the next script step (``SUCCEED`` when it runs out)."""

    name = "scripted"

    def __init__(self, *steps: str):
        self.script: deque[str] = deque(steps)
        self.ledger: dict[str, list[ProviderCharge]] = {}
        self.charge_calls: list[ChargeRequest] = []
        self.lookups: list[ChargeLookup] = []
        #: Replaces ``find_charges`` when set (a slow, failing or interleaved lookup).
        self.on_lookup: Callable[[ChargeLookup], list[ProviderCharge]] | None = None

    def charge(self, transport: Transport, request: ChargeRequest) -> ProviderCharge:
        self.charge_calls.append(request)
        step = self.script.popleft() if self.script else SUCCEED
        known = self.ledger.get(request.idempotency_key)
        if known and step in (SUCCEED, LOST_ANSWER, NO_ANSWER):  # the provider replays our key
            if known[0].status is ChargeStatus.FAILED:
                raise PaymentDeclined("Your card was declined.", code="card_declined")
            return known[0]
        if step in (SUCCEED, PENDING, LOST_ANSWER):
            status = ChargeStatus.PENDING if step == PENDING else ChargeStatus.SUCCEEDED
            charge = self._record(request, status)
            if step == LOST_ANSWER:
                raise PaymentOutcomeUnknown("read timeout after sending the charge")
            return charge
        if step == DECLINE:
            self._record(request, ChargeStatus.FAILED)
            raise PaymentDeclined("Your card was declined.", code="card_declined")
        if step == UNAVAILABLE:
            raise PaymentServiceUnavailable("payment provider unreachable: connection refused")
        if step == REJECT:
            raise PaymentProviderError("provider rejected the request with HTTP 400")
        if step == NO_ANSWER:
            raise PaymentOutcomeUnknown("read timeout after sending the charge")
        raise AssertionError(f"unknown script step {step!r}")

    def find_charges(self, transport: Transport, lookup: ChargeLookup) -> list[ProviderCharge]:
        self.lookups.append(lookup)
        if self.on_lookup is not None:
            return self.on_lookup(lookup)
        return list(self.ledger.get(lookup.idempotency_key, []))

    def settle(self, idempotency_key: str, status: ChargeStatus) -> None:
        """The provider finishes a pending charge."""
        (charge,) = self.ledger[idempotency_key]
        self.ledger[idempotency_key] = [
            ProviderCharge(charge.id, status, charge.amount_minor, charge.currency)
        ]

    def charged(self, idempotency_key: str) -> int:
        """How many succeeded charges the provider holds for the key."""
        charges = self.ledger.get(idempotency_key, [])
        return sum(c.status is ChargeStatus.SUCCEEDED for c in charges)

    def _record(self, request: ChargeRequest, status: ChargeStatus) -> ProviderCharge:
        number = sum(len(v) for v in self.ledger.values()) + 1
        charge = ProviderCharge(
            id=f"ch_{number:06d}",
            status=status,
            amount_minor=request.amount_minor,
            currency=request.currency,
            failure_code="card_declined" if status is ChargeStatus.FAILED else None,
        )
        self.ledger.setdefault(request.idempotency_key, []).append(charge)
        return charge
