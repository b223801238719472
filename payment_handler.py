"""Take a payment: the library API and the lifecycle of DESIGN.md section 4.

The call that failed in production held a database transaction open around the HTTP
call to the provider and had no idempotency. Here every payment follows three steps:

1. a short transaction inserts the payment as ``pending`` under its idempotency key
   (unique: concurrent callers with the same key cannot both get here) and commits;
2. the provider is called with NO database connection checked out (``PaymentClient``:
   the same ``Idempotency-Key`` on every retry, ``PAYMENT_DEADLINE``, the breaker);
3. a short transaction stores the outcome, every provider request and the transition.

The states and their allowed moves are in ``payment_states``. The money rule holds
throughout: once a request may have reached the provider, only the provider's
definitive answer settles the payment; everything else is ``unknown``, which
``reconcile_payments`` (or a retry under the same key) resolves.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

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
from payment_request import PAYMENT_ID, REFUND_ID, PaymentRequest, build_request
from payment_results import PaymentResult, ReconcileReport, RefundResult
from payment_states import (
    FailureCode,
    PaymentStatus,
    check_transition,
    is_resubmittable,
    may_transition,
)
from payment_store import (
    CHARGE,
    LOOKUP,
    Change,
    NewPayment,
    PaymentStore,
    SqlPaymentStore,
    StoredPayment,
    write_with_retries,
)
from providers.base import ChargeLookup, ChargeRequest, ChargeStatus
from reconciliation import (
    RECONCILE_BATCH,
    charge_verdict,
    in_flight_left,
    reconcile_pass,
    settle_from_lookup,
)
from refund_store import RefundStore, SqlRefundStore
from refunds import RefundService
from settings import Settings, get_settings

__all__ = [
    "DatabaseUnavailable",
    "IdempotencyKeyReused",
    "InvalidPaymentRequest",
    "PaymentClient",
    "PaymentDeclined",
    "PaymentError",
    "PaymentInProgress",
    "PaymentNotFound",
    "PaymentOutcomeUnknown",
    "PaymentProviderError",
    "PaymentResult",
    "PaymentServiceUnavailable",
    "ReconcileReport",
    "RefundDeclined",
    "RefundNotAllowed",
    "RefundResult",
    "get_payment",
    "get_refund",
    "process_payment",
    "reconcile_payments",
    "refund_payment",
]

log = logging.getLogger(__name__)

PENDING, SUCCEEDED, FAILED, UNKNOWN = (
    PaymentStatus.PENDING,
    PaymentStatus.SUCCEEDED,
    PaymentStatus.FAILED,
    PaymentStatus.UNKNOWN,
)


def new_payment_id() -> str:
    return f"pay_{uuid.uuid4().hex[:24]}"


class PaymentService:
    """The lifecycle over a provider client and a store.

    :param settings: the configuration.
    :param client: the provider client (default: the provider ``PAYMENT_PROVIDER`` names,
        over the process's pooled session).
    :param store: where payments are kept (default: the service's database).
    :param refund_store: where refunds are kept (default: the service's database).
    :param now: wall-clock time (aware UTC) for reconciliation cut-offs and leases.
    :param sleep: waits between attempts to store an outcome.
    :param store_retries: how often to retry recording an outcome if the database blips
        after the provider already answered (the charge must not go unrecorded).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        client: PaymentClient | None = None,
        store: PaymentStore | None = None,
        refund_store: RefundStore | None = None,
        now: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] = time.sleep,
        store_retries: int = 3,
    ):
        self.settings = settings or get_settings()
        self.client = client or PaymentClient(self.settings)
        self.store: PaymentStore = store if store is not None else SqlPaymentStore()
        self._now, self._sleep = now, sleep
        self.store_retries = store_retries
        self.refunds = RefundService(
            self.settings,
            client=self.client,
            payments=self.store,
            store=refund_store if refund_store is not None else SqlRefundStore(),
            now=now,
            sleep=sleep,
            store_retries=store_retries,
        )

    @property
    def breaker_state(self) -> str:
        """``closed``, ``half_open`` or ``open``: this process's view of the provider."""
        return self.client.breaker.state

    # -- taking a payment ------------------------------------------------------------

    def process(self, request: PaymentRequest) -> PaymentResult:
        with bind_log_context(transaction_id=request.transaction_id):
            refusal = self.client.refusal()
            if refusal is not None:
                # A new key is refused before anything is stored; a known one is replayed.
                existing = self.store.find_by_key(request.idempotency_key)
                if existing is None:
                    metrics.observe_payment(refusal.code)
                    raise refusal
                return self._repeat(existing, request, refusal)
            new = NewPayment(
                id=new_payment_id(),
                idempotency_key=request.idempotency_key,
                transaction_id=request.transaction_id,
                fingerprint=request.fingerprint,
                amount_minor=request.amount_minor,
                currency=request.currency,
                payment_method=request.payment_method,
                description=request.description,
                metadata=request.metadata,
            )
            # What this provider can never take is refused before anything is stored.
            self.client.provider.check_charge(
                _charge_request(StoredPayment.pending(new, self._now()))
            )
            stored, created = self.store.insert_pending(new)
            if not created:
                return self._repeat(stored, request, None)
            return self._charge(stored, maybe_charged=False)

    def _repeat(
        self,
        existing: StoredPayment,
        request: PaymentRequest,
        refusal: PaymentServiceUnavailable | None,
    ) -> PaymentResult:
        """A call with a known key: replay it, re-submit it, or report the conflict."""
        with bind_log_context(payment_id=existing.id):
            if existing.request_fingerprint != request.fingerprint:
                raise IdempotencyKeyReused(
                    "this idempotency key was already used for a different payment request",
                    payment=PaymentResult.from_stored(existing),
                )
            if existing.status == PENDING:
                # Until its charge cannot be in flight, nobody can say it was not made.
                raise PaymentInProgress(
                    "a payment with this idempotency key is still in progress",
                    payment=PaymentResult.from_stored(existing),
                    retry_after=max(1.0, in_flight_left(existing, self.settings, self._now())),
                )
            result = PaymentResult.from_stored(existing, replayed=True)
            if not is_resubmittable(existing.status, existing.failure_code):
                return self._replay(existing, result)
            refusal = refusal or self.client.refusal()
            if refusal is not None:
                return self._replay_refused(existing, result, refusal)
            if self._key_may_be_forgotten(existing):
                settled = self._look_up_before_resubmitting(existing, result)
                if settled is not None:
                    return settled
            claimed = self.move(existing, Change(PENDING, "resubmitted"))
            if claimed is None:
                raise PaymentInProgress(
                    "another call is re-submitting this payment",
                    payment=PaymentResult.from_stored(existing),
                )
            log.info("re-submitting %s payment under the same idempotency key", existing.status)
            return self._charge(claimed, maybe_charged=existing.status == UNKNOWN)

    def _key_may_be_forgotten(self, payment: StoredPayment) -> bool:
        """The provider may have forgotten the payment's key (``PAYMENT_KEY_RETENTION``):
        re-submitting it could then charge a second time."""
        hours = self.settings.payment_key_retention
        return hours is not None and self._now() - payment.created_at >= timedelta(hours=hours)

    def _look_up_before_resubmitting(
        self, existing: StoredPayment, result: PaymentResult
    ) -> PaymentResult | None:
        """Settle ``existing`` from the provider's charges for its key; ``None`` only when
        the provider certainly has none, so re-submitting cannot charge twice."""
        try:
            reply = self.client.find_charges(charge_lookup(existing))
        except PaymentError as exc:
            self.store.record_attempts(existing.id, exc.attempts, LOOKUP)
            raise PaymentOutcomeUnknown(
                "the provider may have forgotten this payment's idempotency key and could "
                f"not be asked about it ({exc.code}); retry later with the same key",
                payment=result,
            ) from exc
        if not reply.value:
            self.store.record_attempts(existing.id, reply.attempts, LOOKUP)
            log.info("no charge at the provider for a key past its retention: re-submitting")
            return None
        verdict = charge_verdict(reply.value)
        if verdict is None:
            raise PaymentInProgress("the provider is still processing this payment", payment=result)
        current: StoredPayment | None = existing
        if may_transition(existing.status, verdict.to_status, existing.failure_code):
            change = replace(verdict, attempts=reply.attempts, attempt_kind=LOOKUP)
            current = self.move(existing, change) or self.store.find_by_id(existing.id)
        assert current is not None
        if is_resubmittable(current.status, current.failure_code):
            raise PaymentInProgress("this payment changed while it was looked up", payment=result)
        return self._replay(current, PaymentResult.from_stored(current, replayed=True))

    @staticmethod
    def _replay(existing: StoredPayment, result: PaymentResult) -> PaymentResult:
        """A settled payment answers as it was settled, without a provider call."""
        if existing.status == FAILED:
            raise PaymentDeclined(
                existing.failure_message or "the payment failed",
                code=existing.failure_code or FailureCode.CARD_DECLINED,
                payment=result,
            )
        metrics.observe_payment("replayed")
        return result

    @staticmethod
    def _replay_refused(
        existing: StoredPayment, result: PaymentResult, refusal: PaymentServiceUnavailable
    ) -> PaymentResult:
        """The provider cannot be asked now: say what is stored, never "not charged" for
        a payment that may have been charged."""
        if existing.status == UNKNOWN:
            metrics.observe_payment("unknown")
            raise PaymentOutcomeUnknown(
                f"the outcome of this payment is still unknown and it was not re-submitted: "
                f"{refusal.message}; retry later with the same key",
                payment=result,
            )
        metrics.observe_payment(refusal.code)
        refusal.payment = result  # failed, and the provider certainly never charged it
        raise refusal

    def _charge(self, stored: StoredPayment, *, maybe_charged: bool) -> PaymentResult:
        """Step 2 and 3. ``maybe_charged``: an earlier call may have reached the provider."""
        with bind_log_context(payment_id=stored.id):
            try:
                reply = self.client.charge(_charge_request(stored))
            except PaymentOutcomeUnknown as exc:
                return self._unknown(stored, exc)
            except PaymentInProgress as exc:  # another request under our key, at the provider
                return self._unknown(
                    stored, PaymentOutcomeUnknown(exc.message, attempts=exc.attempts)
                )
            except PaymentDeclined as exc:
                log.info("payment declined by the provider (%s)", exc.code)
                return self._failed(stored, exc)
            except (PaymentServiceUnavailable, PaymentProviderError) as exc:
                if maybe_charged:
                    return self._unknown(stored, _still_unknown(exc))
                log.warning("payment not charged (%s): %s", exc.code, exc.message)
                return self._failed(stored, exc)
            except BaseException as exc:
                # A bug or an interrupt after the request may have gone out: the payment
                # must not stay silently pending; reconciliation asks the provider.
                reason = f"unexpected_error: {type(exc).__name__}"
                self._store_outcome(stored, Change(UNKNOWN, reason))
                raise
            if reply.value.status is ChargeStatus.PENDING:
                metrics.observe_payment("pending")
                updated = self.store.record_attempts(
                    stored.id, reply.attempts, CHARGE, provider_charge_id=reply.value.id
                )
                return PaymentResult.from_stored(updated or stored)
            final = self._store_outcome(
                stored,
                Change(
                    SUCCEEDED, "charged", attempts=reply.attempts, provider_charge_id=reply.value.id
                ),
            )
            metrics.observe_payment("succeeded")
            if final.status != SUCCEEDED:  # settled otherwise meanwhile; already logged
                raise PaymentOutcomeUnknown(
                    "the provider charged this payment but it was settled concurrently as "
                    f"{final.status}; an operator must check it",
                    code="settled_concurrently",
                    payment=PaymentResult.from_stored(final),
                )
            return PaymentResult.from_stored(final)

    def _unknown(self, stored: StoredPayment, exc: PaymentOutcomeUnknown) -> PaymentResult:
        log.error(
            "payment outcome unknown (%s): %s",
            exc.code,
            exc.message,
            extra={"attempts": len(exc.attempts)},
        )
        change = Change(UNKNOWN, exc.code, attempts=exc.attempts)
        return self._raise_unless_charged(stored, exc, change, "unknown")

    def _failed(self, stored: StoredPayment, exc: PaymentError) -> PaymentResult:
        change = Change(
            FAILED,
            exc.code,
            attempts=exc.attempts,
            failure_code=exc.code,
            failure_message=exc.message[:1000],
        )
        outcome = "declined" if isinstance(exc, PaymentDeclined) else exc.code
        return self._raise_unless_charged(stored, exc, change, outcome)

    def _raise_unless_charged(
        self, stored: StoredPayment, exc: PaymentError, change: Change, outcome: str
    ) -> PaymentResult:
        """Store ``change`` and raise ``exc`` with the payment attached.

        If a reconciler settled the payment as ``succeeded`` meanwhile, that is the
        provider's truth and it is returned instead.
        """
        final = self._store_outcome(stored, change)
        exc.payment = PaymentResult.from_stored(final)
        if final.status == SUCCEEDED:
            metrics.observe_payment("succeeded")
            return exc.payment
        metrics.observe_payment(outcome)
        raise exc

    def _store_outcome(self, stored: StoredPayment, change: Change) -> StoredPayment:
        """Write step 3. A database blip here must not lose a charge that happened."""
        check_transition(stored.status, change.to_status, stored.failure_code)
        try:
            final = write_with_retries(
                lambda: self.store.transition(stored, change),
                retries=self.store_retries,
                sleep=self._sleep,
            )
        except DatabaseUnavailable as exc:
            log.error(
                "could not record the provider's answer (%s -> %s); the payment stays "
                "%s until reconcile_payments settles it",
                stored.status,
                change.to_status,
                stored.status,
                extra={"provider_charge_id": change.provider_charge_id},
            )
            raise PaymentOutcomeUnknown(
                "the provider answered but the outcome could not be stored; "
                "reconciliation will settle it",
                code="outcome_not_stored",
                payment=PaymentResult.from_stored(stored),
            ) from exc
        return final or self._lost_race(stored, change)

    def _lost_race(self, stored: StoredPayment, change: Change) -> StoredPayment:
        """Someone settled the payment while we were charging it: keep the provider's truth.

        The one case to correct is a reconciler that found no charge for the key
        (``not_received``) while ours was still in flight and then succeeded.
        """
        current = self.store.find_by_id(stored.id)
        if current is None:
            raise AssertionError(f"payment {stored.id} vanished from the store")
        if (
            change.to_status == SUCCEEDED
            and current.status == FAILED
            and current.failure_code == FailureCode.NOT_RECEIVED
        ):
            log.error(
                "payment was reconciled as not received while its charge was in flight; "
                "the provider charged it: recording it as succeeded",
                extra={"provider_charge_id": change.provider_charge_id},
            )
            corrected = self.move(
                current,
                Change(
                    SUCCEEDED,
                    "charge_landed_after_reconciliation",
                    provider_charge_id=change.provider_charge_id,
                ),
            )
            return corrected or self.store.find_by_id(stored.id) or current
        if current.status != change.to_status:
            log.warning(
                "payment was settled as %s while this call found %s",
                current.status,
                change.to_status,
            )
        return current

    def move(self, payment: StoredPayment, change: Change) -> StoredPayment | None:
        """A status change the lifecycle allows, if ``payment`` is still as it was read."""
        check_transition(payment.status, change.to_status, payment.failure_code)
        return self.store.transition(payment, change)

    # -- reconciliation ----------------------------------------------------------------

    def reconcile(
        self, older_than_seconds: float = 60, *, batch_size: int = RECONCILE_BATCH
    ) -> ReconcileReport:
        """One pass over the payments waiting for the provider's verdict
        (:func:`reconciliation.reconcile_pass`)."""
        return reconcile_pass(
            settings=self.settings,
            older_than_seconds=older_than_seconds,
            now=self._now,
            refusal=self.client.refusal,
            claim=self.store.claim_for_reconciliation,
            release=self.store.release,
            settle=self._reconcile_one,
            batch_size=batch_size,
        )

    def _key_expiring(self, payment: StoredPayment) -> bool:
        """In the last quarter of the provider's key retention."""
        hours = self.settings.payment_key_retention
        age = self._now() - payment.created_at
        return hours is not None and age >= timedelta(hours=hours * 0.75)

    def _reconcile_one(self, payment: StoredPayment, report: ReconcileReport) -> None:
        with bind_log_context(payment_id=payment.id, transaction_id=payment.transaction_id):
            self._settle_with_provider(payment, report)

    def _settle_with_provider(self, payment: StoredPayment, report: ReconcileReport) -> None:
        if payment.status == UNKNOWN and self._key_expiring(payment):
            metrics.UNKNOWN_NEAR_KEY_EXPIRY.inc()
            log.error(
                "payment outcome still unknown %s after it was made; the provider forgets "
                "its idempotency key after %s h: settle it before then",
                self._now() - payment.created_at,
                self.settings.payment_key_retention,
            )
        settle_from_lookup(
            payment,
            report,
            what="payment",
            look_up=lambda p: self.client.find_charges(charge_lookup(p)),
            verdict_of=charge_verdict,
            record=lambda payment_id, attempts: self.store.record_attempts(
                payment_id, attempts, LOOKUP
            ),
            release=self.store.release,
            move=self.move,
            settings=self.settings,
            now=self._now(),
        )


def charge_lookup(payment: StoredPayment) -> ChargeLookup:
    """What the provider is asked about ``payment`` (reconciliation, retention, events)."""
    return ChargeLookup(
        payment_id=payment.id,
        idempotency_key=payment.idempotency_key,
        provider_charge_id=payment.provider_charge_id,
        created_at=payment.created_at,
    )


def _charge_request(payment: StoredPayment) -> ChargeRequest:
    return ChargeRequest(
        payment_id=payment.id,
        idempotency_key=payment.idempotency_key,
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        payment_method=payment.payment_method,
        transaction_id=payment.transaction_id,
        description=payment.description,
        metadata=payment.metadata,
        created_at=payment.created_at,
    )


def _still_unknown(exc: PaymentError) -> PaymentOutcomeUnknown:
    """A re-submission's non-answer cannot settle a payment an earlier call may have charged."""
    unknown = PaymentOutcomeUnknown(
        f"an earlier call may have charged this payment and this one got no definitive "
        f"answer ({exc.code}: {exc.message}); reconciliation will settle it",
        attempts=exc.attempts,
    )
    unknown.__cause__ = exc
    return unknown


# --------------------------------------------------------------------------- module API

_service_lock = threading.Lock()
_service: PaymentService | None = None


def get_payment_service() -> PaymentService:
    """The process's service (client, session, breaker, store), built on first use."""
    global _service
    if _service is None:
        with _service_lock:
            if _service is None:
                _service = PaymentService(get_settings())
    return _service


def reset_payment_service(service: PaymentService | None = None) -> None:
    """Replace (or forget) the process's service: after fork, and in tests."""
    global _service, _service_lock
    _service = service
    _service_lock = threading.Lock()


os.register_at_fork(after_in_child=reset_payment_service)


def process_payment(
    amount,
    payment_method="card",
    transaction_id=None,
    *,
    currency=None,
    description=None,
    metadata=None,
    idempotency_key=None,
) -> PaymentResult:
    """Charge ``amount`` (major units) at most once per ``transaction_id``.

    Returns the stored payment (``succeeded``, or ``pending`` when the provider is
    still processing it). Raises ``InvalidPaymentRequest`` (nothing sent),
    ``PaymentDeclined``, ``PaymentServiceUnavailable`` (not charged; retry later with
    the same ``transaction_id``), ``PaymentOutcomeUnknown`` (maybe charged; retrying
    with the same ``transaction_id`` is safe), ``PaymentInProgress``,
    ``IdempotencyKeyReused`` or ``DatabaseUnavailable`` (nothing charged).
    ``idempotency_key`` (the HTTP ``Idempotency-Key`` header) overrides
    ``transaction_id`` as the key.
    """
    service = get_payment_service()
    request = build_request(
        amount,
        payment_method,
        transaction_id,
        currency=currency,
        description=description,
        metadata=metadata,
        idempotency_key=idempotency_key,
        settings=service.settings,
    )
    return service.process(request)


def get_payment(payment_id: str) -> PaymentResult | None:
    """The stored payment with this id, or ``None`` (an id we could not have made is
    answered without asking the store)."""
    if not isinstance(payment_id, str) or not PAYMENT_ID.fullmatch(payment_id):
        return None
    stored = get_payment_service().store.find_by_id(payment_id)
    return PaymentResult.from_stored(stored) if stored is not None else None


def refund_payment(
    payment_id, amount=None, *, idempotency_key=None, reason=None, metadata=None
) -> RefundResult:
    """Refund a ``succeeded`` payment: all that is left (``amount=None``) or part of it.

    ``amount`` is in major units like ``process_payment``'s. Refunds of one payment never
    add up to more than it was charged, whatever runs concurrently on any host. Returns
    the refund (``succeeded``, or ``pending`` while the provider processes it). Raises
    ``PaymentNotFound``, ``RefundNotAllowed`` (not ``succeeded``, or more than is left;
    nothing sent), ``InvalidPaymentRequest``, ``RefundDeclined``,
    ``PaymentServiceUnavailable`` (not refunded), ``PaymentOutcomeUnknown`` (maybe
    refunded; retrying with the same ``idempotency_key`` is safe), ``PaymentInProgress``,
    ``IdempotencyKeyReused`` or ``DatabaseUnavailable``.
    """
    return get_payment_service().refunds.refund_payment(
        payment_id, amount, idempotency_key=idempotency_key, reason=reason, metadata=metadata
    )


def get_refund(refund_id: str) -> RefundResult | None:
    """The stored refund with this id, or ``None``."""
    if not isinstance(refund_id, str) or not REFUND_ID.fullmatch(refund_id):
        return None
    stored = get_payment_service().refunds.store.find_refund(refund_id)
    return RefundResult.from_stored(stored) if stored is not None else None


def reconcile_payments(older_than_seconds: float = 60) -> ReconcileReport:
    """Settle ``pending``/``unknown`` payments and refunds older than the threshold with
    the provider (refunds in ``report.refunds``).

    One pass: every payment is looked up at most once per run, and the run ends early
    while the provider is unavailable. A ``pending`` payment is left alone until its
    charge cannot be in flight any more (``PAYMENT_DEADLINE`` + ``DB_POOL_TIMEOUT`` +
    1 s), whatever the threshold. Safe to run from cron on several hosts at once:
    payments are leased with ``SKIP LOCKED`` and every settlement is conditional on the
    version of the payment that was looked up.
    """
    if older_than_seconds < 0:
        raise InvalidPaymentRequest("older_than_seconds must not be negative")
    service = get_payment_service()
    report = service.reconcile(older_than_seconds)
    report.refunds = service.refunds.reconcile(older_than_seconds)
    return report
