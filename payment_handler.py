"""Take a payment: ``process_payment(amount)`` and the provider client behind it.

The call that failed in production held a database transaction open around the HTTP
call to the provider and had no idempotency. Here every payment follows three steps:

1. a short transaction inserts the payment as ``pending`` under its idempotency key
   (unique: concurrent callers with the same key cannot both get here) and commits;
2. the provider is called with NO database connection checked out, with the same
   ``Idempotency-Key`` on every retry, bounded by ``PAYMENT_DEADLINE`` and a circuit
   breaker;
3. a short transaction stores the outcome, every provider request and the transition.

States: ``pending`` -> ``succeeded`` | ``failed`` | ``unknown``; ``unknown`` ->
``succeeded`` | ``failed`` by ``reconcile_payments``. A caller retrying an ``unknown``
payment (or one that ``failed`` because the provider was unreachable) with the same key
re-submits it under the same Idempotency-Key (-> ``pending``): the provider deduplicates,
so that is never a second charge.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

import requests

import metrics
import payment_store as store
from circuit_breaker import build_breaker
from connection_pool import (
    POOL_BUSY,
    TLS,
    Bulkhead,
    Exchange,
    build_retry,
    default_jitter,
    get_session,
    send_with_retries,
)
from errors import (
    DatabaseUnavailable,
    IdempotencyKeyReused,
    InvalidPaymentRequest,
    PaymentDeclined,
    PaymentError,
    PaymentInProgress,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
)
from log_context import bind_log_context
from money import currency_exponent, to_major_units, to_minor_units
from payment_request import PaymentRequest, build_request, new_idempotency_key
from payment_store import FAILED, PENDING, SUCCEEDED, UNKNOWN
from settings import Settings, get_settings

__all__ = [
    "DatabaseUnavailable",
    "IdempotencyKeyReused",
    "InvalidPaymentRequest",
    "PaymentClient",
    "PaymentDeclined",
    "PaymentError",
    "PaymentInProgress",
    "PaymentOutcomeUnknown",
    "PaymentProviderError",
    "PaymentResult",
    "PaymentServiceUnavailable",
    "ProviderCharge",
    "ReconcileReport",
    "process_payment",
    "reconcile_payments",
]

log = logging.getLogger(__name__)

TIMEOUT_MESSAGE = "Payment service connection failed - timeout after %dms"

#: The only status changes a payment can make (section 4 of DESIGN.md).
TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({SUCCEEDED, FAILED, UNKNOWN}),
    UNKNOWN: frozenset({SUCCEEDED, FAILED, PENDING}),
    # Re-submitting a failure the provider never saw; or a charge that landed after a
    # reconciler had found no trace of it (``not_received``).
    FAILED: frozenset({PENDING, SUCCEEDED}),
    SUCCEEDED: frozenset(),
}
#: ``failed`` payments that the provider certainly never charged: safe to re-submit.
RESUBMITTABLE_FAILURES = frozenset(
    {
        "provider_unavailable",
        "breaker_open",
        "outbound_pool_busy",
        "provider_tls_error",
        "provider_rejected_request",
        "not_received",
    }
)


def check_transition(from_status: str, to_status: str) -> None:
    """Refuse a status change the lifecycle does not allow (a bug if it ever fires)."""
    if to_status not in TRANSITIONS[from_status]:
        raise RuntimeError(f"payment state {from_status!r} cannot become {to_status!r}")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PaymentResult:
    """A stored payment as callers see it. ``amount`` is in major units."""

    id: str
    status: str
    amount: Decimal
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

    @property
    def amount_minor(self) -> int:
        return int(self.amount.scaleb(currency_exponent(self.currency)))

    @classmethod
    def from_stored(cls, p: store.StoredPayment, *, replayed: bool = False) -> PaymentResult:
        return cls(
            id=p.id,
            status=p.status,
            amount=to_major_units(p.amount_minor, p.currency),
            currency=p.currency,
            transaction_id=p.transaction_id,
            idempotency_key=p.idempotency_key,
            provider_charge_id=p.provider_charge_id,
            attempts=p.attempts,
            payment_method=p.payment_method,
            description=p.description,
            metadata=p.metadata,
            failure_code=p.failure_code,
            failure_message=p.failure_message,
            created_at=p.created_at,
            updated_at=p.updated_at,
            replayed=replayed,
        )

    def to_dict(self) -> dict:
        """The JSON shape of the HTTP API (amount as a decimal string: no float money)."""
        return {
            "id": self.id,
            "status": self.status,
            "amount": str(self.amount),
            "amount_minor": self.amount_minor,
            "currency": self.currency,
            "payment_method": self.payment_method,
            "transaction_id": self.transaction_id,
            "idempotency_key": self.idempotency_key,
            "provider_charge_id": self.provider_charge_id,
            "attempts": self.attempts,
            "description": self.description,
            "metadata": self.metadata,
            "failure_code": self.failure_code,
            "failure_message": self.failure_message,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


@dataclass(frozen=True)
class ProviderCharge:
    """The provider's answer to a charge that it accepted (succeeded or pending)."""

    id: str
    status: str
    amount_minor: int | None
    currency: str | None
    attempts: list = field(default_factory=list)


