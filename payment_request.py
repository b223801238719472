"""A call of ``process_payment`` checked and normalised before anything is stored or sent.

Every field is validated here, so the store and the provider only ever see a request
that can be taken: an exact amount in minor units, a known currency, keys that fit an
HTTP header, text a PostgreSQL column can hold, and bounded JSON metadata.

``description`` and ``metadata`` are free text that is stored, sent to the provider and
returned to the caller: a card number typed into them would end up in all three, so
card-like numbers are masked here, before any of that (:func:`redaction.mask_card_numbers`).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from errors import InvalidPaymentRequest
from money import to_minor_units
from redaction import mask_card_numbers
from settings import Settings, get_settings

#: Our payment and refund ids: a prefix and 24 hex digits. Anything else cannot exist,
#: and is answered without asking the store.
PAYMENT_ID = re.compile(r"pay_[0-9a-f]{24}")
REFUND_ID = re.compile(r"ref_[0-9a-f]{24}")
MAX_METADATA_BYTES = 8192
MAX_KEY_LENGTH = 255


def new_idempotency_key(prefix: str = "pay") -> str:
    return f"{prefix}-{uuid.uuid4()}"


@dataclass(frozen=True)
class PaymentRequest:
    """A validated payment request: everything checked before anything is stored or sent."""

    amount_minor: int
    currency: str
    payment_method: str
    transaction_id: str
    idempotency_key: str
    description: str | None
    metadata: dict | None

    @property
    def fingerprint(self) -> str:
        """What makes two calls with one key the same payment (amount, currency, body).

        Taken over the masked text, so it holds no card number and a replay still matches.
        """
        return _fingerprint(
            self.amount_minor,
            self.currency,
            self.payment_method,
            self.transaction_id,
            self.description,
            self.metadata,
        )


def _fingerprint(*fields) -> str:
    canonical = json.dumps(list(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_text(name: str, value, max_length: int, *, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidPaymentRequest(f"{name} must be a non-empty string", code=f"invalid_{name}")
    if len(value) > max_length:
        raise InvalidPaymentRequest(
            f"{name} must be at most {max_length} characters", code=f"invalid_{name}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPaymentRequest(
            f"{name} is not valid text (lone surrogate)", code=f"invalid_{name}"
        ) from None
    if "\x00" in value:  # PostgreSQL text cannot hold NUL
        raise InvalidPaymentRequest(f"{name} must not contain NUL", code=f"invalid_{name}")
    return value


def _mask_text(value: str | None) -> str | None:
    return None if value is None else mask_card_numbers(value)


def _check_key(name: str, value) -> str:
    _check_text(name, value, MAX_KEY_LENGTH, required=True)
    if not value.isascii() or not value.isprintable():
        raise InvalidPaymentRequest(
            f"{name} must be printable ASCII (it is sent as an HTTP header)",
            code=f"invalid_{name}",
        )
    return value


def _check_metadata(metadata) -> dict | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidPaymentRequest("metadata must be an object", code="invalid_metadata")
    try:
        encoded = json.dumps(dict(metadata), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidPaymentRequest(
            f"metadata must be JSON-serialisable ({exc})", code="invalid_metadata"
        ) from None
    masked = _mask_cards(json.loads(encoded))
    if len(json.dumps(masked, sort_keys=True).encode()) > MAX_METADATA_BYTES:
        raise InvalidPaymentRequest(
            f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON", code="invalid_metadata"
        )
    return masked


def _mask_cards(value):
    """``value`` (plain JSON) with card-like numbers masked in every key, string and number.

    A number that holds a card number becomes the masked string: JSON has no masked int.
    """
    if isinstance(value, dict):
        items = {mask_card_numbers(key): _mask_cards(item) for key, item in value.items()}
        if len(items) < len(value):  # keys that differed only by their card numbers
            raise InvalidPaymentRequest(
                "metadata keys collide once card numbers are masked", code="invalid_metadata"
            )
        return items
    if isinstance(value, list):
        return [_mask_cards(item) for item in value]
    if isinstance(value, str):
        return mask_card_numbers(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        text = repr(value)
        masked = mask_card_numbers(text)
        return value if masked == text else masked
    return value


def build_request(
    amount,
    payment_method="card",
    transaction_id=None,
    *,
    currency=None,
    description=None,
    metadata=None,
    idempotency_key=None,
    settings: Settings | None = None,
) -> PaymentRequest:
    """Validate a call of ``process_payment``; ``InvalidPaymentRequest`` names what is wrong."""
    settings = settings or get_settings()
    currency = currency if currency is not None else settings.payment_currency
    if not isinstance(currency, str):
        raise InvalidPaymentRequest("currency must be a string", code="invalid_currency")
    if not currency.isascii():  # only ASCII letters fold: "uſd".upper() is "USD"
        raise InvalidPaymentRequest(
            f"unsupported currency: {currency[:16]!r}", code="invalid_currency"
        )
    currency = currency.upper()  # any letter case; nothing around the code
    amount_minor = to_minor_units(amount, currency, max_usd=settings.payment_max_amount)
    _check_text("payment_method", payment_method, 64, required=True)
    if transaction_id is not None:
        _check_key("transaction_id", transaction_id)
    if idempotency_key is not None:
        _check_key("idempotency_key", idempotency_key)
    key = idempotency_key or transaction_id or new_idempotency_key()
    return PaymentRequest(
        amount_minor=amount_minor,
        currency=currency,
        payment_method=payment_method,
        transaction_id=transaction_id or key,
        idempotency_key=key,
        description=_mask_text(_check_text("description", description, 1000, required=False)),
        metadata=_check_metadata(metadata),
    )


@dataclass(frozen=True)
class CheckedRefund:
    """A validated call of ``refund_payment``; ``amount_minor`` ``None``: what is left."""

    payment_id: str
    amount_minor: int | None
    idempotency_key: str
    reason: str | None
    metadata: dict | None

    @property
    def fingerprint(self) -> str:
        """What makes two calls with one key the same refund."""
        return _fingerprint(self.payment_id, self.amount_minor, self.reason, self.metadata)


def build_refund(
    payment_id: str,
    currency: str,
    amount=None,
    *,
    idempotency_key=None,
    reason=None,
    metadata=None,
    settings: Settings | None = None,
) -> CheckedRefund:
    """Validate a call of ``refund_payment`` for a payment in ``currency``."""
    settings = settings or get_settings()
    amount_minor = (
        None
        if amount is None
        else to_minor_units(amount, currency, max_usd=settings.payment_max_amount)
    )
    if idempotency_key is not None:
        _check_key("idempotency_key", idempotency_key)
    return CheckedRefund(
        payment_id=payment_id,
        amount_minor=amount_minor,
        idempotency_key=idempotency_key or new_idempotency_key("refund"),
        reason=_mask_text(_check_text("reason", reason, 500, required=False)),
        metadata=_check_metadata(metadata),
    )
