"""In-memory ``PaymentStore`` and ``RefundStore`` for unit tests of the lifecycles.

They keep the SQL stores' contract (``tests/integration/test_payment_store_contract.py``
runs the same checks against both): unique keys, version-conditional changes, one event
per change, attempts recorded whether or not the change applies, leases, and the refund
ceiling on the payment. They can also be told to fail like a database that is down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from connection_pool import Attempt
from errors import DatabaseUnavailable
from payment_states import PaymentStatus, RefundState
from payment_store import (
    CHARGE,
    Change,
    NewPayment,
    ReconcileClaim,
    StoredPayment,
    attempt_row,
    event_row,
)
from refund_store import (
    REFUND,
    NewRefund,
    RefundChange,
    StoredRefund,
    ceiling_moves,
    exceeds_refundable,
    not_refundable,
)


@dataclass
class MemoryPaymentStore:
    """:class:`payment_store.PaymentStore` in a dict; ``clock`` gives aware datetimes."""

    clock: Callable[[], datetime]
    payments: dict[str, StoredPayment] = field(default_factory=dict)
    leases: dict[str, datetime] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)
    #: Method name -> how many of its next calls raise ``DatabaseUnavailable``.
    failures: dict[str, int] = field(default_factory=dict)
    #: Method name -> a callable run before the method (to interleave another writer).
    before: dict[str, Callable[[], None]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def fail_next(self, method: str, times: int = 1) -> None:
        self.failures[method] = times

    def _enter(self, method: str) -> None:
        hook = self.before.pop(method, None)
        if hook is not None:
            hook()
        if self.failures.get(method, 0) > 0:
            self.failures[method] -= 1
            raise DatabaseUnavailable(f"database unreachable (injected into {method})")

    def insert_pending(self, new: NewPayment) -> tuple[StoredPayment, bool]:
        self._enter("insert_pending")
        with self._lock:
            existing = self._by_key(new.idempotency_key)
            if existing is not None:
                return existing, False
            now = self.clock()
            payment = StoredPayment.pending(new, now)
            self.payments[payment.id] = payment
            self._event(payment.id, None, PaymentStatus.PENDING, "created", now)
            return payment, True

    def find_by_key(self, idempotency_key: str) -> StoredPayment | None:
        self._enter("find_by_key")
        with self._lock:
            return self._by_key(idempotency_key)

    def find_by_id(self, payment_id: str) -> StoredPayment | None:
        self._enter("find_by_id")
        with self._lock:
            return self.payments.get(payment_id)

    def transition(self, payment: StoredPayment, change: Change) -> StoredPayment | None:
        self._enter("transition")
        with self._lock:
            self._record(payment.id, change.attempts, change.attempt_kind)
            charge_attempts = len(change.attempts) if change.attempt_kind == CHARGE else 0
            current = self.payments[payment.id]
            if (current.version, current.status) != (payment.version, payment.status):
                self.payments[payment.id] = replace(
                    current, attempts=current.attempts + charge_attempts
                )
                return None
            now = self.clock()
            updated = replace(
                current,
                status=change.to_status,
                version=current.version + 1,
                updated_at=now,
                failure_code=change.failure_code,
                failure_message=change.failure_message,
                provider_charge_id=change.provider_charge_id or current.provider_charge_id,
                attempts=current.attempts + charge_attempts,
            )
            self.payments[payment.id] = updated
            self.leases.pop(payment.id, None)
            self._event(payment.id, current.status, change.to_status, change.reason[:255], now)
            return updated

    def record_attempts(
        self,
        payment_id: str,
        attempts: Sequence[Attempt],
        kind: str,
        provider_charge_id: str | None = None,
    ) -> StoredPayment | None:
        self._enter("record_attempts")
        with self._lock:
            self._record(payment_id, attempts, kind)
            if kind != CHARGE:
                return None
            current = self.payments[payment_id]
            updated = replace(
                current,
                attempts=current.attempts + len(attempts),
                provider_charge_id=provider_charge_id or current.provider_charge_id,
            )
            self.payments[payment_id] = updated
            return updated

    def claim_for_reconciliation(self, claim: ReconcileClaim) -> list[StoredPayment]:
        self._enter("claim_for_reconciliation")
        with self._lock:
            return _claim(self.payments.values(), self.leases, claim, self.clock())

    def release(self, payment_ids: Iterable[str]) -> None:
        self._enter("release")
        with self._lock:
            for payment_id in payment_ids:
                self.leases.pop(payment_id, None)

    # -- what tests read -------------------------------------------------------------

    def events_of(self, payment_id: str) -> list[tuple[str | None, str, str]]:
        return [
            (e["from_status"], e["to_status"], e["reason"])
            for e in self.events
            if e["payment_id"] == payment_id
        ]

    def attempts_of(self, payment_id: str, kind: str | None = None) -> list[dict]:
        return [
            a
            for a in self.attempts
            if a["payment_id"] == payment_id and (kind is None or a["kind"] == kind)
        ]

    def _by_key(self, key: str) -> StoredPayment | None:
        return next((p for p in self.payments.values() if p.idempotency_key == key), None)

    def _record(self, payment_id: str, attempts: Sequence[Attempt], kind: str) -> None:
        self.attempts.extend(attempt_row(payment_id, kind, a) for a in attempts)

    def _event(self, payment_id, from_status, to_status, reason, at) -> None:
        self.events.append(event_row(payment_id, from_status, to_status, reason, at))


def _claim(rows, leases: dict[str, datetime], claim: ReconcileClaim, now: datetime) -> list:
    def due(row) -> bool:
        lease = leases.get(row.id)
        if lease is not None and lease >= now:
            return False
        if claim.after is not None and (row.updated_at, row.id) <= claim.after:
            return False
        if row.status == PaymentStatus.UNKNOWN:
            return row.updated_at < claim.unknown_before
        return row.status == PaymentStatus.PENDING and row.updated_at < claim.pending_before

    batch = sorted((r for r in rows if due(r)), key=lambda r: (r.updated_at, r.id))[: claim.limit]
    for row in batch:
        leases[row.id] = claim.lease_until
    return batch


@dataclass
class MemoryRefundStore:
    """:class:`refund_store.RefundStore` in a dict, reserving on ``payments``' rows."""

    payments: MemoryPaymentStore
    refunds: dict[str, StoredRefund] = field(default_factory=dict)
    leases: dict[str, datetime] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    attempts: list[dict] = field(default_factory=list)

    def reserve(self, new: NewRefund) -> tuple[StoredRefund, bool]:
        self.payments._enter("reserve")
        with self.payments._lock:
            payment = self.payments.payments[new.payment_id]
            left = payment.amount_minor - payment.refund_reserved_minor
            if payment.status != PaymentStatus.SUCCEEDED or not 0 < new.amount_minor <= left:
                existing = self.find_refund_by_key(new.idempotency_key)
                if existing is not None:
                    return existing, False
                if payment.status != PaymentStatus.SUCCEEDED:
                    raise not_refundable(payment.id, payment.status)
                raise exceeds_refundable(new.amount_minor, left, payment.currency)
            existing = self.find_refund_by_key(new.idempotency_key)
            if existing is not None:  # the unique key, as in the database
                return existing, False
            self._move_ceiling(payment.id, new.amount_minor, 0)
            now = self.payments.clock()
            refund = StoredRefund(
                id=new.id, payment_id=payment.id, idempotency_key=new.idempotency_key,
                request_fingerprint=new.fingerprint, amount_minor=new.amount_minor,
                currency=new.currency, reason=new.reason, metadata=new.metadata,
                status=RefundState.PENDING, provider_refund_id=None, failure_code=None,
                failure_message=None, attempts=0, created_at=now, updated_at=now, version=0,
            )  # fmt: skip
            self.refunds[refund.id] = refund
            self._event(refund.id, None, RefundState.PENDING, "created", now)
            return refund, True

    def find_refund_by_key(self, idempotency_key: str) -> StoredRefund | None:
        return next(
            (r for r in self.refunds.values() if r.idempotency_key == idempotency_key), None
        )

    def find_refund(self, refund_id: str) -> StoredRefund | None:
        return self.refunds.get(refund_id)

    def transition_refund(self, refund: StoredRefund, change: RefundChange) -> StoredRefund | None:
        self.payments._enter("transition_refund")
        with self.payments._lock:
            self._record(refund.id, change.attempts, change.attempt_kind)
            counted = len(change.attempts) if change.attempt_kind == REFUND else 0
            current = self.refunds[refund.id]
            if (current.version, current.status) != (refund.version, refund.status):
                self.refunds[refund.id] = replace(current, attempts=current.attempts + counted)
                return None
            reserve, refunded = ceiling_moves(current.status, change.to_status)
            payment = self.payments.payments[refund.payment_id]
            if payment.refund_reserved_minor + reserve * refund.amount_minor > payment.amount_minor:
                left = payment.amount_minor - payment.refund_reserved_minor
                raise exceeds_refundable(refund.amount_minor, left, refund.currency)
            self._move_ceiling(
                payment.id, reserve * refund.amount_minor, refunded * refund.amount_minor
            )
            now = self.payments.clock()
            updated = replace(
                current,
                status=change.to_status,
                version=current.version + 1,
                updated_at=now,
                failure_code=change.failure_code,
                failure_message=change.failure_message,
                provider_refund_id=change.provider_refund_id or current.provider_refund_id,
                attempts=current.attempts + counted,
            )
            self.refunds[refund.id] = updated
            self.leases.pop(refund.id, None)
            self._event(refund.id, current.status, change.to_status, change.reason[:255], now)
            return updated

    def record_refund_attempts(
        self,
        refund_id: str,
        attempts: Sequence[Attempt],
        kind: str,
        provider_refund_id: str | None = None,
    ) -> StoredRefund | None:
        with self.payments._lock:
            self._record(refund_id, attempts, kind)
            if kind != REFUND:
                return None
            current = self.refunds[refund_id]
            updated = replace(
                current,
                attempts=current.attempts + len(attempts),
                provider_refund_id=provider_refund_id or current.provider_refund_id,
            )
            self.refunds[refund_id] = updated
            return updated

    def claim_refunds_for_reconciliation(self, claim: ReconcileClaim) -> list[StoredRefund]:
        with self.payments._lock:
            return _claim(self.refunds.values(), self.leases, claim, self.payments.clock())

    def release_refunds(self, refund_ids: Iterable[str]) -> None:
        with self.payments._lock:
            for refund_id in refund_ids:
                self.leases.pop(refund_id, None)

    def events_of(self, refund_id: str) -> list[tuple[str | None, str, str]]:
        return [
            (e["from_status"], e["to_status"], e["reason"])
            for e in self.events
            if e["refund_id"] == refund_id
        ]

    def _move_ceiling(self, payment_id: str, reserve: int, refunded: int) -> None:
        payment = self.payments.payments[payment_id]
        moved = replace(
            payment,
            refund_reserved_minor=payment.refund_reserved_minor + reserve,
            amount_refunded_minor=payment.amount_refunded_minor + refunded,
        )
        assert 0 <= moved.amount_refunded_minor <= moved.refund_reserved_minor <= moved.amount_minor
        self.payments.payments[payment_id] = moved

    def _record(self, refund_id: str, attempts: Sequence[Attempt], kind: str) -> None:
        self.attempts.extend(attempt_row(refund_id, kind, a, owner="refund_id") for a in attempts)

    def _event(self, refund_id, from_status, to_status, reason, at) -> None:
        self.events.append(
            event_row(refund_id, from_status, to_status, reason, at, owner="refund_id")
        )
