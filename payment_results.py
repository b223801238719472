"""What the library hands back to callers (re-exported by ``payment_handler``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal

from money import to_major_units
from payment_states import PaymentStatus, RefundState
from payment_store import StoredPayment
from refund_store import StoredRefund


@dataclass(frozen=True)
class PaymentResult:
    """A stored payment as callers see it.

    Money is kept as it moves along the payment, in integer minor units; ``amount`` is
    the same value in major units (``Decimal('25.99')``), for display and for callers.
    ``replayed`` is true when this call found the payment already settled under its key.
    """

    id: str
    status: PaymentStatus
    amount_minor: int
    currency: str
    transaction_id: str
    idempotency_key: str
    provider_charge_id: str | None
    attempts: int
    payment_method: str
    description: str | None = None
    metadata: dict | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    replayed: bool = False
    amount_refunded_minor: int = 0

    @property
    def amount(self) -> Decimal:
        return to_major_units(self.amount_minor, self.currency)

    @property
    def amount_refunded(self) -> Decimal:
        """What the provider confirmed refunded (refunds still in flight are not in it)."""
        return to_major_units(self.amount_refunded_minor, self.currency)

    @classmethod
    def from_stored(cls, payment: StoredPayment, *, replayed: bool = False) -> PaymentResult:
        return cls(
            id=payment.id,
            status=payment.status,
            amount_minor=payment.amount_minor,
            currency=payment.currency,
            transaction_id=payment.transaction_id,
            idempotency_key=payment.idempotency_key,
            provider_charge_id=payment.provider_charge_id,
            attempts=payment.attempts,
            payment_method=payment.payment_method,
            description=payment.description,
            metadata=payment.metadata,
            failure_code=payment.failure_code,
            failure_message=payment.failure_message,
            created_at=payment.created_at,
            updated_at=payment.updated_at,
            replayed=replayed,
            amount_refunded_minor=payment.amount_refunded_minor,
        )


@dataclass(frozen=True)
class RefundResult:
    """A stored refund as callers see it (``amount`` in major units, like a payment's)."""

    id: str
    payment_id: str
    status: RefundState
    amount_minor: int
    currency: str
    idempotency_key: str
    provider_refund_id: str | None
    reason: str | None
    attempts: int
    metadata: dict | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    replayed: bool = False

    @property
    def amount(self) -> Decimal:
        return to_major_units(self.amount_minor, self.currency)

    @classmethod
    def from_stored(cls, refund: StoredRefund, *, replayed: bool = False) -> RefundResult:
        return cls(
            id=refund.id,
            payment_id=refund.payment_id,
            status=refund.status,
            amount_minor=refund.amount_minor,
            currency=refund.currency,
            idempotency_key=refund.idempotency_key,
            provider_refund_id=refund.provider_refund_id,
            reason=refund.reason,
            attempts=refund.attempts,
            metadata=refund.metadata,
            failure_code=refund.failure_code,
            failure_message=refund.failure_message,
            created_at=refund.created_at,
            updated_at=refund.updated_at,
            replayed=replayed,
        )


@dataclass
class ReconcileReport:
    """What one ``reconcile_payments`` run did with the payments it claimed."""

    examined: int = 0  # looked up at the provider
    succeeded: int = 0
    failed: int = 0
    still_pending: int = 0  # the provider is still processing the charge
    skipped: int = 0  # changed by someone else meanwhile: the verdict was stale
    errors: int = 0  # the lookup failed or its answer was unusable; the next run retries
    deferred: int = 0  # claimed but not looked up: the provider is unavailable
    #: The same counts for refunds, when the run looked at refunds too.
    refunds: ReconcileReport | None = None

    def to_dict(self) -> dict:
        return asdict(self)
