"""A payment request is checked and its free text cleared of card numbers before use."""

import json

import pytest

from errors import InvalidPaymentRequest
from payment_request import build_request
from settings import Settings

VISA = "4111111111111111"
MASTERCARD = "5555555555554444"


def build(**fields):
    return build_request("10.00", "card", "tx-1", settings=Settings(), **fields)


def test_card_number_in_description_is_masked():
    request = build(description=f"card {VISA[:4]} {VISA[4:8]} {VISA[8:12]} {VISA[12:]} thanks")
    assert request.description == "card [REDACTED] thanks"


def test_card_numbers_in_nested_metadata_are_masked_in_keys_and_values():
    request = build(
        metadata={
            "order": {"notes": [f"pan {MASTERCARD}", "no card here"], VISA: "a key"},
            "card": int(VISA),
        }
    )
    assert request.metadata == {
        "order": {"notes": ["pan [REDACTED]", "no card here"], "[REDACTED]": "a key"},
        "card": "[REDACTED]",
    }
    stored = json.dumps(request.metadata)
    assert VISA not in stored and MASTERCARD not in stored


def test_ids_that_are_not_card_numbers_survive():
    metadata = {
        "order_id": "ord_1234567812345678",  # 16 digits, not Luhn-valid
        "customer": 1234567812345678,
        "invoice": "INV-2024-000123",
        "amount_cents": 1999,
        "ratio": 0.25,
        "flags": [True, None],
    }
    request = build(description="order 1234567812345678", metadata=metadata)
    assert request.description == "order 1234567812345678"
    assert request.metadata == metadata


def test_identical_calls_have_the_same_fingerprint():
    first = build(description=f"card {VISA}", metadata={"pan": MASTERCARD})
    second = build(description=f"card {VISA}", metadata={"pan": MASTERCARD})
    assert first.fingerprint == second.fingerprint


def test_fingerprint_is_taken_over_the_masked_text():
    typed = build(description=f"card {VISA}", metadata={"note": MASTERCARD})
    masked = build(description="card [REDACTED]", metadata={"note": "[REDACTED]"})
    assert typed.fingerprint == masked.fingerprint


def test_metadata_keys_that_differ_only_by_card_numbers_are_refused():
    with pytest.raises(InvalidPaymentRequest, match="collide") as info:
        build(metadata={VISA: "a", MASTERCARD: "b"})
    assert info.value.code == "invalid_metadata"
    assert VISA not in str(info.value)


@pytest.mark.parametrize("currency", ["usd", "Usd", "USD"])
def test_a_currency_code_is_taken_in_any_letter_case(currency):
    assert build(currency=currency).currency == "USD"


@pytest.mark.parametrize("currency", [" USD", "usd\n", "\fUSD ", "uſd", "ＵＳＤ"])
def test_a_currency_code_with_text_around_it_or_non_ascii_letters_is_refused(currency):
    with pytest.raises(InvalidPaymentRequest) as refused:
        build(currency=currency)
    assert refused.value.code == "invalid_currency"
