"""The policy around every provider call, written once for every provider.

``PaymentClient`` runs an operation of the provider adapter (``providers/``) under:

- the circuit breaker (fail fast while the provider is down) and the bulkhead (refuse at
  once when every outbound connection is stuck);
- the pooled session of ``connection_pool``, retrying with the same ``Idempotency-Key``,
  per-attempt ``(connect, read)`` timeouts and one ``PAYMENT_DEADLINE`` for the whole
  operation;
- the audit of every attempt (returned with the result or attached to the error), its
  metrics, and the incident's alarm text for every timeout;
- the money rule: once any attempt may have reached the provider, only a definitive
  answer (a charge, or a decline) settles the payment; anything else is
  ``PaymentOutcomeUnknown``, never "certainly not charged".

The adapter translates the provider's answers; transport failures (no answer at all)
are translated here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import requests

import metrics
from circuit_breaker import build_breaker
from connection_pool import (
    POOL_BUSY,
    TLS,
    Attempt,
    Bulkhead,
    Exchange,
    build_retry,
    default_jitter,
    get_session,
    send_with_retries,
)
from errors import (
    PaymentError,
    PaymentOutcomeUnknown,
    PaymentProviderError,
    PaymentServiceUnavailable,
)
from payment_states import FailureCode
from providers import load_provider
from providers.base import (
    Answer,
    ChargeLookup,
    ChargeRequest,
    InvalidProviderData,
    PaymentProvider,
    ProviderCharge,
    ProviderRefund,
    RefundLookup,
    RefundRequest,
)
from settings import Settings, get_settings

log = logging.getLogger(__name__)

TIMEOUT_MESSAGE = "Payment service connection failed - timeout after %dms"
#: Operation kinds, as the audit rows and metrics name them.
CHARGE, LOOKUP, REFUND = "charge", "lookup", "refund"

T = TypeVar("T")


@dataclass(frozen=True)
class Reply(Generic[T]):
    """What an operation returned, and every request it took to get it."""

    value: T
    attempts: list[Attempt]


@dataclass
class _Operation:
    """One operation's :class:`providers.base.Transport`: its deadline and its attempts."""

    client: PaymentClient
    kind: str
    deadline: float
    attempts: list[Attempt] = field(default_factory=list)
    #: Attempts of requests that can move money (anything but a GET).
    moving: list[Attempt] = field(default_factory=list)

    @property
    def may_have_been_processed(self) -> bool:
        """A request that can move money was sent without an answer: assume the provider
        processed it. A read (a GET) that got no answer moved nothing."""
        return any(a.may_have_been_processed for a in self.moving)

    def send(
        self,
        method: str,
        path: str,
        *,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: Any = None,
        params: Mapping[str, str] | None = None,
        retry_hint: Callable[[requests.Response], bool | None] | None = None,
    ) -> Answer:
        client = self.client
        all_headers = dict(headers or {})
        if idempotency_key is not None:
            all_headers["Idempotency-Key"] = idempotency_key
        idempotent = method == "GET" or idempotency_key is not None
        exchange = send_with_retries(
            client.session,
            method,
            client.settings.payment_api_url + path,
            retry=client.retry_idempotent if idempotent else client.retry_once,
            connect_timeout=client.settings.payment_connect_timeout,
            read_timeout=client.settings.payment_read_timeout,
            deadline=self.deadline,
            clock=client.clock,
            sleep=client.sleep,
            jitter=client.jitter,
            on_attempt=self._observe,
            retry_hint=retry_hint,
            headers=all_headers,
            json=json,
            data=data,
            params=params,
        )
        self.attempts.extend(exchange.attempts)
        if method != "GET":
            self.moving.extend(exchange.attempts)
        if exchange.response is None:
            raise self._no_answer(exchange, moves_money=method != "GET")
        return Answer(exchange.response, exchange.retry_after, _summary(exchange))

    def _observe(self, attempt: Attempt) -> None:
        metrics.observe_provider_attempt(self.kind, attempt)
        if attempt.timeout is not None:
            log.error(
                TIMEOUT_MESSAGE,
                round(attempt.timeout * 1000),
                extra={"attempt": attempt.number, "timeout_kind": attempt.error_kind},
            )

    def _no_answer(self, exchange: Exchange, *, moves_money: bool) -> PaymentError:
        """A request that got no answer: whether it may have arrived decides everything."""
        if exchange.error_kind == POOL_BUSY:
            return self.client.pool_busy()
        if exchange.error_kind == TLS:
            log.critical("payment provider TLS verification failed: %s", exchange.error)
            return PaymentServiceUnavailable(
                "TLS handshake with the payment provider failed (check REQUESTS_CA_BUNDLE)",
                code=FailureCode.PROVIDER_TLS_ERROR,
            )
        if moves_money and exchange.may_have_been_processed:
            return PaymentOutcomeUnknown(
                f"no answer from the provider after sending the {self.kind} "
                f"({_summary(exchange)}); reconciliation will settle it"
            )
        return PaymentServiceUnavailable(
            f"payment provider unreachable: {_summary(exchange)}",
            retry_after=min(5.0, self.client.settings.payment_breaker_reset),
        )


