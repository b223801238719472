"""What the redactor removes from log records, and what it must leave alone."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from redaction import REDACTED, RedactingFilter, Redactor, is_sensitive_key, luhn_valid

PROVIDER_KEY = "sk_live_provider_0123456789"
INBOUND_KEY = "inbound-key-abcdefghijklmnop"


@pytest.fixture
def redactor() -> Redactor:
    return Redactor([PROVIDER_KEY, INBOUND_KEY, ""])


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("4242424242424242", True),
        ("4111111111111111", True),
        ("5555555555554444", True),
        ("378282246310005", True),  # 15-digit Amex
        ("1234567812345678", False),
        ("4242424242424241", False),
    ],
)
def test_luhn_check(digits, valid):
    assert luhn_valid(digits) is valid


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card 4242 4242 4242 4242 declined", f"card {REDACTED} declined"),
        ("card 4111-1111-1111-1111", f"card {REDACTED}"),
        ("pan5555555555554444x", f"pan{REDACTED}x"),
        ("amex 378282246310005", f"amex {REDACTED}"),
        ("qty 2 4242 4242 4242 4242", f"qty {REDACTED}"),  # a card after another number
        ("order 1234567812345678 shipped", "order 1234567812345678 shipped"),
        ("id 42424242424242424242424", "id 42424242424242424242424"),  # 23 digits: no card
        ("on 2024-01-15 at 12:00:05", "on 2024-01-15 at 12:00:05"),
        (
            "Payment service connection failed - timeout after 5000ms",
            "Payment service connection failed - timeout after 5000ms",
        ),
        (
            "Database query failed: connection pool exhausted",
            "Database query failed: connection pool exhausted",
        ),
        ("Authorization: Bearer abc.def-ghi", f"Authorization: {REDACTED}"),
        ("authorization=Basic dXNlcjpwYXNz", f"authorization={REDACTED}"),
        ("{'Authorization': 'Bearer xyz'}", f"{{'Authorization': '{REDACTED}'}}"),
        ("sent bearer tok_123/abc==", f"sent Bearer {REDACTED}"),
        ("cvv=123&amount=5", f"cvv={REDACTED}&amount=5"),
        ('{"cvc": "999", "ok": 1}', f'{{"cvc": "{REDACTED}", "ok": 1}}'),
        ("security_code: 1234", f"security_code: {REDACTED}"),
        ("card_number=4242 4242 4242 4242", f"card_number={REDACTED}"),
        ("x-api-key: whatever", f"x-api-key: {REDACTED}"),
        (f"using {PROVIDER_KEY} now", f"using {REDACTED} now"),
        (f"key={INBOUND_KEY}", f"key={REDACTED}"),
        ("Japan: 5, span=3", "Japan: 5, span=3"),
    ],
)
def test_text(redactor, text, expected):
    assert redactor.text(text) == expected


@pytest.mark.parametrize(
    "key",
    ["cvv", "CVV2", "cvc", "card_number", "cardNumber", "pan", "securityCode", "card_cvv"],
)
def test_sensitive_keys(key):
    assert is_sensitive_key(key)


@pytest.mark.parametrize("key", ["amount", "company", "payment_id", "span", 7])
def test_ordinary_keys(key):
    assert not is_sensitive_key(key)


def test_value_redacts_nested_containers(redactor):
    value = {
        "card": {"number": "4242424242424242", "cvv": 123, "exp": "12/30"},
        "items": [{"pan": "x"}, 5555555555554444, "order 1234567812345678"],
        "headers": ("Authorization: Bearer t0k",),
        "amount": 12.5,
    }
    assert redactor.value(value) == {
        "card": {"number": REDACTED, "cvv": REDACTED, "exp": "12/30"},
        "items": [{"pan": REDACTED}, REDACTED, "order 1234567812345678"],
        "headers": (f"Authorization: {REDACTED}",),
        "amount": 12.5,
    }


def test_value_stringifies_other_objects(redactor):
    class Card:
        def __str__(self):
            return "Card(4242424242424242)"

    assert redactor.value(Card()) == f"Card({REDACTED})"


def _record(msg, args=(), exc_info=None, **extra) -> logging.LogRecord:
    record = logging.getLogger("payments.child").makeRecord(
        "payments.child", logging.ERROR, __file__, 1, msg, args, exc_info, extra=extra
    )
    return record


def test_record_message_args_extra_and_exception(redactor):
    try:
        raise ValueError(f"card 4111 1111 1111 1111 rejected with {PROVIDER_KEY}")
    except ValueError:
        exc_info = sys.exc_info()
    record = _record(
        "charge %s failed for %r",
        ("4242424242424242", {"cvv": "321", "order": "1234567812345678"}),
        exc_info,
        payload={"card_number": "5555555555554444", "note": f"Bearer {INBOUND_KEY}"},
    )
    RedactingFilter(redactor).filter(record)

    assert record.getMessage() == (
        f"charge {REDACTED} failed for {{'cvv': '{REDACTED}', 'order': '1234567812345678'}}"
    )
    assert record.payload == {"card_number": REDACTED, "note": f"Bearer {REDACTED}"}
    assert record.exc_type == "ValueError"
    assert record.exc_message == f"card {REDACTED} rejected with {REDACTED}"
    assert "4111" not in record.exc_text and PROVIDER_KEY not in record.exc_text
    assert record.exc_text.endswith(f"ValueError: card {REDACTED} rejected with {REDACTED}")


def test_record_with_unformattable_args_keeps_no_raw_argument(redactor):
    record = _record("%d items", ("4242424242424242",))
    RedactingFilter(redactor).filter(record)
    assert "4242" not in record.getMessage()
    assert record.getMessage().startswith("%d items")


def test_record_is_redacted_once(redactor):
    record = _record("card %s", ("4242424242424242",))
    RedactingFilter(redactor).filter(record)
    record.msg = "changed after redaction"
    RedactingFilter(redactor).filter(record)
    assert record.getMessage() == "changed after redaction"


def test_typical_record_is_redacted_quickly(redactor):
    """It runs on every record: 10,000 ordinary ones take well under a second."""
    records = [
        _record(
            "payment %s for %s captured after %d ms",
            (f"pay_{i:024x}", "12.50 USD", 350),
            request_id=f"req-{i}",
            payment_id=f"pay_{i}",
        )
        for i in range(10_000)
    ]
    redacting = RedactingFilter(redactor)
    started = time.perf_counter()
    for record in records:
        redacting.filter(record)
    assert time.perf_counter() - started < 1.0
