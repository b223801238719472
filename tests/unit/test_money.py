"""Amounts become exact integer minor units, or a clear InvalidPaymentRequest."""

from decimal import Decimal

import pytest

from errors import InvalidPaymentRequest
from money import CURRENCIES, max_minor_units, to_major_units, to_minor_units


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
        ("10.50", "EUR", 1050),
        ("007.50", "EUR", 750),
        (Decimal("1E+2"), "USD", 10000),  # a JSON number with an exponent, exact
        (Decimal("2.5E-1"), "USD", 25),
    ],
)
def test_amount_converts_exactly(amount, currency, minor):
    assert to_minor_units(amount, currency, max_usd=1_000_000_000) == minor


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
        to_minor_units(amount, "USD", max_usd=1_000_000)
    assert isinstance(info.value, ValueError)
    assert "amount" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "1e2",
        "1E2",
        "86\f \n",
        " 10.50 ",
        "10.50\n",
        "\u00a010",
        "10\u2003",
        "+5",
        "5.",
        ".5",
        "-.5",
        "1.2.3",
        "5 00",
        "\uff15",  # fullwidth digit five
    ],
)
def test_amount_text_must_be_plain_decimal_text(text):
    with pytest.raises(InvalidPaymentRequest, match="decimal number like") as info:
        to_minor_units(text, "USD", max_usd=1_000_000)
    assert info.value.code == "invalid_amount"


@pytest.mark.parametrize("text", ["-5", "-0.01", "-0", "0.00"])
def test_negative_or_zero_text_says_it_must_be_positive(text):
    with pytest.raises(InvalidPaymentRequest, match="greater than zero"):
        to_minor_units(text, "USD")


def test_float_arithmetic_noise_is_refused_not_rounded():
    with pytest.raises(InvalidPaymentRequest, match="decimal places"):
        to_minor_units(0.1 + 0.2, "USD")  # 0.30000000000000004


def test_fractional_yen_is_refused():
    with pytest.raises(InvalidPaymentRequest, match="decimal places for JPY"):
        to_minor_units("1.5", "JPY")


def test_amount_above_maximum_is_refused():
    with pytest.raises(InvalidPaymentRequest, match="exceeds the maximum") as info:
        to_minor_units("1000000.01", "USD", max_usd=1_000_000)
    assert info.value.code == "amount_too_large"
    assert to_minor_units("1000000", "USD", max_usd=1_000_000) == 100_000_000


def test_maximum_of_a_strong_currency_is_its_dollar_equivalent():
    with pytest.raises(InvalidPaymentRequest, match="exceeds the maximum") as info:
        to_minor_units("1000000", "KWD", max_usd=1_000_000)  # about 3.2 million dollars
    message = str(info.value)
    assert "310000.000 KWD" in message and "PAYMENT_MAX_AMOUNT" in message
    assert info.value.code == "amount_too_large"
    assert to_minor_units("310000", "KWD", max_usd=1_000_000) == 310_000_000


def test_maximum_of_a_weak_currency_is_its_dollar_equivalent():
    assert to_minor_units("40000000", "VND", max_usd=1_000_000) == 40_000_000  # about $1,500
    assert to_minor_units("26000000000", "VND", max_usd=1_000_000) == 26_000_000_000
    with pytest.raises(InvalidPaymentRequest, match="26000000000 VND"):
        to_minor_units("26000000001", "VND", max_usd=1_000_000)


@pytest.mark.parametrize("code", sorted(CURRENCIES))
def test_every_currency_caps_near_the_dollar_ceiling(code):
    exponent, per_usd = CURRENCIES[code]
    assert 0.1 < per_usd < 100_000
    ceiling = to_major_units(max_minor_units(code, 1_000_000), code)
    assert ceiling == 1_000_000 * per_usd  # the rates are round enough to be exact
    assert to_minor_units(ceiling, code, max_usd=1_000_000) == ceiling.scaleb(exponent)


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
