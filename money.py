"""Exact conversion of caller amounts (major units) to integer minor units.

Callers pass ``int``, ``Decimal``, ``str`` or ``float``. A float is converted through its
shortest repr (``25.99`` means 25.99, not 25.98999999999999843...), so the amount a
person typed is the amount charged. Text must be plain decimal text (``"25.99"``): an
amount that arrives as text was typed or generated as text, and anything looser
(``"1e2"``, ``" 5\\n"``, ``".5"``) is more likely a bug than a price. Anything that is not
exactly representable in the currency's minor unit is refused rather than rounded:
rounding money silently is how customers get charged the wrong amount.
"""

from __future__ import annotations

import re
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, DecimalException, Inexact, Rounded
from typing import NamedTuple

from errors import InvalidPaymentRequest


class Currency(NamedTuple):
    """What the code needs to know about a currency."""

    exponent: int  # ISO 4217 minor-unit decimals
    per_usd: Decimal  # approximate units for one US dollar (rounded; see CURRENCIES)


def _currencies(exponent: int, rates: str) -> dict[str, Currency]:
    pairs = (item.split("=") for item in rates.split())
    return {code: Currency(exponent, Decimal(rate)) for code, rate in pairs}


#: Supported currencies (others are refused): exponent and approximate units per US dollar.
#: The rates only scale ``PAYMENT_MAX_AMOUNT`` (in US dollars) to a ceiling per currency,
#: a guard against typos and abuse, not a business limit or a price: rounded figures,
#: to revisit when a rate moves by a large factor, not by a few percent.
CURRENCIES: dict[str, Currency] = {
    **_currencies(2, "USD=1 EUR=0.9 GBP=0.8 CAD=1.4 AUD=1.5 NZD=1.7 CHF=0.9 SEK=10 NOK=10 "
                     "DKK=7 PLN=4 CZK=22 HUF=350 RON=4.5 MXN=19 BRL=5.5 ZAR=18 SGD=1.3 HKD=7.8 "
                     "INR=85 CNY=7.2 ILS=3.6 TRY=40 THB=33 PHP=57 MYR=4.3 AED=3.67 SAR=3.75"),
    **_currencies(0, "JPY=150 KRW=1400 VND=26000 CLP=950 ISK=130 UGX=3700 XAF=600 XOF=600"),
    **_currencies(3, "KWD=0.31 BHD=0.376 OMR=0.385 JOD=0.71 TND=3 LYD=5.4 IQD=1300"),
}  # fmt: skip
#: ISO 4217 minor-unit exponents (a view of :data:`CURRENCIES`).
CURRENCY_EXPONENTS: dict[str, int] = {code: c.exponent for code, c in CURRENCIES.items()}

#: Plain decimal text: ASCII digits, optionally a point and more digits. A leading minus
#: is recognised only so that ``"-5"`` is refused as not positive rather than as garbage.
_DECIMAL_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
#: Arithmetic that refuses to round: any rounding raises instead of changing the amount.
_EXACT = Context(prec=64, Emin=MIN_EMIN, Emax=MAX_EMAX, traps=[Inexact, Rounded])


def currency_exponent(currency: str) -> int:
    """The number of decimals of ``currency``; ``InvalidPaymentRequest`` if unsupported."""
    return _currency(currency).exponent


def _currency(currency: str) -> Currency:
    if not isinstance(currency, str) or currency.upper() not in CURRENCIES:
        raise InvalidPaymentRequest(f"unsupported currency: {currency!r}", code="invalid_currency")
    return CURRENCIES[currency.upper()]


def max_minor_units(currency: str, max_usd: int) -> int:
    """The largest amount of ``currency`` allowed, in minor units, for a ceiling in USD.

    ``max_usd`` (``PAYMENT_MAX_AMOUNT``) times the currency's approximate rate, rounded
    down to the currency's minor unit.
    """
    found = _currency(currency)
    numerator, denominator = found.per_usd.as_integer_ratio()
    return max_usd * numerator * 10**found.exponent // denominator


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
        if len(amount) > 64 or not _DECIMAL_TEXT.fullmatch(amount):
            raise InvalidPaymentRequest(
                f"amount must be a decimal number like '25.99', got {amount[:64]!r}",
                code="invalid_amount",
            )
        return Decimal(amount)
    raise InvalidPaymentRequest(
        f"amount must be int, Decimal, str or float, got {type(amount).__name__}",
        code="invalid_amount",
    )


def to_minor_units(amount, currency: str, max_usd: int | None = None) -> int:
    """Convert ``amount`` (major units) to an exact positive integer of minor units.

    Raises ``InvalidPaymentRequest`` for zero, negative, NaN, infinite, non-numeric,
    too many decimals for the currency, or more than ``max_usd`` US dollars' worth
    (``PAYMENT_MAX_AMOUNT``, scaled by :func:`max_minor_units`).
    """
    exponent = currency_exponent(currency)
    value = _as_decimal(amount)
    if not value.is_finite():
        raise InvalidPaymentRequest(f"amount must be finite, got {amount!r}", code="invalid_amount")
    if value <= 0:
        raise InvalidPaymentRequest(
            f"amount must be greater than zero, got {amount!r}", code="invalid_amount"
        )
    if max_usd is not None:
        ceiling = to_major_units(max_minor_units(currency, max_usd), currency)
        if value > ceiling:
            raise InvalidPaymentRequest(
                f"amount {value} exceeds the maximum of {ceiling} {currency.upper()} "
                f"(PAYMENT_MAX_AMOUNT: {max_usd} USD)",
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
