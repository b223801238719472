"""Exact conversion of caller amounts (major units) to integer minor units.

Callers pass ``int``, ``Decimal``, ``str`` or ``float``. A float is converted through its
shortest repr (``25.99`` means 25.99, not 25.98999999999999843...), so the amount a
person typed is the amount charged. Anything that is not exactly representable in the
currency's minor unit is refused rather than rounded: rounding money silently is how
customers get charged the wrong amount.
"""

from __future__ import annotations

import re
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, DecimalException, Inexact, Rounded

from errors import InvalidPaymentRequest

#: ISO 4217 minor-unit exponents. Currencies not listed are refused.
CURRENCY_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(
        "USD EUR GBP CAD AUD NZD CHF SEK NOK DKK PLN CZK HUF RON MXN BRL ZAR SGD HKD "
        "INR CNY ILS TRY THB PHP MYR AED SAR".split(),
        2,
    ),
    **dict.fromkeys("JPY KRW VND CLP ISK UGX XAF XOF".split(), 0),
    **dict.fromkeys("KWD BHD OMR JOD TND LYD IQD".split(), 3),
}


#: A plain decimal number: ASCII digits only (``Decimal`` alone would also take Arabic-Indic
#: digits, ``1_000``, ``NaN`` and ``Infinity``).
_DECIMAL_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
#: Arithmetic that refuses to round: any rounding raises instead of changing the amount.
_EXACT = Context(prec=64, Emin=MIN_EMIN, Emax=MAX_EMAX, traps=[Inexact, Rounded])


def currency_exponent(currency: str) -> int:
    """The number of decimals of ``currency``; ``InvalidPaymentRequest`` if unsupported."""
    if not isinstance(currency, str) or currency.upper() not in CURRENCY_EXPONENTS:
        raise InvalidPaymentRequest(f"unsupported currency: {currency!r}", code="invalid_currency")
    return CURRENCY_EXPONENTS[currency.upper()]


def _as_decimal(amount) -> Decimal:
    # bool is an int subclass: True would silently mean 1 dollar.
    if isinstance(amount, bool) or amount is None:
        raise InvalidPaymentRequest(
            f"amount must be a number, got {amount!r}", code="invalid_amount"
        )
    if isinstance(amount, Decimal):
        return amount
    if isinstance(amount, int):
        return Decimal(amount)
    if isinstance(amount, float):
        return Decimal(repr(amount))
    if isinstance(amount, str):
        text = amount.strip()
        if len(text) > 64 or not _DECIMAL_TEXT.fullmatch(text):
            raise InvalidPaymentRequest(
                f"amount must be a decimal number like '25.99', got {amount[:64]!r}",
                code="invalid_amount",
            )
        return Decimal(text)
    raise InvalidPaymentRequest(
        f"amount must be int, Decimal, str or float, got {type(amount).__name__}",
        code="invalid_amount",
    )


def to_minor_units(amount, currency: str, max_amount: int | None = None) -> int:
    """Convert ``amount`` (major units) to an exact positive integer of minor units.

    Raises ``InvalidPaymentRequest`` for zero, negative, NaN, infinite, non-numeric,
    too many decimals for the currency, or more than ``max_amount`` major units.
    """
    exponent = currency_exponent(currency)
    value = _as_decimal(amount)
    if not value.is_finite():
        raise InvalidPaymentRequest(f"amount must be finite, got {amount!r}", code="invalid_amount")
    if value <= 0:
        raise InvalidPaymentRequest(
            f"amount must be greater than zero, got {amount!r}", code="invalid_amount"
        )
    if max_amount is not None and value > max_amount:
        raise InvalidPaymentRequest(
            f"amount {value} exceeds the maximum of {max_amount} {currency.upper()}",
            code="amount_too_large",
        )
    try:
        minor = value.scaleb(exponent, context=_EXACT)
    except DecimalException:  # more significant digits than any real amount has
        minor = None
    if minor is None or minor != minor.to_integral_value(context=_EXACT):
        raise InvalidPaymentRequest(
            f"amount {value} has more than {exponent} decimal places for {currency.upper()}",
            code="invalid_amount",
        )
    return int(minor)


def to_major_units(minor: int, currency: str) -> Decimal:
    """The exact ``Decimal`` in major units for ``minor`` (2599 USD -> Decimal('25.99'))."""
    exponent = currency_exponent(currency)
    return Decimal(minor).scaleb(-exponent) if exponent else Decimal(minor)
