"""Amounts become exact integer minor units, or a clear InvalidPaymentRequest."""

from decimal import Decimal

import pytest

from errors import InvalidPaymentRequest
from money import to_major_units, to_minor_units


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        (25.99, "USD", 2599),
        ("25.99", "USD", 2599),
        (Decimal("25.99"), "USD", 2599),
        (25, "USD", 2500),
        (19.99, "USD", 1999),
        (0.07, "usd", 7),
        (1234567.89, "USD", 123456789),
        (500, "JPY", 500),
        ("500", "JPY", 500),
        ("1.234", "KWD", 1234),
        ("1.5", "KWD", 1500),
        (" 10.50 ", "EUR", 1050),
        ("1e2", "USD", 10000),
    ],
)
def test_amount_converts_exactly(amount, currency, minor):
    assert to_minor_units(amount, currency, max_amount=1_000_000_000) == minor


@pytest.mark.parametrize(
    "amount",
    [
        0,
        -1,
        "0",
        "-0.01",
        "abc",
        "",
        "  ",
        float("nan"),
        "NaN",
        float("inf"),
        "-Infinity",
        "1.001",
        None,
        True,
        False,
        [1],
        {"a": 1},
        b"10",
        "1,000",
        "9" * 100,
        "1_000",
        "\u0661\u0662\u0663",  # Arabic-Indic digits: Decimal would read 123
        "1E-999999999",  # would underflow to 0 minor units
        Decimal("1E-999999999"),
        Decimal("1." + "0" * 80 + "1"),  # would round to 1.00
        "0x10",
    ],
)
def test_bad_usd_amount_is_refused(amount):
    with pytest.raises(InvalidPaymentRequest) as info:
        to_minor_units(amount, "USD", max_amount=1_000_000)
    assert isinstance(info.value, ValueError)
    assert "amount" in str(info.value)


def test_float_arithmetic_noise_is_refused_not_rounded():
    with pytest.raises(InvalidPaymentRequest, match="decimal places"):
        to_minor_units(0.1 + 0.2, "USD")  # 0.30000000000000004


def test_fractional_yen_is_refused():
    with pytest.raises(InvalidPaymentRequest, match="decimal places for JPY"):
        to_minor_units("1.5", "JPY")


def test_amount_above_maximum_is_refused():
    with pytest.raises(InvalidPaymentRequest, match="exceeds the maximum") as info:
        to_minor_units("1000000.01", "USD", max_amount=1_000_000)
    assert info.value.code == "amount_too_large"
    assert to_minor_units("1000000", "USD", max_amount=1_000_000) == 100_000_000


def test_unknown_currency_is_refused():
    with pytest.raises(InvalidPaymentRequest, match="unsupported currency"):
        to_minor_units(1, "XYZ")


@pytest.mark.parametrize(
    ("minor", "currency", "major"),
    [
        (2599, "USD", Decimal("25.99")),
        (500, "JPY", Decimal("500")),
        (1234, "KWD", Decimal("1.234")),
    ],
)
def test_minor_units_convert_back_exactly(minor, currency, major):
    assert to_major_units(minor, currency) == major