@dataclass
class ReconcileReport:
    """What one ``reconcile_payments`` run did."""

    examined: int = 0
    succeeded: int = 0
    failed: int = 0
    still_pending: int = 0
    errors: int = 0
    skipped: int = 0  # settled by someone else meanwhile

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- client


def _error_body(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


class PaymentClient:
    """Speaks the provider's JSON contract (DESIGN.md section 5) over the pooled session.

    This is the one place where provider responses and transport errors become
    ``PaymentError``s. Every POST carries an ``Idempotency-Key`` (created once, before
    the retry loop, unless the caller supplies one), so retrying a read timeout or a
    5xx can never charge twice.

    :param settings: defaults to the process settings.
    :param session: a ``requests.Session``; defaults to the process's pooled session.
    :param breaker: a circuit breaker; defaults to one built from the settings.
    :param clock, sleep, jitter: injectable time sources for tests.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        session: requests.Session | None = None,
        breaker=None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[float], float] = default_jitter,
    ):
        self.settings = settings or get_settings()
        self._session = session
        self.breaker = breaker if breaker is not None else build_breaker(self.settings)
        self._clock, self._sleep, self._jitter = clock, sleep, jitter
        self.bulkhead = Bulkhead(
            self.settings.payment_pool_maxsize, self.settings.payment_pool_timeout, clock=clock
        )
        self._charge_retry = build_retry(self.settings, idempotent=True)
        self._charges_url = f"{self.settings.payment_api_url}/v1/charges"
        self._auth = f"Bearer {self.settings.payment_api_key}"

    @property
    def session(self) -> requests.Session:
        return self._session if self._session is not None else get_session()

    def charge(
        self,
        amount,
        currency: str | None = None,
        *,
        idempotency_key: str | None = None,
        payment_method: str = "card",
        transaction_id: str | None = None,
        description: str | None = None,
        metadata: Mapping | None = None,
    ) -> ProviderCharge:
        """Charge ``amount`` (major units) once, whatever the retries.

        Returns the accepted charge (``succeeded`` or ``pending``); raises
        ``PaymentDeclined``, ``PaymentServiceUnavailable`` (certainly not charged),
        ``PaymentOutcomeUnknown`` (maybe charged) or ``PaymentProviderError``. The
        errors carry ``attempts``, the requests that went out.
        """
        currency = (currency or self.settings.payment_currency).upper()
        amount_minor = to_minor_units(amount, currency, self.settings.payment_max_amount)
        key = idempotency_key or new_idempotency_key()
        body = {
            "amount": amount_minor,
            "currency": currency,
            "payment_method": payment_method,
            "transaction_id": transaction_id or key,
            "description": description,
            "metadata": dict(metadata) if metadata else {},
        }
        self.breaker.before_call()
        slot = self.bulkhead.enter()
        if slot is None:
            raise self._pool_busy([])
        try:
            exchange = self._send(
                "POST",
                self._charges_url,
                retry=self._charge_retry,
                kind="charge",
                json=body,
                headers={"Authorization": self._auth, "Idempotency-Key": key},
            )
        finally:
            self.bulkhead.leave(slot)
        try:
            charge = self._charge_from(exchange, body)
        except (PaymentServiceUnavailable, PaymentOutcomeUnknown) as exc:
            if exc.code != "outbound_pool_busy":
                self.breaker.record_failure()
            raise
        except PaymentError:
            self.breaker.record_success()  # the provider answered: it is up
            raise
        self.breaker.record_success()
        return charge

    def check_available(self) -> None:
        """Raise ``PaymentServiceUnavailable`` now if a charge would be refused anyway.

        Lets ``process_payment`` fail fast without writing a row while the breaker is
        open (or its half-open trial is in flight) or every outbound connection is stuck;
        takes no trial slot and no connection.
        """
        refused = self.breaker.refusal()
        if refused is not None:
            raise refused
        if self.bulkhead.is_saturated():
            raise self._pool_busy([])

    def _pool_busy(self, attempts) -> PaymentServiceUnavailable:
        return PaymentServiceUnavailable(
            f"all {self.settings.payment_pool_maxsize} outbound provider connections are "
            f"busy (waited up to {self.settings.payment_pool_timeout}s)",
            code="outbound_pool_busy",
            retry_after=1.0,
            attempts=attempts,
        )

    def find_charges(self, idempotency_key: str) -> tuple[list[dict], list]:
        """The provider's charges for ``idempotency_key`` and the requests it took.

        An empty list means the provider never saw the key.
        """
        exchange = self._send(
            "GET",
            self._charges_url,
            retry=build_retry(self.settings, idempotent=True),
            kind="lookup",
            params={"idempotency_key": idempotency_key},
            headers={"Authorization": self._auth},
        )
        response = exchange.response
        if response is None or response.status_code >= 500 or response.status_code == 429:
            raise PaymentServiceUnavailable(
                f"provider lookup failed: {self._failure_text(exchange)}",
                attempts=exchange.attempts,
            )
        if response.status_code != 200:
            self._reject(response, exchange)
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError):
            raise PaymentServiceUnavailable(
                "provider lookup answered with an unreadable body", attempts=exchange.attempts
            ) from None
        return list(data), exchange.attempts

    # -- transport ---------------------------------------------------------------

    def _send(self, method: str, url: str, *, retry, kind: str, **kwargs) -> Exchange:
        settings = self.settings

        def on_attempt(attempt) -> None:
            metrics.observe_provider_attempt(kind, attempt)
            if attempt.timeout is not None:
                log.error(
                    TIMEOUT_MESSAGE,
                    round(attempt.timeout * 1000),
                    extra={"attempt": attempt.number, "timeout_kind": attempt.error_kind},
                )

        return send_with_retries(
            self.session,
            method,
            url,
            retry=retry,
            connect_timeout=settings.payment_connect_timeout,
            read_timeout=settings.payment_read_timeout,
            deadline=self._clock() + settings.payment_deadline,
            clock=self._clock,
            sleep=self._sleep,
            jitter=self._jitter,
            on_attempt=on_attempt,
            **kwargs,
        )

    # -- translation: the one place provider answers become errors ---------------

    def _charge_from(self, exchange: Exchange, sent: dict) -> ProviderCharge:
        response, attempts = exchange.response, exchange.attempts
        if response is None:
            raise self._transport_error(exchange)
        status = response.status_code
        if status in (200, 201):
            return self._parse_charge(response, exchange, sent)
        if status == 402:
            error = _error_body(response)
            raise PaymentDeclined(
                error.get("message") or "the card was declined",
                code=str(error.get("code") or "card_declined")[:64],
                attempts=attempts,
            )
        if status == 409 or (exchange.may_have_been_processed and status >= 429):
            raise PaymentOutcomeUnknown(
                f"provider answered {status} after a request that may have been processed; "
                "reconciliation will settle it",
                attempts=attempts,
            )
        if status == 429 or status >= 500:
            raise PaymentServiceUnavailable(
                f"provider unavailable: {self._failure_text(exchange)}",
                retry_after=exchange.retry_after or 1.0,
                attempts=attempts,
            )
        self._reject(response, exchange)

    def _parse_charge(
        self, response: requests.Response, exchange: Exchange, sent: dict
    ) -> ProviderCharge:
        try:
            if "json" not in response.headers.get("Content-Type", ""):
                raise ValueError(f"content type {response.headers.get('Content-Type')!r}")
            body = response.json()
            charge_id, status = str(body["id"]), body["status"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PaymentOutcomeUnknown(
                f"provider answered {response.status_code} with an unreadable charge "
                f"({type(exc).__name__}: {str(exc)[:80]}); reconciliation will settle it",
                code="provider_response_invalid",
                attempts=exchange.attempts,
            ) from None
        if status == "failed":
            raise PaymentDeclined(
                body.get("failure_message") or "the provider failed the charge",
                code=str(body.get("failure_code") or "charge_failed")[:64],
                attempts=exchange.attempts,
            )
        charged = (body.get("amount", sent["amount"]), body.get("currency", sent["currency"]))
        if charged != (sent["amount"], sent["currency"]):
            log.critical(
                "provider charged %s %s for a charge of %s %s",
                charged[0],
                charged[1],
                sent["amount"],
                sent["currency"],
                extra={"provider_charge_id": charge_id},
            )
            raise PaymentOutcomeUnknown(
                f"provider answered with charge {charge_id} for {charged[0]} {charged[1]}, "
                f"not the {sent['amount']} {sent['currency']} we sent; an operator must check it",
                code="provider_amount_mismatch",
                attempts=exchange.attempts,
            )
        if status not in ("succeeded", "pending"):
            raise PaymentOutcomeUnknown(
                f"provider answered with unexpected charge status {str(status)[:32]!r}",
                code="provider_response_invalid",
                attempts=exchange.attempts,
            )
        return ProviderCharge(
            id=charge_id,
            status=status,
            amount_minor=body.get("amount"),
            currency=body.get("currency"),
            attempts=exchange.attempts,
        )

    def _transport_error(self, exchange: Exchange) -> PaymentError:
        kind, attempts = exchange.error_kind, exchange.attempts
        if kind == POOL_BUSY:
            return self._pool_busy(attempts)
        if kind == TLS:
            log.critical("payment provider TLS verification failed: %s", exchange.error)
            return PaymentServiceUnavailable(
                "TLS handshake with the payment provider failed (check REQUESTS_CA_BUNDLE)",
                code="provider_tls_error",
                attempts=attempts,
            )
        if exchange.may_have_been_processed:
            return PaymentOutcomeUnknown(
                f"no answer from the provider after sending the charge "
                f"({self._failure_text(exchange)}); reconciliation will settle it",
                attempts=attempts,
            )
        return PaymentServiceUnavailable(
            f"payment provider unreachable: {self._failure_text(exchange)}",
            retry_after=min(5.0, self.settings.payment_breaker_reset),
            attempts=attempts,
        )

    def _reject(self, response: requests.Response, exchange: Exchange):
        status = response.status_code
        error = _error_body(response)
        if status in (401, 403):
            log.critical(
                "payment provider rejected our credentials (HTTP %d): check PAYMENT_API_KEY",
                status,
            )
        raise PaymentProviderError(
            f"provider rejected the request with HTTP {status}: "
            f"{str(error.get('message') or error.get('code') or 'no detail')[:200]}",
            code="provider_rejected_request",
            attempts=exchange.attempts,
        )

    @staticmethod
    def _failure_text(exchange: Exchange) -> str:
        last = exchange.attempts[-1] if exchange.attempts else None
        what = "no attempt was possible" if last is None else (last.error or f"HTTP {last.status}")
        reason = f", gave up: {exchange.gave_up}" if exchange.gave_up else ""
        return f"{what} after {len(exchange.attempts)} attempt(s){reason}"


# --------------------------------------------------------------------------- service


class PaymentService:
    """The lifecycle of DESIGN.md section 4 over a client and the store.

    :param settings: the configuration.
    :param client: the provider client (defaults to one over the pooled session).
    :param store_retries: how often to retry recording an outcome if the database
        blips after the provider already answered (the charge must not go unrecorded).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        client: PaymentClient | None = None,
        *,
        store_retries: int = 3,
    ):
        self.settings = settings or get_settings()
        self.client = client or PaymentClient(self.settings)
        self.store_retries = store_retries

    def process(self, request: PaymentRequest) -> PaymentResult:
        with bind_log_context(transaction_id=request.transaction_id):
            try:
                self.client.check_available()
            except PaymentServiceUnavailable as exc:
                # A known key is still replayed; a new one is refused before it is stored.
                if store.find_by_key(request.idempotency_key) is None:
                    metrics.observe_payment(exc.code)
                    raise
                return self._repeat(request)
            stored = store.insert_pending(
                payment_id=f"pay_{uuid.uuid4().hex[:24]}",
                idempotency_key=request.idempotency_key,
                transaction_id=request.transaction_id,
                fingerprint=request.fingerprint,
                amount_minor=request.amount_minor,
                currency=request.currency,
                payment_method=request.payment_method,
                description=request.description,
                metadata=request.metadata,
            )
            if stored is None:
                return self._repeat(request)
            return self._charge(stored, request)

    def _repeat(self, request: PaymentRequest) -> PaymentResult:
        """A second call with a known key: replay, re-submit, or report the conflict."""
        stored = store.find_by_key(request.idempotency_key)
        with bind_log_context(payment_id=stored.id):
            if stored.request_fingerprint != request.fingerprint:
                raise IdempotencyKeyReused(
                    "this idempotency key was already used for a different payment request",
                    payment=PaymentResult.from_stored(stored),
                )
            if stored.status == PENDING:
                raise PaymentInProgress(
                    "a payment with this idempotency key is still in progress",
                    payment=PaymentResult.from_stored(stored),
                )
            resubmit = stored.status == UNKNOWN or (
                stored.status == FAILED and stored.failure_code in RESUBMITTABLE_FAILURES
            )
            if not resubmit:
                result = PaymentResult.from_stored(stored, replayed=True)
                if stored.status == FAILED:
                    raise PaymentDeclined(
                        stored.failure_message or "the payment failed",
                        code=stored.failure_code or "card_declined",
                        payment=result,
                    )
                metrics.observe_payment("replayed")
                return result
            check_transition(stored.status, PENDING)
            claimed = store.transition(
                stored.id, from_status=stored.status, to_status=PENDING, reason="resubmitted"
            )
            if claimed is None:
                raise PaymentInProgress(
                    "another call is re-submitting this payment",
                    payment=PaymentResult.from_stored(stored),
                )
            log.info("re-submitting %s payment under the same idempotency key", stored.status)
            return self._charge(claimed, request)

    def _charge(self, stored: store.StoredPayment, request: PaymentRequest) -> PaymentResult:
        with bind_log_context(payment_id=stored.id):
            try:
                charge = self.client.charge(
                    to_major_units(request.amount_minor, request.currency),
                    request.currency,
                    idempotency_key=request.idempotency_key,
                    payment_method=request.payment_method,
                    transaction_id=request.transaction_id,
                    description=request.description,
                    metadata=request.metadata,
                )
            except PaymentOutcomeUnknown as exc:
                log.error(
                    "payment outcome unknown (%s): %s",
                    exc.code,
                    exc.message,
                    extra={"attempts": len(exc.attempts)},
                )
                return self._failed(stored, exc, UNKNOWN, "outcome_unknown")
            except PaymentDeclined as exc:
                log.info("payment declined by the provider (%s)", exc.code)
                return self._failed(stored, exc, FAILED, exc.code)
            except (PaymentServiceUnavailable, PaymentProviderError) as exc:
                log.warning("payment not charged (%s): %s", exc.code, exc.message)
                return self._failed(stored, exc, FAILED, exc.code)
            except BaseException as exc:
                # A bug or an interrupt after the request may have gone out: the payment
                # must not stay silently pending; reconciliation asks the provider.
                self._store_outcome(
                    stored,
                    UNKNOWN,
                    reason="unexpected_error",
                    failure_code="internal_error",
                    failure_message=type(exc).__name__,
                )
                raise
            status = SUCCEEDED if charge.status == "succeeded" else PENDING
            if status == PENDING:
                metrics.observe_payment("pending")
                store.record_attempts(stored.id, charge.attempts, "charge")
                return PaymentResult.from_stored(store.find_by_id(stored.id) or stored)
            final = self._store_outcome(
                stored,
                SUCCEEDED,
                reason="charged",
                attempts=charge.attempts,
                provider_charge_id=charge.id,
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

    def _failed(self, stored, exc: PaymentError, status: str, outcome: str) -> PaymentResult:
        """Record a failed or unknown outcome and raise ``exc`` with the payment attached.

        If a reconciler settled the payment as ``succeeded`` meanwhile, that is the truth
        and it is returned instead.
        """
        final = self._store_outcome(
            stored,
            status,
            reason=exc.code,
            attempts=exc.attempts,
            failure_code=exc.code if status == FAILED else None,
            failure_message=exc.message[:1000] if status == FAILED else None,
        )
        exc.payment = PaymentResult.from_stored(final)
        if final.status == SUCCEEDED:
            metrics.observe_payment("succeeded")
            return exc.payment
        metrics.observe_payment("declined" if isinstance(exc, PaymentDeclined) else outcome)
        raise exc

    def _store_outcome(self, stored, status: str, *, reason: str, **fields) -> store.StoredPayment:
        """Write step 3. A database blip here must not lose a charge that happened."""
        check_transition(PENDING, status)
        delay = 0.1
        for attempt in range(self.store_retries + 1):
            try:
                final = store.transition(
                    stored.id, from_status=PENDING, to_status=status, reason=reason, **fields
                )
                return final or self._lost_race(stored, status, fields)
            except DatabaseUnavailable as exc:
                if attempt == self.store_retries:
                    log.error(
                        "could not record the provider's answer (%s -> %s); the payment stays "
                        "pending until reconcile_payments settles it",
                        stored.status,
                        status,
                        extra={"provider_charge_id": fields.get("provider_charge_id")},
                    )
                    raise PaymentOutcomeUnknown(
                        "the provider answered but the outcome could not be stored; "
                        "reconciliation will settle it",
                        code="outcome_not_stored",
                        payment=PaymentResult.from_stored(stored),
                    ) from exc
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _lost_race(self, stored, status: str, fields: dict) -> store.StoredPayment:
        """Someone settled the payment while we were charging it: keep the provider's truth.

        The one case that must be corrected is a reconciler that found no charge for the
        key (``not_received``) while ours was still in flight and then succeeded.
        """
        current = store.find_by_id(stored.id)
        if status == SUCCEEDED and (current.status, current.failure_code) == (
            FAILED,
            "not_received",
        ):
            log.error(
                "payment was reconciled as not received while its charge was in flight; "
                "the provider charged it: recording it as succeeded",
                extra={"provider_charge_id": fields.get("provider_charge_id")},
            )
            check_transition(FAILED, SUCCEEDED)
            corrected = store.transition(
                stored.id,
                from_status=FAILED,
                to_status=SUCCEEDED,
                reason="charge_landed_after_reconciliation",
                only_if_failure_code="not_received",
                provider_charge_id=fields.get("provider_charge_id"),
            )
            return corrected or store.find_by_id(stored.id)
        if current.status != status:
            log.warning(
                "payment was settled as %s while this call found %s", current.status, status
            )
        return current

    # -- reconciliation ------------------------------------------------------------

    def reconcile(
        self, older_than_seconds: float = 60, *, batch_size: int = 100
    ) -> ReconcileReport:
        report = ReconcileReport()
        lease = max(60.0, self.settings.payment_deadline * 2)
        # A pending payment younger than this may still have its charge in flight: the
        # provider cannot list an unfinished charge, so asking now would say "not received".
        in_flight = self.settings.payment_deadline + self.settings.db_pool_timeout + 1
        while True:
            batch = store.claim_for_reconciliation(
                older_than_seconds, max(older_than_seconds, in_flight), lease, batch_size
            )
            if not batch:
                return report
            for stored in batch:
                report.examined += 1
                with bind_log_context(payment_id=stored.id, transaction_id=stored.transaction_id):
                    self._reconcile_one(stored, report)

    def _reconcile_one(self, stored: store.StoredPayment, report: ReconcileReport) -> None:
        try:
            charges, attempts = self.client.find_charges(stored.idempotency_key)
        except PaymentError as exc:
            report.errors += 1
            log.warning("reconciliation lookup failed: %s", exc.message)
            store.record_attempts(stored.id, exc.attempts, "lookup")
            return
        settled = next((c for c in charges if c.get("status") == "succeeded"), None)
        failed = next((c for c in charges if c.get("status") == "failed"), None)
        if settled is not None:
            to, code, message, charge_id = SUCCEEDED, None, None, settled.get("id")
        elif not charges:
            to, code, message, charge_id = FAILED, "not_received", "provider never saw it", None
        elif failed is not None and len(charges) == 1:
            to, charge_id = FAILED, failed.get("id")
            code = failed.get("failure_code") or "charge_failed"
            message = failed.get("failure_message")
        else:
            report.still_pending += 1
            store.record_attempts(stored.id, attempts, "lookup")
            return
        check_transition(stored.status, to)
        final = store.transition(
            stored.id,
            from_status=stored.status,
            to_status=to,
            reason="reconciled",
            attempts=attempts,
            attempt_kind="lookup",
            provider_charge_id=charge_id,
            failure_code=code,
            failure_message=message,
        )
        if final is None:
            report.skipped += 1
            return
        report.succeeded += to == SUCCEEDED
        report.failed += to == FAILED
        log.info("reconciled payment: %s -> %s", stored.status, to)


# --------------------------------------------------------------------------- module API

_service_lock = threading.Lock()
_service: PaymentService | None = None


def get_payment_service() -> PaymentService:
    """The process's service (client, session, breaker), built on first use."""
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


def reconcile_payments(older_than_seconds: float = 60) -> ReconcileReport:
    """Settle ``pending``/``unknown`` payments older than the threshold with the provider.

    A ``pending`` payment is left alone until its charge cannot be in flight any more
    (``PAYMENT_DEADLINE`` + ``DB_POOL_TIMEOUT`` + 1 s), whatever the threshold. Safe to
    run from cron on several hosts at once: payments are leased with ``SKIP LOCKED`` and
    every settlement is conditional on the status it read.
    """
    if older_than_seconds < 0:
        raise InvalidPaymentRequest("older_than_seconds must not be negative")
    return get_payment_service().reconcile(older_than_seconds)