def _summary(exchange: Exchange) -> str:
    last = exchange.attempts[-1] if exchange.attempts else None
    what = "no attempt was possible" if last is None else (last.error or f"HTTP {last.status}")
    reason = f", gave up: {exchange.gave_up}" if exchange.gave_up else ""
    return f"{what} after {len(exchange.attempts)} attempt(s){reason}"


class PaymentClient:
    """Runs provider operations under the shared policy; the provider adapter does the rest.

    :param settings: defaults to the process settings.
    :param provider: the adapter; defaults to the one ``PAYMENT_PROVIDER`` names.
    :param session: a ``requests.Session``; defaults to the process's pooled session.
    :param breaker: a circuit breaker; defaults to one built from the settings.
    :param clock, sleep, jitter: time sources, injectable for tests.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        provider: PaymentProvider | None = None,
        session: requests.Session | None = None,
        breaker=None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[float], float] = default_jitter,
    ):
        self.settings = settings or get_settings()
        self.provider = provider if provider is not None else load_provider(self.settings)
        self._session = session
        self.breaker = breaker if breaker is not None else build_breaker(self.settings)
        self.clock, self.sleep, self.jitter = clock, sleep, jitter
        self.bulkhead = Bulkhead(
            self.settings.payment_pool_maxsize, self.settings.payment_pool_timeout, clock=clock
        )
        self.retry_idempotent = build_retry(self.settings, idempotent=True)
        self.retry_once = build_retry(self.settings, idempotent=False)

    @property
    def session(self) -> requests.Session:
        return self._session if self._session is not None else get_session()

    def charge(self, request: ChargeRequest) -> Reply[ProviderCharge]:
        """Charge once under ``request.idempotency_key``, whatever the retries.

        Returns the charge (``succeeded`` or ``pending``). Raises ``PaymentDeclined``,
        ``PaymentServiceUnavailable`` (certainly not charged), ``PaymentOutcomeUnknown``
        (maybe charged) or ``PaymentProviderError``; errors carry ``attempts``.
        """
        reply = self._run(CHARGE, lambda t: self.provider.charge(t, request), moves_money=True)
        _check_amount(CHARGE, reply, request.amount_minor, request.currency)
        return reply

    def find_charges(self, lookup: ChargeLookup) -> Reply[list[ProviderCharge]]:
        """The provider's charges for a payment; an empty list: it never saw the key."""
        return self._run(LOOKUP, lambda t: self.provider.find_charges(t, lookup))

    def refund(self, request: RefundRequest) -> Reply[ProviderRefund]:
        """Refund once under ``request.idempotency_key``, whatever the retries.

        Returns the refund (``succeeded`` or ``pending``). Raises ``RefundNotAllowed`` or
        ``PaymentDeclined`` (certainly not refunded), ``PaymentServiceUnavailable``,
        ``PaymentOutcomeUnknown`` (maybe refunded) or ``PaymentProviderError``.
        """
        reply = self._run(REFUND, lambda t: self.provider.refund(t, request), moves_money=True)
        _check_amount(REFUND, reply, request.amount_minor, request.currency)
        return reply

    def find_refunds(self, lookup: RefundLookup) -> Reply[list[ProviderRefund]]:
        """The provider's refunds under a refund's key; an empty list: it never saw it."""
        return self._run(LOOKUP, lambda t: self.provider.find_refunds(t, lookup))

    def refusal(self) -> PaymentServiceUnavailable | None:
        """The error an operation would fail with right now, without trying one.

        The breaker is open (or its half-open trial is out), or every outbound connection
        is stuck: lets callers refuse before writing anything. Takes no trial slot.
        """
        refused = self.breaker.refusal()
        if refused is None and self.bulkhead.is_saturated():
            refused = self.pool_busy()
        return refused

    def pool_busy(self) -> PaymentServiceUnavailable:
        return PaymentServiceUnavailable(
            f"all {self.settings.payment_pool_maxsize} outbound provider connections are "
            f"busy (waited up to {self.settings.payment_pool_timeout}s)",
            code=FailureCode.OUTBOUND_POOL_BUSY,
            retry_after=1.0,
        )

    def _run(
        self, kind: str, operation: Callable[[_Operation], T], *, moves_money: bool = False
    ) -> Reply[T]:
        slot = self.bulkhead.enter()
        if slot is None:
            raise self.pool_busy()
        transport = _Operation(self, kind, self.clock() + self.settings.payment_deadline)
        try:
            self.breaker.before_call()
            try:
                value = operation(transport)
            except InvalidProviderData as exc:  # an adapter let one through: still unreadable
                raise PaymentOutcomeUnknown(
                    f"provider answered with an unreadable {kind} ({exc})",
                    code="provider_response_invalid",
                ) from exc
        except PaymentError as exc:
            error = _unsettled(exc, transport) if moves_money else exc
            error.attempts = list(transport.attempts)
            self._count(error)
            if error is exc:
                raise
            raise error from exc
        finally:
            self.bulkhead.leave(slot)
        self.breaker.record_success()
        return Reply(value, transport.attempts)

    def _count(self, error: PaymentError) -> None:
        """Tell the breaker: an unanswered or failing provider counts; an answer does not."""
        if error.code in (FailureCode.BREAKER_OPEN, FailureCode.OUTBOUND_POOL_BUSY):
            return
        if isinstance(error, PaymentServiceUnavailable | PaymentOutcomeUnknown):
            self.breaker.record_failure()
        else:
            self.breaker.record_success()  # the provider answered: it is up


