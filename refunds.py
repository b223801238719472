"""Give money back: the refund lifecycle (DESIGN.md section 4), beside the payment one.

A refund follows the three steps of a payment:

1. a short transaction stores it as ``pending`` under its own idempotency key and
   reserves its amount on the payment row (one conditional UPDATE; the database's CHECK
   is the ceiling), or refuses: the payment is not ``succeeded``, or has less left;
2. the provider is called with no database connection checked out;
3. a short transaction stores the outcome, which moves the payment's reserved and
   refunded amounts with it (``refund_store.ceiling_moves``).

The money rule holds as for charges: once a refund may have reached the provider, only
its definitive answer settles it; anything else is ``unknown``, keeps its reservation,
and is settled by reconciliation or by a retry under the same key.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

import metrics
from database_config import utcnow
from errors import (
    DatabaseUnavailable,
    IdempotencyKeyReused,
    InvalidPaymentRequest,
    PaymentDeclined,
    PaymentError,
    PaymentInProgress,
    PaymentNotFound,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
    RefundDeclined,
    RefundNotAllowed,
)
from log_context import bind_log_context
from payment_client import PaymentClient
from payment_request import PAYMENT_ID, CheckedRefund, build_refund
from payment_results import ReconcileReport, RefundResult
from payment_states import (
    FailureCode,
    RefundState,
    check_refund_transition,
    is_resubmittable,
)
from payment_store import PaymentStore, StoredPayment, write_with_retries
from providers.base import ProviderRefund, RefundLookup, RefundRequest, RefundStatus
from reconciliation import (
    RECONCILE_BATCH,
    in_flight_left,
    reconcile_pass,
    refund_verdict,
    settle_from_lookup,
)
from refund_store import (
    LOOKUP,
    REFUND,
    NewRefund,
    RefundChange,
    RefundStore,
    StoredRefund,
    exceeds_refundable,
)
from settings import Settings

log = logging.getLogger(__name__)

PENDING, SUCCEEDED, FAILED, UNKNOWN = (
    RefundState.PENDING,
    RefundState.SUCCEEDED,
    RefundState.FAILED,
    RefundState.UNKNOWN,
)


def new_refund_id() -> str:
    return f"ref_{uuid.uuid4().hex[:24]}"


class RefundService:
    """The refund lifecycle over a provider client and the stores.

    :param settings: the configuration.
    :param client: the provider client (shared with payments: one breaker, one bulkhead).
    :param payments: where the refunded payments are read.
    :param store: where refunds are kept (the ceiling lives there).
    :param now: wall-clock time (aware UTC) for reconciliation.
    :param sleep: waits between attempts to store an outcome.
    :param store_retries: how often to retry recording an outcome after the provider
        answered, if the database blips.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        client: PaymentClient,
        payments: PaymentStore,
        store: RefundStore,
        now: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] = time.sleep,
        store_retries: int = 3,
    ):
        self.settings, self.client = settings, client
        self.payments, self.store = payments, store
        self._now, self._sleep = now, sleep
        self.store_retries = store_retries

    # -- making a refund -------------------------------------------------------------

    def refund_payment(
        self, payment_id, amount=None, *, idempotency_key=None, reason=None, metadata=None
    ) -> RefundResult:
        """``payment_handler.refund_payment``: validate the call, then :meth:`refund`."""
        payment = (
            self.payments.find_by_id(payment_id)
            if isinstance(payment_id, str) and PAYMENT_ID.fullmatch(payment_id)
            else None
        )
        if payment is None:
            raise PaymentNotFound("there is no payment with this id")
        request = build_refund(
            payment.id,
            payment.currency,
            amount,
            idempotency_key=idempotency_key,
            reason=reason,
            metadata=metadata,
            settings=self.settings,
        )
        return self.refund(request, payment)

    def refund(self, request: CheckedRefund, payment: StoredPayment) -> RefundResult:
        """Make the refund ``request`` of ``payment`` (as read just before)."""
        with bind_log_context(payment_id=request.payment_id):
            refusal = self.client.refusal()
            if refusal is not None:
                existing = self.store.find_refund_by_key(request.idempotency_key)
                if existing is None:
                    metrics.observe_refund(refusal.code)
                    raise refusal
                return self._repeat(existing, request, refusal)
            left = payment.amount_minor - payment.refund_reserved_minor
            if request.amount_minor is None and left <= 0:  # a replay, or nothing to refund
                existing = self.store.find_refund_by_key(request.idempotency_key)
                if existing is not None:
                    return self._repeat(existing, request, None)
                metrics.observe_refund("amount_exceeds_refundable")
                raise exceeds_refundable(None, 0, payment.currency)
            try:
                stored, created = self.store.reserve(_new_refund(request, left, payment.currency))
            except RefundNotAllowed as exc:
                metrics.observe_refund(exc.code)
                raise
            if not created:
                return self._repeat(stored, request, None)
            assert payment.provider_charge_id is not None  # succeeded: the store checked
            return self._send(stored, payment.provider_charge_id, maybe_sent=False)

    def _repeat(
        self,
        existing: StoredRefund,
        request: CheckedRefund,
        refusal: PaymentServiceUnavailable | None,
    ) -> RefundResult:
        """A call with a known key: replay it, re-submit it, or report the conflict."""
        result = RefundResult.from_stored(existing, replayed=True)
        if existing.request_fingerprint != request.fingerprint:
            raise IdempotencyKeyReused(
                "this idempotency key was already used for a different refund request",
                refund=result,
            )
        if existing.status == PENDING:
            raise PaymentInProgress(
                "a refund with this idempotency key is still in progress",
                refund=result,
                retry_after=max(1.0, in_flight_left(existing, self.settings, self._now())),
            )
        if not is_resubmittable(existing.status, existing.failure_code):
            if existing.status == FAILED:
                raise _stored_failure(existing, result)
            metrics.observe_refund("replayed")
            return result
        refusal = refusal or self.client.refusal()
        if refusal is not None:
            if existing.status == UNKNOWN:
                metrics.observe_refund("unknown")
                raise PaymentOutcomeUnknown(
                    "the outcome of this refund is still unknown and it was not re-submitted: "
                    f"{refusal.message}; retry later with the same key",
                    refund=result,
                )
            metrics.observe_refund(refusal.code)
            refusal.refund = result  # failed, and the provider certainly never saw it
            raise refusal
        claimed = self.move(existing, RefundChange(PENDING, "resubmitted"))
        if claimed is None:
            raise PaymentInProgress("another call is re-submitting this refund", refund=result)
        log.info("re-submitting %s refund under the same idempotency key", existing.status)
        return self._send(claimed, self.charge_of(claimed), maybe_sent=existing.status == UNKNOWN)

    def charge_of(self, refund: StoredRefund) -> str:
        """The provider's id of the charge ``refund`` gives money back from."""
        payment = self.payments.find_by_id(refund.payment_id)
        if payment is None or payment.provider_charge_id is None:
            raise AssertionError(f"refund {refund.id} of a payment without a charge")
        return payment.provider_charge_id

    def _send(self, refund: StoredRefund, charge_id: str, *, maybe_sent: bool) -> RefundResult:
        """Steps 2 and 3 for the provider's charge ``charge_id``. ``maybe_sent``: an
        earlier call may have reached the provider."""
        with bind_log_context(refund_id=refund.id):
            try:
                reply = self.client.refund(_refund_request(refund, charge_id))
            except PaymentOutcomeUnknown as exc:
                return self._unknown(refund, exc, exc.code)
            except PaymentInProgress as exc:  # another request under our key, at the provider
                return self._unknown(refund, _maybe_sent(exc, exc.message), exc.code)
            except InvalidPaymentRequest as exc:  # the adapter refused to build the request
                if exc.attempts or maybe_sent:  # only a request never sent is certainly not
                    return self._unknown(refund, _maybe_sent(exc, exc.message), exc.code)
                return self._failed(refund, exc)
            except (RefundNotAllowed, PaymentDeclined) as exc:
                log.info("refund refused by the provider (%s)", exc.code)
                return self._failed(refund, exc)
            except (PaymentServiceUnavailable, PaymentProviderError) as exc:
                if maybe_sent:
                    why = (
                        "an earlier call may have made this refund and this one got no "
                        f"definitive answer ({exc.code}: {exc.message})"
                    )
                    return self._unknown(refund, _maybe_sent(exc, why), exc.code)
                log.warning("refund not sent (%s): %s", exc.code, exc.message)
                return self._failed(refund, exc)
            except BaseException as exc:
                self._store_outcome(
                    refund, RefundChange(UNKNOWN, f"unexpected_error: {type(exc).__name__}")
                )
                raise
            return self._settle_answer(refund, reply.value, reply.attempts)

    def _unknown(self, refund: StoredRefund, exc: PaymentOutcomeUnknown, reason: str):
        log.error(
            "refund outcome unknown (%s): %s",
            reason,
            exc.message,
            extra={"attempts": len(exc.attempts)},
        )
        return self._settle_raising(refund, exc, RefundChange(UNKNOWN, reason), "unknown")

    def _settle_answer(
        self, refund: StoredRefund, answer: ProviderRefund, attempts: Sequence
    ) -> RefundResult:
        if answer.status is RefundStatus.PENDING:
            metrics.observe_refund("pending")
            updated = self.store.record_refund_attempts(
                refund.id, attempts, REFUND, provider_refund_id=answer.id
            )
            return RefundResult.from_stored(updated or refund)
        if answer.status is RefundStatus.FAILED:
            declined = RefundDeclined(
                answer.failure_message or "the provider failed the refund",
                code=answer.failure_code or "refund_failed",
                attempts=list(attempts),
            )
            return self._failed(refund, declined)
        final = self._store_outcome(
            refund,
            RefundChange(SUCCEEDED, "refunded", attempts=attempts, provider_refund_id=answer.id),
        )
        metrics.observe_refund("succeeded")
        return RefundResult.from_stored(final)

    def _failed(self, refund: StoredRefund, exc: PaymentError) -> RefundResult:
        if isinstance(exc, PaymentDeclined) and not isinstance(exc, RefundDeclined):
            exc = RefundDeclined(exc.message, code=exc.code, attempts=exc.attempts)
        change = RefundChange(
            FAILED,
            exc.code,
            attempts=exc.attempts,
            failure_code=exc.code,
            failure_message=exc.message[:1000],
        )
        return self._settle_raising(refund, exc, change, exc.code)

    def _settle_raising(
        self, refund: StoredRefund, exc: PaymentError, change: RefundChange, outcome: str
    ) -> RefundResult:
        """Store ``change`` (with the attempts of ``exc``) and raise ``exc`` with the refund.

        A refund settled ``succeeded`` meanwhile (reconciliation, an event) is the
        provider's truth and is returned instead.
        """
        if exc.attempts and not change.attempts:
            change = RefundChange(**{**change.__dict__, "attempts": exc.attempts})
        final = self._store_outcome(refund, change)
        exc.refund = RefundResult.from_stored(final)
        if final.status == SUCCEEDED:
            metrics.observe_refund("succeeded")
            return exc.refund
        metrics.observe_refund(outcome)
        raise exc

    def _store_outcome(self, refund: StoredRefund, change: RefundChange) -> StoredRefund:
        """Step 3; a database blip must not lose what the provider said."""
        check_refund_transition(refund.status, change.to_status, refund.failure_code)
        try:
            final = write_with_retries(
                lambda: self.store.transition_refund(refund, change),
                retries=self.store_retries,
                sleep=self._sleep,
            )
        except DatabaseUnavailable as exc:
            log.error(
                "could not record the provider's answer to a refund (%s -> %s); it stays %s "
                "until reconciliation settles it",
                refund.status,
                change.to_status,
                refund.status,
            )
            raise PaymentOutcomeUnknown(
                "the provider answered but the refund's outcome could not be stored; "
                "reconciliation will settle it",
                code="outcome_not_stored",
                refund=RefundResult.from_stored(refund),
            ) from exc
        if final is not None:
            return final
        current = self.store.find_refund(refund.id)
        if current is None:
            raise AssertionError(f"refund {refund.id} vanished from the store")
        if (
            change.to_status == SUCCEEDED
            and current.status == FAILED
            and current.failure_code == FailureCode.NOT_RECEIVED
        ):
            log.error("refund was reconciled as not received while it was in flight; it landed")
            landed = RefundChange(
                SUCCEEDED, "refund_landed_after_reconciliation",
                provider_refund_id=change.provider_refund_id,
            )  # fmt: skip
            return self.move(current, landed) or self.store.find_refund(refund.id) or current
        if current.status != change.to_status:
            log.warning(
                "refund was settled as %s while this call found %s",
                current.status,
                change.to_status,
            )
        return current

    def move(self, refund: StoredRefund, change: RefundChange) -> StoredRefund | None:
        """A status change the lifecycle allows, if ``refund`` is still as it was read."""
        check_refund_transition(refund.status, change.to_status, refund.failure_code)
        return self.store.transition_refund(refund, change)

    # -- reconciliation ----------------------------------------------------------------

    def reconcile(
        self, older_than_seconds: float = 60, *, batch_size: int = RECONCILE_BATCH
    ) -> ReconcileReport:
        """One pass over the refunds waiting for the provider's verdict."""
        return reconcile_pass(
            settings=self.settings,
            older_than_seconds=older_than_seconds,
            now=self._now,
            refusal=self.client.refusal,
            claim=self.store.claim_refunds_for_reconciliation,
            release=self.store.release_refunds,
            settle=self._reconcile_one,
            batch_size=batch_size,
        )

    def _reconcile_one(self, refund: StoredRefund, report: ReconcileReport) -> None:
        with bind_log_context(payment_id=refund.payment_id, refund_id=refund.id):
            settle_from_lookup(
                refund,
                report,
                what="refund",
                look_up=lambda r: self.client.find_refunds(refund_lookup(r, self.charge_of(r))),
                verdict_of=refund_verdict,
                record=lambda refund_id, attempts: self.store.record_refund_attempts(
                    refund_id, attempts, LOOKUP
                ),
                release=self.store.release_refunds,
                move=self.move,
                settings=self.settings,
                now=self._now(),
            )


