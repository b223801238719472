"""One reconciliation pass, shared by payments and refunds, and what a lookup settles.

Rows (payments or refunds) waiting for the provider's verdict are leased in batches,
oldest first, and each is looked up at most once per pass, even when a lease expires
during the run (keyset on ``(updated_at, id)`` after the previous batch). A lease covers
every lookup of its batch up to its deadline. The pass stops, and frees what it has not
looked up, as soon as the provider is unavailable: asking it then would only fail.

A final answer from the provider settles a row at once, whatever its age; only "never
saw it" about a ``pending`` row must wait until its request cannot be in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from errors import DatabaseUnavailable, PaymentServiceUnavailable
from payment_results import ReconcileReport
from payment_states import FailureCode, PaymentStatus, RefundState
from payment_store import Change, ReconcileClaim
from providers.base import ChargeStatus, ProviderCharge, ProviderRefund, RefundStatus
from refund_store import RefundChange
from settings import Settings

log = logging.getLogger(__name__)

#: Rows one reconciliation batch leases and looks up.
RECONCILE_BATCH = 20


class Reconcilable(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def status(self) -> str: ...

    @property
    def updated_at(self) -> datetime: ...


Row = TypeVar("Row", bound=Reconcilable)


def in_flight_seconds(settings: Settings) -> float:
    """How long a ``pending`` row's request may still be in flight: a provider cannot
    list an unfinished charge or refund, so before that "never saw it" proves nothing."""
    return settings.payment_deadline + settings.db_pool_timeout + 1


def in_flight_left(row: Reconcilable, settings: Settings, now: datetime) -> float:
    """Seconds until a ``pending`` row's request cannot be in flight any more (0: past)."""
    if row.status != PaymentStatus.PENDING:
        return 0.0
    return max(0.0, in_flight_seconds(settings) - (now - row.updated_at).total_seconds())


def reconcile_pass(
    *,
    settings: Settings,
    older_than_seconds: float,
    now: Callable[[], datetime],
    refusal: Callable[[], PaymentServiceUnavailable | None],
    claim: Callable[[ReconcileClaim], Sequence[Row]],
    release: Callable[[Iterable[str]], None],
    settle: Callable[[Row, ReconcileReport], None],
    batch_size: int = RECONCILE_BATCH,
) -> ReconcileReport:
    """Lease and ``settle`` every due row once; the counts of what happened."""
    report = ReconcileReport()
    started = now()
    lease = max(60.0, batch_size * (settings.payment_deadline + 1))
    after: tuple[datetime, str] | None = None
    while True:
        refused = refusal()
        if refused is not None:
            log.warning("reconciliation stopped: %s", refused.message)
            return report
        batch = claim(
            ReconcileClaim(
                unknown_before=started - timedelta(seconds=older_than_seconds),
                pending_before=started - timedelta(seconds=older_than_seconds),
                lease_until=now() + timedelta(seconds=lease),
                limit=batch_size,
                after=after,
            )
        )
        if not batch:
            return report
        after = (batch[-1].updated_at, batch[-1].id)
        for index, row in enumerate(batch):
            refused = refusal()
            if refused is not None:
                rest = batch[index:]
                release(r.id for r in rest)
                report.deferred += len(rest)
                log.warning(
                    "reconciliation stopped with %d not looked up: %s", len(rest), refused.message
                )
                return report
            report.examined += 1
            try:
                settle(row, report)
            except DatabaseUnavailable:
                raise  # every other row would fail the same way
            except Exception:  # one bad row must not stop the others
                report.errors += 1
                log.exception("could not reconcile %s; the next run retries it", row.id)


def charge_verdict(charges: Sequence[ProviderCharge]) -> Change | None:
    """What the provider's charges for one key settle a payment to; ``None``: not yet."""
    succeeded = [c for c in charges if c.status is ChargeStatus.SUCCEEDED]
    if len(succeeded) > 1:
        log.error(
            "the provider holds %d succeeded charges under one idempotency key: %s",
            len(succeeded),
            ", ".join(c.id for c in succeeded),
        )
    if succeeded:
        return Change(PaymentStatus.SUCCEEDED, "reconciled", provider_charge_id=succeeded[0].id)
    if not charges:
        return Change(
            PaymentStatus.FAILED,
            "reconciled",
            failure_code=FailureCode.NOT_RECEIVED,
            failure_message="the provider has no charge for this idempotency key",
        )
    if all(c.status is ChargeStatus.FAILED for c in charges):
        last = charges[-1]
        return Change(
            PaymentStatus.FAILED,
            "reconciled",
            provider_charge_id=last.id,
            failure_code=last.failure_code or FailureCode.CHARGE_FAILED,
            failure_message=last.failure_message,
        )
    return None


def refund_verdict(refunds: Sequence[ProviderRefund]) -> RefundChange | None:
    """What the provider's refunds under one key settle a refund to; ``None``: not yet."""
    succeeded = [r for r in refunds if r.status is RefundStatus.SUCCEEDED]
    if succeeded:
        if len(succeeded) > 1:
            log.error(
                "the provider holds %d succeeded refunds under one idempotency key: %s",
                len(succeeded),
                ", ".join(r.id for r in succeeded),
            )
        return RefundChange(RefundState.SUCCEEDED, "reconciled", provider_refund_id=succeeded[0].id)
    if not refunds:
        return RefundChange(
            RefundState.FAILED,
            "reconciled",
            failure_code=FailureCode.NOT_RECEIVED,
            failure_message="the provider has no refund for this idempotency key",
        )
    if all(r.status is RefundStatus.FAILED for r in refunds):
        last = refunds[-1]
        return RefundChange(
            RefundState.FAILED,
            "reconciled",
            provider_refund_id=last.id,
            failure_code=last.failure_code or "refund_failed",
            failure_message=last.failure_message,
        )
    return None
