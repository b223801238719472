"""The provider boundary: what a provider adapter is given, and what it must hand back.

An adapter (``providers/sandbox.py``, ...) builds its provider's requests, sends them
through the :class:`Transport` it is given, and translates the answers into the neutral
types below or into ``errors.PaymentError``s. It never retries, sleeps, times out,
counts attempts or opens a breaker: ``payment_client`` does that once for every
provider. Provider data is checked and bounded here, in the types' constructors, so
whatever a provider sends, the store only ever sees values it can hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

import requests

#: Longest provider id we store (``payments.provider_charge_id``).
MAX_ID_LENGTH = 255
#: Longest provider failure code and message we keep (``failure_code``, ``failure_message``).
MAX_CODE_LENGTH = 64
MAX_MESSAGE_LENGTH = 1000


class InvalidProviderData(ValueError):
    """The provider answered with something that is not a valid charge (or list of them)."""


class ChargeStatus(StrEnum):
    """A provider's charge in neutral terms."""

    SUCCEEDED = "succeeded"  # the money moved
    PENDING = "pending"  # accepted; the provider settles it later
    FAILED = "failed"  # refused or failed: no money moved


@dataclass(frozen=True)
class ChargeRequest:
    """One payment to charge, in integer minor units; ``idempotency_key`` goes on every
    request that may move money, identical on every retry."""

    payment_id: str
    idempotency_key: str
    amount_minor: int
    currency: str
    payment_method: str
    transaction_id: str
    description: str | None
    metadata: Mapping[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class ChargeLookup:
    """What we know of a payment when asking the provider for its charges."""

    payment_id: str
    idempotency_key: str
    provider_charge_id: str | None
    created_at: datetime


class RefundStatus(StrEnum):
    """A provider's refund in neutral terms."""

    SUCCEEDED = "succeeded"  # the money went back
    PENDING = "pending"  # accepted; the provider settles it later
    FAILED = "failed"  # refused, canceled or reversed: no money went back


@dataclass(frozen=True)
class RefundRequest:
    """One refund of a charge, in integer minor units, under its own idempotency key.

    ``reason`` is the caller's text; an adapter maps it onto what its provider accepts.
    """

    refund_id: str
    payment_id: str
    idempotency_key: str
    provider_charge_id: str
    amount_minor: int
    currency: str
    reason: str | None
    metadata: Mapping[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class RefundLookup:
    """What we know of a refund when asking the provider for it."""

    refund_id: str
    payment_id: str
    idempotency_key: str
    provider_charge_id: str
    provider_refund_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class ProviderCharge:
    """A charge as the provider reports it, checked and bounded on construction.

    ``amount_minor``/``currency`` are ``None`` when the provider did not say (the caller
    then cannot compare them with what it asked for). Raises :class:`InvalidProviderData`
    for an id or status that cannot be right; over-long codes and messages are cut.
    """

    id: str
    status: ChargeStatus
    amount_minor: int | None = None
    currency: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None

    def __post_init__(self) -> None:
        _check_id("charge", self.id)
        try:
            status = ChargeStatus(self.status)
        except ValueError:
            raise InvalidProviderData(
                f"unexpected charge status {str(self.status)[:32]!r}"
            ) from None
        object.__setattr__(self, "amount_minor", _minor_units("charge", self.amount_minor))
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "currency", _currency("charge", self.currency))
        object.__setattr__(self, "failure_code", _bounded(self.failure_code, MAX_CODE_LENGTH))
        object.__setattr__(
            self, "failure_message", _bounded(self.failure_message, MAX_MESSAGE_LENGTH)
        )


@dataclass(frozen=True)
class ProviderRefund:
    """A refund as the provider reports it, checked and bounded like :class:`ProviderCharge`."""

    id: str
    status: RefundStatus
    amount_minor: int | None = None
    currency: str | None = None
    charge_id: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None

    def __post_init__(self) -> None:
        _check_id("refund", self.id)
        if self.charge_id is not None:
            _check_id("charge", self.charge_id)
        try:
            status = RefundStatus(self.status)
        except ValueError:
            raise InvalidProviderData(
                f"unexpected refund status {str(self.status)[:32]!r}"
            ) from None
        object.__setattr__(self, "amount_minor", _minor_units("refund", self.amount_minor))
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "currency", _currency("refund", self.currency))
        object.__setattr__(self, "failure_code", _bounded(self.failure_code, MAX_CODE_LENGTH))
        object.__setattr__(
            self, "failure_message", _bounded(self.failure_message, MAX_MESSAGE_LENGTH)
        )


def _check_id(what: str, value: object) -> None:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_ID_LENGTH
        or not value.isascii()
        or not value.isprintable()
    ):
        raise InvalidProviderData(f"{what} id {str(value)[:40]!r} is not a provider id")


