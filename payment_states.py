"""The vocabulary of a payment's and a refund's life: states, failure codes, allowed moves.

Defined once here; the stores, the lifecycles, the HTTP API and the schema's CHECK
constraints all use these names (DESIGN.md section 4).
"""

from __future__ import annotations

from enum import StrEnum


class PaymentStatus(StrEnum):
    """Where a payment stands. ``unknown``: the provider may have charged it; ask it."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"


class FailureCode(StrEnum):
    """``failure_code`` values we set ourselves (a decline stores the provider's own code)."""

    # The provider certainly never charged: the payment may be re-submitted under its key.
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    BREAKER_OPEN = "breaker_open"
    OUTBOUND_POOL_BUSY = "outbound_pool_busy"
    PROVIDER_TLS_ERROR = "provider_tls_error"
    PROVIDER_REJECTED_REQUEST = "provider_rejected_request"
    NOT_RECEIVED = "not_received"  # reconciliation: the provider has no charge for the key
    # The provider refused or failed the charge without a code of its own.
    CARD_DECLINED = "card_declined"
    CHARGE_FAILED = "charge_failed"


#: ``failed`` payments that the provider certainly never charged: safe to re-submit.
RESUBMITTABLE = frozenset(
    {
        FailureCode.PROVIDER_UNAVAILABLE,
        FailureCode.BREAKER_OPEN,
        FailureCode.OUTBOUND_POOL_BUSY,
        FailureCode.PROVIDER_TLS_ERROR,
        FailureCode.PROVIDER_REJECTED_REQUEST,
        FailureCode.NOT_RECEIVED,
    }
)

_P, _S, _F, _U = (
    PaymentStatus.PENDING,
    PaymentStatus.SUCCEEDED,
    PaymentStatus.FAILED,
    PaymentStatus.UNKNOWN,
)

#: Every status change a payment can make, and why it happens.
TRANSITIONS: dict[PaymentStatus, frozenset[PaymentStatus]] = {
    # Step 3 stores the provider's answer: charged, declined or certainly not charged,
    # or no definitive answer (unknown). Reconciliation settles a pending payment too.
    _P: frozenset({_S, _F, _U}),
    # Reconciliation settles it with the provider's answer; a retry under the same key
    # re-submits it (pending): the provider deduplicates on the key.
    _U: frozenset({_S, _F, _P}),
    # Only two ways out of failed, each guarded by the failure code (see check_transition):
    # re-submitting a failure the provider certainly never saw (RESUBMITTABLE), and a
    # charge that landed after reconciliation had found none (not_received).
    _F: frozenset({_P, _S}),
    # Final.
    _S: frozenset(),
}


class RefundState(StrEnum):
    """Where a refund stands; the same words as a payment's (``unknown``: ask the provider)."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"


_RP, _RS, _RF, _RU = (
    RefundState.PENDING,
    RefundState.SUCCEEDED,
    RefundState.FAILED,
    RefundState.UNKNOWN,
)

#: Every status change a refund can make: a payment's, plus a reversal (the provider
#: fails a refund after it succeeded, and the money is the customer's again).
REFUND_TRANSITIONS: dict[RefundState, frozenset[RefundState]] = {
    _RP: frozenset({_RS, _RF, _RU}),
    _RU: frozenset({_RS, _RF, _RP}),
    _RF: frozenset({_RP, _RS}),
    _RS: frozenset({_RF}),
}


class TransitionRefused(RuntimeError):
    """A status change the lifecycle does not allow: a bug if it is ever raised."""


def check_transition(
    from_status: PaymentStatus | str, to_status: PaymentStatus | str, failure_code: str | None
) -> None:
    """Refuse a status change :data:`TRANSITIONS` (and its failure-code guards) forbid."""
    _check(TRANSITIONS, "payment", PaymentStatus(from_status), to_status, failure_code)


def check_refund_transition(
    from_status: RefundState | str, to_status: RefundState | str, failure_code: str | None
) -> None:
    """Refuse a refund status change :data:`REFUND_TRANSITIONS` (and its guards) forbid."""
    _check(REFUND_TRANSITIONS, "refund", RefundState(from_status), to_status, failure_code)


def may_transition(
    from_status: PaymentStatus | str, to_status: PaymentStatus | str, failure_code: str | None
) -> bool:
    """Whether :func:`check_transition` allows this change."""
    return _allowed(TRANSITIONS, PaymentStatus(from_status), to_status, failure_code)


def may_refund_transition(
    from_status: RefundState | str, to_status: RefundState | str, failure_code: str | None
) -> bool:
    """Whether :func:`check_refund_transition` allows this change."""
    return _allowed(REFUND_TRANSITIONS, RefundState(from_status), to_status, failure_code)


def _allowed(table, source, to_status, failure_code: str | None) -> bool:
    target = type(source)(to_status)
    if target not in table[source]:
        return False
    if source == _F:
        if target == _P:
            return failure_code in RESUBMITTABLE
        return failure_code == FailureCode.NOT_RECEIVED
    return True


def _check(table, what: str, source, to_status, failure_code: str | None) -> None:
    if not _allowed(table, source, to_status, failure_code):
        raise TransitionRefused(
            f"a {source} {what} (failure code {failure_code!r}) cannot become "
            f"{type(source)(to_status)}"
        )


def is_resubmittable(status: PaymentStatus | str, failure_code: str | None) -> bool:
    """Whether a retry under the same key may send this payment to the provider again."""
    return status == _U or (status == _F and failure_code in RESUBMITTABLE)
