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
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from errors import DatabaseUnavailable, PaymentError, PaymentServiceUnavailable
from payment_results import ReconcileReport
from payment_states import FailureCode, PaymentStatus, RefundState
from payment_store import Change, ReconcileClaim
from providers.base import ProviderCharge, ProviderRefund
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


def settle_from_lookup(
    row: Row,
    report: ReconcileReport,
    *,
    what: str,
    look_up: Callable[[Row], Any],
    verdict_of: Callable[[Sequence], Any],
    record: Callable[[str, Sequence], object],
    release: Callable[[Iterable[str]], None],
    move: Callable[[Row, Any], object],
    settings: Settings,
    now: datetime,
) -> None:
    """Ask the provider about one payment or refund (``what``) and settle it by its answer.

    ``look_up`` returns the provider's reply; ``verdict_of`` what its records settle to;
    ``record`` keeps the lookup's attempts; ``move`` applies a change if the row is still
    as read. A "never saw it" about a row whose request may be in flight settles nothing
    and gives the lease back, so the next run looks again.
    """
    try:
        reply = look_up(row)
    except PaymentError as exc:
        report.errors += 1
        log.warning("%s lookup failed (%s): %s", what, exc.code, exc.message)
        record(row.id, exc.attempts)
        return
    verdict = verdict_of(reply.value)
    if verdict is None or (not reply.value and in_flight_left(row, settings, now)):
        report.still_pending += 1  # pending at the provider, or maybe still in flight
        record(row.id, reply.attempts)
        if verdict is not None:
            release([row.id])
        return
    change = replace(verdict, attempts=reply.attempts, attempt_kind="lookup")
    if move(row, change) is None:
        report.skipped += 1
        log.info("%s changed while it was looked up; its verdict was discarded", what)
        return
    report.succeeded += change.to_status == "succeeded"
    report.failed += change.to_status == "failed"
    log.info("reconciled %s: %s -> %s", what, row.status, change.to_status)


def charge_verdict(charges: Sequence[ProviderCharge]) -> Change | None:
    """What the provider's charges for one key settle a payment to; ``None``: not yet."""
    found = _settled_by(charges, "charge")
    if found is None:
        return None
    status, charge, code = found
    if status == "succeeded":
        return Change(PaymentStatus.SUCCEEDED, "reconciled", provider_charge_id=charge.id)
    return Change(
        PaymentStatus.FAILED,
        "reconciled",
        provider_charge_id=charge.id if charge else None,
        failure_code=code or FailureCode.CHARGE_FAILED,
        failure_message=charge.failure_message if charge else NEVER_SAW % "charge",
    )


def refund_verdict(refunds: Sequence[ProviderRefund]) -> RefundChange | None:
    """What the provider's refunds under one key settle a refund to; ``None``: not yet."""
    found = _settled_by(refunds, "refund")
    if found is None:
        return None
    status, refund, code = found
    if status == "succeeded":
        return RefundChange(RefundState.SUCCEEDED, "reconciled", provider_refund_id=refund.id)
    return RefundChange(
        RefundState.FAILED,
        "reconciled",
        provider_refund_id=refund.id if refund else None,
        failure_code=code or "refund_failed",
        failure_message=refund.failure_message if refund else NEVER_SAW % "refund",
    )


NEVER_SAW = "the provider has no %s for this idempotency key"


def _settled_by(records: Sequence, what: str) -> tuple[str, Any, str | None] | None:
    """``(status, the record it rests on, failure code)`` that a provider's records under
    one key settle to: any succeeded one wins; none at all is ``not_received``; all failed
    is failed (the last one's code); anything else (still pending): ``None``."""
    succeeded = [r for r in records if r.status == "succeeded"]
    if len(succeeded) > 1:
        log.error(
            "the provider holds %d succeeded %ss under one idempotency key: %s",
            len(succeeded),
            what,
            ", ".join(r.id for r in succeeded),
        )
    if succeeded:
        return "succeeded", succeeded[0], None
    if not records:
        return "failed", None, FailureCode.NOT_RECEIVED
    if all(r.status == "failed" for r in records):
        return "failed", records[-1], records[-1].failure_code
    return None
