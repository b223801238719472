"""An in-memory ``PaymentStore`` for unit tests of the lifecycle.

It keeps the SQL store's contract (``tests/integration/test_payment_store_contract.py``
runs the same checks against both): unique keys, version-conditional changes, one event
per change, attempts recorded whether or not the change applies, leases. It can also be
told to fail like a database that is down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from connection_pool import Attempt
from errors import DatabaseUnavailable
from payment_states import PaymentStatus
from payment_store import (
    CHARGE,
    Change,
    NewPayment,
    ReconcileClaim,
    StoredPayment,
    attempt_row,
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
        self, payment_id: str, attempts: Sequence[Attempt], kind: str
    ) -> StoredPayment | None:
        self._enter("record_attempts")
        with self._lock:
            self._record(payment_id, attempts, kind)
            if kind != CHARGE:
                return None
            current = self.payments[payment_id]
            updated = replace(current, attempts=current.attempts + len(attempts))
            self.payments[payment_id] = updated
            return updated

    def claim_for_reconciliation(self, claim: ReconcileClaim) -> list[StoredPayment]:
        self._enter("claim_for_reconciliation")
        with self._lock:
            now = self.clock()

            def due(p: StoredPayment) -> bool:
                lease = self.leases.get(p.id)
                if lease is not None and lease >= now:
                    return False
                if claim.after is not None and (p.updated_at, p.id) <= claim.after:
                    return False
                if p.status == PaymentStatus.UNKNOWN:
                    return p.updated_at < claim.unknown_before
                return p.status == PaymentStatus.PENDING and p.updated_at < claim.pending_before

            batch = sorted(
                (p for p in self.payments.values() if due(p)), key=lambda p: (p.updated_at, p.id)
            )[: claim.limit]
            for p in batch:
                self.leases[p.id] = claim.lease_until
            return batch

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
        self.events.append(
            dict(
                payment_id=payment_id,
                at=at,
                from_status=from_status.value if from_status is not None else None,
                to_status=to_status.value,
                reason=reason,
            )
        )
