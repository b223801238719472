"""A provider adapter that plays a script, keeping a ledger like a real provider would.

For unit tests of the lifecycles: the real ``PaymentClient`` runs it (breaker, bulkhead,
the money rule), but no request goes anywhere. Charges and refunds are idempotent by
key, as at a real provider: a key that already has a charge (refund) returns it. Like a
real provider it refuses a refund over what is left of the charge.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from errors import (
    PaymentDeclined,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
    RefundDeclined,
    RefundNotAllowed,
)
from providers.base import (
    ChargeLookup,
    ChargeRequest,
    ChargeStatus,
    ProviderCharge,
    ProviderRefund,
    RefundLookup,
    RefundRequest,
    RefundStatus,
    Transport,
)

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
        #: Script steps for ``refund`` (the same words; ``SUCCEED`` when it runs out).
        self.refund_script: deque[str] = deque()
        self.refunds: dict[str, list[ProviderRefund]] = {}
        self.refund_calls: list[RefundRequest] = []
        self.refund_lookups: list[RefundLookup] = []

    def check_charge(self, request: ChargeRequest) -> None:
        """Takes any payment."""

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

    def refund(self, transport: Transport, request: RefundRequest) -> ProviderRefund:
        self.refund_calls.append(request)
        step = self.refund_script.popleft() if self.refund_script else SUCCEED
        known = self.refunds.get(request.idempotency_key)
        if known and step in (SUCCEED, LOST_ANSWER, NO_ANSWER):
            if known[0].status is RefundStatus.FAILED:
                raise RefundDeclined("the refund failed", code="refund_failed")
            return known[0]
        if step in (SUCCEED, PENDING, LOST_ANSWER, DECLINE):
            if request.amount_minor > self.refundable(request.provider_charge_id):
                raise RefundNotAllowed("amount too large", code="amount_exceeds_refundable")
            status = {PENDING: RefundStatus.PENDING, DECLINE: RefundStatus.FAILED}.get(
                step, RefundStatus.SUCCEEDED
            )
            number = sum(len(v) for v in self.refunds.values()) + 1
            refund = ProviderRefund(
                f"re_{number:06d}",
                status,
                request.amount_minor,
                request.currency,
                charge_id=request.provider_charge_id,
            )
            self.refunds.setdefault(request.idempotency_key, []).append(refund)
            if step == LOST_ANSWER:
                raise PaymentOutcomeUnknown("read timeout after sending the refund")
            if step == DECLINE:
                raise RefundDeclined("the refund failed", code="refund_failed")
            return refund
        if step == UNAVAILABLE:
            raise PaymentServiceUnavailable("payment provider unreachable: connection refused")
        if step == REJECT:
            raise PaymentProviderError("provider rejected the request with HTTP 400")
        if step == NO_ANSWER:
            raise PaymentOutcomeUnknown("read timeout after sending the refund")
        raise AssertionError(f"unknown script step {step!r}")

    def find_refunds(self, transport: Transport, lookup: RefundLookup) -> list[ProviderRefund]:
        self.refund_lookups.append(lookup)
        return list(self.refunds.get(lookup.idempotency_key, []))

    def refundable(self, charge_id: str) -> int:
        """What is left to refund of a charge: its amount less its live refunds."""
        charge = next(c for charges in self.ledger.values() for c in charges if c.id == charge_id)
        return (charge.amount_minor or 0) - self.refunded(charge_id)

    def refunded(self, charge_id: str, *, confirmed_only: bool = False) -> int:
        live = (
            {RefundStatus.SUCCEEDED}
            if confirmed_only
            else {RefundStatus.SUCCEEDED, RefundStatus.PENDING}
        )
        return sum(
            r.amount_minor or 0
            for refunds in self.refunds.values()
            for r in refunds
            if r.charge_id == charge_id and r.status in live
        )

    def settle_refund(self, idempotency_key: str, status: RefundStatus) -> None:
        """The provider finishes (or reverses) a refund."""
        (refund,) = self.refunds[idempotency_key]
        self.refunds[idempotency_key] = [
            ProviderRefund(
                refund.id, status, refund.amount_minor, refund.currency, refund.charge_id
            )
        ]

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
