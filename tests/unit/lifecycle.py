"""The lifecycle assembled for unit tests: real service and client, fake provider, store, time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from circuit_breaker import CircuitBreaker
from payment_client import PaymentClient
from payment_handler import PaymentService
from payment_request import build_refund, build_request
from settings import Settings
from tests.support.clock import FakeClock
from tests.support.memory_store import MemoryPaymentStore, MemoryRefundStore
from tests.support.scripted_provider import ScriptedProvider

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Lifecycle:
    service: PaymentService
    provider: ScriptedProvider
    store: MemoryPaymentStore
    breaker: CircuitBreaker
    clock: FakeClock
    refund_store: MemoryRefundStore

    def pay(self, amount="10.00", key="order-1", **fields):
        """``process_payment`` through this service."""
        request = build_request(
            amount, transaction_id=key, settings=self.service.settings, **fields
        )
        return self.service.process(request)

    def stored(self, key="order-1"):
        return self.store.find_by_key(key)

    def refund(self, payment_id, amount=None, key="refund-1", **fields):
        """``refund_payment`` through this service."""
        payment = self.store.find_by_id(payment_id)
        request = build_refund(
            payment_id,
            payment.currency,
            amount,
            idempotency_key=key,
            settings=self.service.settings,
            **fields,
        )
        return self.service.refunds.refund(request, payment)

    def stored_refund(self, key="refund-1"):
        return self.refund_store.find_refund_by_key(key)

    def open_breaker(self) -> None:
        while self.breaker.state == "closed":
            self.breaker.record_failure()


def build_lifecycle(settings: Settings, clock: FakeClock, *steps: str) -> Lifecycle:
    provider = ScriptedProvider(*steps)
    breaker = CircuitBreaker(
        settings.payment_breaker_failures, settings.payment_breaker_reset, clock=clock
    )
    client = PaymentClient(
        settings, provider=provider, breaker=breaker, clock=clock, sleep=clock.sleep
    )

    def now() -> datetime:
        return EPOCH + timedelta(seconds=clock.now)

    store = MemoryPaymentStore(clock=now)
    refund_store = MemoryRefundStore(store)
    service = PaymentService(
        settings,
        client=client,
        store=store,
        refund_store=refund_store,
        now=now,
        sleep=clock.sleep,
    )
    return Lifecycle(service, provider, store, breaker, clock, refund_store)