def _minor_units(what: str, amount: object) -> int | None:
    """``amount`` as whole minor units; JSON's ``5.0`` is the integer 5, ``5.5`` is not."""
    if isinstance(amount, float) and amount.is_integer():
        amount = int(amount)
    if amount is not None and (
        isinstance(amount, bool) or not isinstance(amount, int) or amount < 0
    ):
        raise InvalidProviderData(f"{what} amount {str(amount)[:32]!r} is not minor units")
    return amount


def _currency(what: str, currency: object) -> str | None:
    if currency is None:
        return None
    if (
        not isinstance(currency, str)
        or len(currency) != 3
        or not (currency.isascii() and currency.isalpha())
    ):
        raise InvalidProviderData(f"{what} currency {str(currency)[:8]!r} is not ISO 4217")
    return currency.upper()


def _bounded(text: object, limit: int) -> str | None:
    """Provider text cut to ``limit`` printable characters; anything but text is dropped."""
    if not isinstance(text, str):
        return None
    cleaned = "".join(c if c.isprintable() else " " for c in text[:limit]).strip()
    return cleaned or None


class InvalidEvent(ValueError):
    """A webhook delivery we cannot accept: missing, bad or stale signature, or a body
    that is not an event. The message names the cause, never the secret or the body."""


@dataclass(frozen=True)
class ProviderEvent:
    """A verified provider event in neutral terms.

    ``charge`` or ``refund`` is the object the event reports, as the provider saw it at
    ``created``; both ``None`` for a type we do not apply (stored and counted only).
    ``lookup`` means the event only signals a change: ask the provider rather than trust
    the payload. ``idempotency_key`` is our key for that object, as the provider echoes
    it; a refund's ``charge_id`` is the id we store as the payment's
    ``provider_charge_id``.
    """

    id: str
    type: str
    created: datetime
    charge: ProviderCharge | None = None
    refund: ProviderRefund | None = None
    idempotency_key: str | None = None
    lookup: bool = False

    def __post_init__(self) -> None:
        _check_id("event", self.id)
        object.__setattr__(self, "type", _bounded(self.type, MAX_CODE_LENGTH) or "unknown")
        if self.idempotency_key is not None:
            _check_id("idempotency key", self.idempotency_key)


@dataclass(frozen=True)
class Answer:
    """The provider's final answer to one request, after the transport's retries."""

    response: requests.Response
    #: The provider's ``Retry-After`` in seconds, when it sent one.
    retry_after: float | None
    #: What happened, for error messages: ``"HTTP 503 after 3 attempt(s), gave up: exhausted"``.
    summary: str


class Transport(Protocol):
    """Sends one request to the provider under the shared policy (``payment_client``).

    Retries (same ``Idempotency-Key`` every time), per-attempt timeouts, the deadline of
    the whole operation, the audit of every attempt and the incident's log text are
    applied here. A request that got no answer raises ``PaymentServiceUnavailable``
    (certainly not received) or ``PaymentOutcomeUnknown`` (may have been received).
    ``retry_hint`` is the provider's advice on an answer: ``True`` retry it (within the
    retries and the deadline), ``False`` never, ``None`` decide by its status.
    """

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
    ) -> Answer: ...


class PaymentProvider(Protocol):
    """One provider's wire format (DESIGN.md section 5)."""

    name: str

    def check_charge(self, request: ChargeRequest) -> None:
        """Refuse a payment this provider can never take (``InvalidPaymentRequest``:
        a payment method, amount or metadata outside its rules), before anything is
        stored or sent."""
        ...

    def charge(self, transport: Transport, request: ChargeRequest) -> ProviderCharge:
        """Charge once under ``request.idempotency_key``; the charge if ``succeeded`` or
        ``pending``. Raises ``PaymentDeclined``, ``PaymentServiceUnavailable``,
        ``PaymentOutcomeUnknown`` or ``PaymentProviderError``."""
        ...

    def find_charges(self, transport: Transport, lookup: ChargeLookup) -> list[ProviderCharge]:
        """Every charge the provider holds for the payment; empty only when the provider
        certainly never saw it (the lookup is strongly consistent)."""
        ...

    def refund(self, transport: Transport, request: RefundRequest) -> ProviderRefund:
        """Refund once under ``request.idempotency_key``; the refund if ``succeeded`` or
        ``pending``. A refund the provider refused or failed raises ``RefundNotAllowed``
        (it has less left to refund) or ``PaymentDeclined``; otherwise as :meth:`charge`."""
        ...

    def find_refunds(self, transport: Transport, lookup: RefundLookup) -> list[ProviderRefund]:
        """Every refund the provider holds under the refund's key; empty only when it
        certainly never saw it."""
        ...

    def parse_event(
        self, payload: bytes, headers: Mapping[str, str], secret: str, now: datetime
    ) -> ProviderEvent:
        """Verify a webhook delivery's signature (5 minutes of tolerance either way) and
        only then read its body. Raises :class:`InvalidEvent`."""
        ...