def _check_amount(
    kind: str, reply: Reply[ProviderCharge] | Reply[ProviderRefund], amount: int, currency: str
) -> None:
    """Refuse an answer for another amount than we asked: money moved, but not as asked."""
    moved = (reply.value.amount_minor, reply.value.currency)
    if moved[0] is None or moved == (amount, currency):
        return
    log.critical(
        "provider made a %s of %s %s for a %s of %s %s",
        kind,
        moved[0],
        moved[1],
        kind,
        amount,
        currency,
        extra={f"provider_{kind}_id": reply.value.id},
    )
    raise PaymentOutcomeUnknown(
        f"provider answered with {kind} {reply.value.id} for {moved[0]} {moved[1]}, not the "
        f"{amount} {currency} we sent; an operator must check it",
        code="provider_amount_mismatch",
        attempts=reply.attempts,
    )


def _unsettled(exc: PaymentError, transport: _Operation) -> PaymentError:
    """``exc`` unless it claims "not charged" after a request that may have arrived.

    A decline is the provider's definitive answer for the key; unavailable, pool busy,
    TLS errors and refused requests after such an attempt prove nothing about it.
    """
    if not transport.may_have_been_processed or not isinstance(
        exc, PaymentServiceUnavailable | PaymentProviderError
    ):
        return exc
    sent = next(a for a in transport.moving if a.may_have_been_processed)
    return PaymentOutcomeUnknown(
        f"attempt {sent.number} may have reached the provider ({sent.error}), and the "
        f"answer that followed does not settle it ({exc.code}: {exc.message}); "
        "reconciliation will settle it"
    )
