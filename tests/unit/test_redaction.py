"""What the redactor removes from log records, and what it must leave alone."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from redaction import (
    REDACTED,
    RedactingFilter,
    Redactor,
    is_sensitive_key,
    luhn_valid,
    mask_card_numbers,
)

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


# Between the digit groups of a card number: each of these, alone or in a short run.
SEPARATORS = {
    "space": " ",
    "dash": "-",
    "percent-encoded space": "%20",
    "plus": "+",
    "dot": ".",
    "no-break space": "\u00a0",
    "underscore": "_",
    "two spaces": "  ",
    "three spaces": "   ",
    "padded dash": " - ",
    "percent-encoded dash": "%2D",
    "percent-encoded dash, lower case": "%2d",
    "percent-encoded dot": "%2E",
    "percent-encoded underscore": "%5F",
    "percent-encoded plus": "%2B",
    "percent-encoded no-break space (UTF-8)": "%C2%A0",
    "percent-encoded no-break space (Latin-1)": "%A0",
    "two percent-encoded spaces": "%20%20",
    "two no-break spaces": "\u00a0\u00a0",
}


@pytest.mark.parametrize("separator", SEPARATORS.values(), ids=SEPARATORS.keys())
@pytest.mark.parametrize("groups", [("4111", "1111", "1111", "1111"), ("3782", "822463", "10005")])
def test_card_number_is_redacted_whatever_separates_its_groups(redactor, separator, groups):
    text = f"card {separator.join(groups)} declined"
    assert redactor.text(text) == f"card {REDACTED} declined"
    assert mask_card_numbers(text) == f"card {REDACTED} declined"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "GET /v1/payments/4111%201111%201111%201111 HTTP/1.1",
            f"GET /v1/payments/{REDACTED} HTTP/1.1",
        ),
        (
            "GET /v1/payments/4111+1111+1111+1111 HTTP/1.1",
            f"GET /v1/payments/{REDACTED} HTTP/1.1",
        ),
        (
            "GET /v1/payments?q=card+4111+1111+1111+1111&order=1234567812345678 HTTP/1.1",
            f"GET /v1/payments?q=card+{REDACTED}&order=1234567812345678 HTTP/1.1",
        ),
        (
            "GET /v1/payments?q=card%204111%2D1111%2D1111%2D1111&page=2 HTTP/1.1",
            f"GET /v1/payments?q=card%20{REDACTED}&page=2 HTTP/1.1",
        ),
        (  # the whole access line: its "+0000" and the rest are kept as they are
            '127.0.0.1 - - [15/Jan/2024:12:00:05 +0000] "GET /v1/payments/4111%201111%20'
            '1111%201111 HTTP/1.1" 404 73 "-" "python-requests/2.31.0" 12ms request_id=r-1',
            f'127.0.0.1 - - [15/Jan/2024:12:00:05 +0000] "GET /v1/payments/{REDACTED}'
            ' HTTP/1.1" 404 73 "-" "python-requests/2.31.0" 12ms request_id=r-1',
        ),
    ],
)
def test_card_number_in_a_url_encoded_request_line_is_redacted(redactor, line, expected):
    assert redactor.text(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "GET /v1/payments/%34%31%31%31%31%31%31%31%31%31%31%31%31%31%31%31 HTTP/1.1",
        "GET /v1/payments/4111%25201111%25201111%25201111 HTTP/1.1",  # encoded twice
    ],
)
def test_card_number_visible_only_once_decoded_is_logged_decoded_and_redacted(redactor, line):
    assert redactor.text(line) == f"GET /v1/payments/{REDACTED} HTTP/1.1"


@pytest.mark.parametrize(
    "text",
    [
        "at 1705320005.123458",  # epoch seconds with microseconds; its digits pass Luhn
        "batch_20240115_104_00042",  # an id of parts; its digits pass Luhn
        "refunds 1008.00 2500.00 3500.00",  # amounts; their digits pass Luhn
        "order 1234567812345678",  # 16 digits failing Luhn
        "on 2024-01-15T12:00:05.123456+00:00",
        "on 2024-01-15 12:00:05.123456",
        "[15/Jan/2024:12:00:05 +0000]",
        "from 192.168.100.0 via 10.0.0.1",
        "python-requests/2.31.0 took 350.25 ms",
        "call +44 20 7946 0958 or +1 555 0100",
        "id 123e4567-e89b-12d3-a456-426614174000",
        "payment pay_00000000000000000000002a for 12.50 USD",
        "GET /v1/payments/pay_123?expand=a+b&limit=100%25 HTTP/1.1",
    ],
)
def test_ids_timestamps_and_amounts_are_not_taken_for_card_numbers(redactor, text):
    assert redactor.text(text) == text
    assert mask_card_numbers(text) == text


def test_mask_card_numbers_replaces_every_card_and_nothing_else():
    text = "For Anna: 4111 1111 1111 1111, then 5555.5555.5555.4444 (cvv=123, a+b%20c)"
    assert mask_card_numbers(text) == f"For Anna: {REDACTED}, then {REDACTED} (cvv=123, a+b%20c)"


@pytest.mark.parametrize("text", ["", "Gift", "Birthday gift for Anna", "Order 12 of 3, ref A-17"])
def test_mask_card_numbers_returns_text_without_a_card_number_untouched(text):
    assert mask_card_numbers(text) is text


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