def _maybe_sent(exc: PaymentError, message: str) -> PaymentOutcomeUnknown:
    """``exc`` from a refund that may have reached the provider: its outcome is unknown."""
    unknown = PaymentOutcomeUnknown(message, attempts=exc.attempts)
    unknown.__cause__ = exc
    return unknown


def _stored_failure(refund: StoredRefund, result: RefundResult) -> PaymentError:
    """A failed refund replayed as the error it first was."""
    message = refund.failure_message or "the refund failed"
    if refund.failure_code == "amount_exceeds_refundable":
        return RefundNotAllowed(message, code=refund.failure_code, refund=result)
    return RefundDeclined(message, code=refund.failure_code or "refund_failed", refund=result)


def _new_refund(request: CheckedRefund, left: int, currency: str) -> NewRefund:
    """``request`` as step 1 stores it: without an amount, what was ``left`` when the
    payment was read (if another refund takes some of it meanwhile, the reservation
    refuses it). Whether the payment can take it is the store's to say, atomically."""
    return NewRefund(
        id=new_refund_id(),
        payment_id=request.payment_id,
        idempotency_key=request.idempotency_key,
        fingerprint=request.fingerprint,
        amount_minor=left if request.amount_minor is None else request.amount_minor,
        currency=currency,
        reason=request.reason,
        metadata=request.metadata,
    )


def refund_lookup(refund: StoredRefund, provider_charge_id: str) -> RefundLookup:
    """What the provider is asked about ``refund`` (reconciliation, events)."""
    return RefundLookup(
        refund_id=refund.id,
        payment_id=refund.payment_id,
        idempotency_key=provider_key(refund),
        provider_charge_id=provider_charge_id,
        provider_refund_id=refund.provider_refund_id,
        created_at=refund.created_at,
    )


def provider_key(refund: StoredRefund) -> str:
    """The refund's ``Idempotency-Key`` at the provider: its own id, stable across every
    re-submission. Not the caller's key: providers keep one key space across endpoints
    (Stripe answers ``idempotency_error``, the sandbox 422), and callers naturally use
    one order number for a payment and its refund."""
    return refund.id


def _refund_request(refund: StoredRefund, provider_charge_id: str) -> RefundRequest:
    return RefundRequest(
        refund_id=refund.id,
        payment_id=refund.payment_id,
        idempotency_key=provider_key(refund),
        provider_charge_id=provider_charge_id,
        amount_minor=refund.amount_minor,
        currency=refund.currency,
        reason=refund.reason,
        metadata=refund.metadata,
        created_at=refund.created_at,
    )
