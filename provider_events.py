"""Provider events (DESIGN.md section 11): verified, stored once, applied safely in any order.

:class:`WebhookReceiver` checks the signature before the body is read (the provider
adapter's ``parse_event``), stores the event (a redelivery changes nothing), hands it to
a background thread and returns: a burst of events holds a request thread only for the
store's write. :class:`EventApplier` then applies it, making only moves the lifecycle
allows:

- an event that settles a ``pending``/``unknown`` payment (refund) as succeeded is
  applied as it says: the provider moved the money;
- any other disagreement (a failure, a payment settled otherwise, a reversal, or an
  event that only says "something changed") is settled by asking the provider, as
  reconciliation does, never by trusting the payload. So a late, duplicated or replayed
  event can never move a payment backwards or count a refund twice.

Every event ends with a result (:class:`EventResult`), stored with it and counted.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from enum import StrEnum

import metrics
from database_config import utcnow
from errors import PaymentError
from event_store import SqlEventStore, StoredEvent
from payment_handler import PaymentService, charge_lookup
from payment_states import PaymentStatus, RefundState, may_refund_transition, may_transition
from payment_store import LOOKUP, Change
from providers.base import (
    ChargeStatus,
    InvalidEvent,
    ProviderEvent,
    RefundStatus,
)
from reconciliation import charge_verdict, refund_verdict
from refund_store import LOOKUP as REFUND_LOOKUP
from refund_store import RefundChange
from refunds import refund_lookup

log = logging.getLogger(__name__)

#: Events waiting for one worker's applier thread; beyond that they wait, stored and
#: unapplied, for the next reconciliation run, never for a request thread.
QUEUE_SIZE = 1000
#: An event still unapplied this long after it was stored was lost by a crash.
UNAPPLIED_AFTER = timedelta(seconds=60)
SETTLING = (PaymentStatus.PENDING, PaymentStatus.UNKNOWN)
REFUND_SETTLING = (RefundState.PENDING, RefundState.UNKNOWN)


class EventResult(StrEnum):
    """What became of one event (stored in ``provider_events.result`` and counted)."""

    APPLIED = "applied"  # it moved a payment or a refund
    DUPLICATE = "duplicate"  # a redelivery of an event already stored
    STALE = "stale"  # the payment (refund) already is where the provider says it is
    UNKNOWN = "unknown"  # about a payment (refund) we do not know
    IGNORED = "ignored"  # a type we do not apply
    BAD_SIGNATURE = "bad_signature"  # refused before anything was stored


class EventApplier:
    """Applies verified events to the payments and refunds of ``service``."""

    def __init__(self, service: PaymentService):
        self.service = service

    def apply(self, event: ProviderEvent) -> EventResult:
        if event.charge is not None:
            return self._apply_charge(event)
        if event.refund is not None:
            return self._apply_refund(event)
        return EventResult.IGNORED

    def _apply_charge(self, event: ProviderEvent) -> EventResult:
        service, charge = self.service, event.charge
        assert charge is not None
        payment = service.store.find_by_key(event.idempotency_key or "")
        if payment is None:
            return EventResult.UNKNOWN
        if not event.lookup:
            if charge.status is ChargeStatus.PENDING or payment.status.value == charge.status:
                return EventResult.STALE
            if charge.status is ChargeStatus.SUCCEEDED and payment.status in SETTLING:
                change = Change(PaymentStatus.SUCCEEDED, event.type, provider_charge_id=charge.id)
                return _result(service.move(payment, change))
        # Anything else is the provider's to say, as in reconciliation.
        reply = service.client.find_charges(charge_lookup(payment))
        verdict = charge_verdict(reply.value) if reply.value else None  # none: not yet listed
        if verdict is None or not may_transition(
            payment.status, verdict.to_status, payment.failure_code
        ):
            service.store.record_attempts(payment.id, reply.attempts, LOOKUP)
            if verdict is not None and verdict.to_status != payment.status:
                log.error(
                    "the provider says this payment is %s but it is %s here, which the "
                    "lifecycle cannot change: an operator must check it",
                    verdict.to_status,
                    payment.status,
                    extra={"payment_id": payment.id},
                )
            return EventResult.STALE
        change = Change(
            verdict.to_status,
            event.type,
            attempts=reply.attempts,
            attempt_kind=LOOKUP,
            provider_charge_id=verdict.provider_charge_id,
            failure_code=verdict.failure_code,
            failure_message=verdict.failure_message,
        )
        return _result(service.move(payment, change))

    def _apply_refund(self, event: ProviderEvent) -> EventResult:
        refunds, reported = self.service.refunds, event.refund
        assert reported is not None
        refund = refunds.store.find_refund(event.idempotency_key or "")  # refunds.provider_key
        if refund is None:
            return EventResult.UNKNOWN
        if not event.lookup:
            if reported.status is RefundStatus.PENDING or refund.status.value == reported.status:
                return EventResult.STALE
            if reported.status is RefundStatus.SUCCEEDED and refund.status in REFUND_SETTLING:
                change = RefundChange(
                    RefundState.SUCCEEDED, event.type, provider_refund_id=reported.id
                )
                return _result(refunds.move(refund, change))
        reply = refunds.client.find_refunds(refund_lookup(refund, refunds.charge_of(refund)))
        verdict = refund_verdict(reply.value) if reply.value else None
        if verdict is None or not may_refund_transition(
            refund.status, verdict.to_status, refund.failure_code
        ):
            refunds.store.record_refund_attempts(refund.id, reply.attempts, REFUND_LOOKUP)
            return EventResult.STALE
        if refund.status == RefundState.SUCCEEDED:
            log.warning("the provider reversed a refund", extra={"refund_id": refund.id})
        change = RefundChange(
            verdict.to_status,
            event.type,
            attempts=reply.attempts,
            attempt_kind=REFUND_LOOKUP,
            provider_refund_id=verdict.provider_refund_id,
            failure_code=verdict.failure_code,
            failure_message=verdict.failure_message,
        )
        return _result(refunds.move(refund, change))

    def apply_stored(self, events: SqlEventStore, stored: StoredEvent) -> EventResult | None:
        """Apply one stored event and record its result; ``None`` when it cannot be
        applied now (provider or database unavailable): it waits for the next run."""
        try:
            result = self.apply(stored.event)
        except PaymentError as exc:
            log.warning("event %s not applied yet (%s): %s", stored.event.id, exc.code, exc.message)
            return None
        except Exception:
            log.exception("event %s could not be applied; the next run retries it", stored.event.id)
            return None
        events.mark(stored.row_id, result)
        metrics.observe_event(stored.provider, stored.event.type, result)
        return result

    def apply_unapplied(self, events: SqlEventStore, now: datetime) -> int:
        """Apply the events a crash left stored but unapplied; how many it applied."""
        applied = [self.apply_stored(events, s) for s in events.unapplied(now - UNAPPLIED_AFTER)]
        return sum(result is not None for result in applied)


def _result(moved) -> EventResult:
    """A conditional move that lost a race changed nothing: someone settled it first."""
    return EventResult.APPLIED if moved is not None else EventResult.STALE


class EventDispatcher:
    """One daemon thread per worker process that applies stored events in order.

    ``submit`` never blocks: with the queue full, the event stays stored and unapplied
    for the next reconciliation run.
    """

    def __init__(self, apply: Callable[[StoredEvent], object], size: int = QUEUE_SIZE):
        self._apply = apply
        self._queue: queue.Queue[StoredEvent] = queue.Queue(size)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, stored: StoredEvent) -> bool:
        self._start()
        try:
            self._queue.put_nowait(stored)
        except queue.Full:
            log.warning("event queue full; event %s waits for reconciliation", stored.event.id)
            return False
        return True

    def join(self) -> None:
        """Wait until every submitted event was applied (tests, shutdown)."""
        self._queue.join()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="provider-events", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            stored = self._queue.get()
            try:
                self._apply(stored)
            except Exception:  # apply_stored logs; nothing may kill this thread
                log.exception("applying event %s failed", stored.event.id)
            finally:
                self._queue.task_done()


class WebhookReceiver:
    """``POST /v1/webhooks/<provider>``: verify, store once, hand over, answer.

    :param service: the payment service (its provider adapter, stores and client).
    :param events: where events are kept.
    :param dispatcher: applies stored events; default: a background thread.
    :param now: wall-clock time (aware UTC) to judge the signature's timestamp.
    """

    def __init__(
        self,
        service: PaymentService,
        *,
        events: SqlEventStore | None = None,
        dispatcher: EventDispatcher | None = None,
        now: Callable[[], datetime] = utcnow,
    ):
        self.service = service
        self.events = events if events is not None else SqlEventStore()
        self.applier = EventApplier(service)
        self.dispatcher = dispatcher or EventDispatcher(
            lambda stored: self.applier.apply_stored(self.events, stored)
        )
        self._now = now

    def receive(
        self, provider: str, payload: bytes, headers: Mapping[str, str]
    ) -> EventResult | None:
        """Verify and store one delivery; ``DUPLICATE`` for a redelivery, else ``None``
        (accepted, applied in the background). Raises ``InvalidEvent`` (nothing stored)."""
        settings = self.service.settings
        if settings.payment_webhook_secret is None:
            raise InvalidEvent("PAYMENT_WEBHOOK_SECRET is not set: events cannot be verified")
        adapter = self.service.client.provider
        try:
            event = adapter.parse_event(
                payload, headers, settings.payment_webhook_secret, self._now()
            )
        except InvalidEvent:
            metrics.observe_event(provider, "unverified", EventResult.BAD_SIGNATURE)
            raise
        row_id = self.events.record(provider, event)
        if row_id is None:
            metrics.observe_event(provider, event.type, EventResult.DUPLICATE)
            return EventResult.DUPLICATE
        self.dispatcher.submit(StoredEvent(row_id, provider, event))
        return None


_receiver_lock = threading.Lock()
_receiver: WebhookReceiver | None = None


def get_webhook_receiver(service: PaymentService) -> WebhookReceiver:
    """The process's receiver over ``service``, built on first use (after fork, anew)."""
    global _receiver
    with _receiver_lock:
        if _receiver is None or _receiver.service is not service:
            _receiver = WebhookReceiver(service)
        return _receiver


def _forget_receiver() -> None:
    global _receiver, _receiver_lock
    _receiver, _receiver_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_receiver)
