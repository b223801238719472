"""The lifecycle assembled for unit tests: real service and client, fake provider, store, time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from circuit_breaker import CircuitBreaker
from payment_client import PaymentClient
from payment_handler import PaymentService
from payment_request import build_request
from settings import Settings
from tests.support.clock import FakeClock
from tests.support.memory_store import MemoryPaymentStore
from tests.support.scripted_provider import ScriptedProvider

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Lifecycle:
    service: PaymentService
    provider: ScriptedProvider
    store: MemoryPaymentStore
    breaker: CircuitBreaker
    clock: FakeClock

    def pay(self, amount="10.00", key="order-1", **fields):
        """``process_payment`` through this service."""
        request = build_request(
            amount, transaction_id=key, settings=self.service.settings, **fields
        )
        return self.service.process(request)

    def stored(self, key="order-1"):
        return self.store.find_by_key(key)

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
    service = PaymentService(settings, client=client, store=store, now=now, sleep=clock.sleep)
    return Lifecycle(service, provider, store, breaker, clock)
