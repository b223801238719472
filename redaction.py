"""Scrub secrets and card data from log records before any handler writes them.

DESIGN.md section 7: ``PAYMENT_API_KEY``, inbound API keys, ``Authorization`` headers,
card numbers and CVV-like fields are never logged. :class:`RedactingFilter` rewrites a
record in place (message, args, ``extra`` fields, exception text), once, so every
handler it is attached to - and any handler after it - sees only the scrubbed record.

Card numbers are found in any text by :func:`mask_card_numbers`: 13-19 digits passing
the Luhn check, whole or in groups joined by spaces, dashes, pluses, dots, underscores
or no-break spaces, literal or percent-encoded (``4111%201111%201111%201111``). Log text
is also read URL-decoded, because gunicorn's access line carries the request line as
sent: where a card number shows only in the text decoded by ``unquote_plus``
(``%34%31%31%31...``, a request line encoded twice), the decoded text, scrubbed like any
other, is what gets logged. Only text with ``%`` is decoded: ``+`` alone decodes to the
space it stands for, and the two are read alike.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from urllib.parse import unquote_plus

REDACTED = "[REDACTED]"

# Fields whose value is secret whatever it looks like; prefixed names count too
# (``card_cvv``, ``x-api-key``, ``client_secret``).
_KEY_NAMES = (
    r"cvv2?|cvc2?|card[_-]?number|pan|security[_-]?code|api[_-]?keys?|password|secret"
    r"|authorization"
)
_SENSITIVE_KEY = re.compile(rf"(?:[a-z0-9]+[_-])*(?:{_KEY_NAMES})", re.IGNORECASE)

# ``key: value``, ``key=value``, ``'key': 'value'`` in free text; an auth scheme word
# (``Bearer``) before the value is swallowed with it.
_KEY_VALUE = re.compile(
    rf"(\b(?:[a-z0-9]+[_-])*(?:{_KEY_NAMES})[\"']?\s*[:=]\s*[\"']?)"
    rf"(?:(?:bearer|basic|digest|token)\s+)?(?!{re.escape(REDACTED)})[^\s\"',;&}}\]]+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\bbearer\s+(?!\[)[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)
# A word every match of the two patterns above contains, searched in lowercased text:
# far cheaper than running them case-insensitively on every message.
_KEY_OR_BEARER = re.compile(r"cvv|cvc|card|pan|secur|api|passw|secret|authori|bearer")

# What may join two digit groups of a card number: a space, plus, dash, dot, underscore
# or no-break space, literal or percent-encoded (%20 %2B %2D %2E %5F %A0 %C2%A0), up to
# three in a row ("4111 - 1111", "4111%20%201111").
_SEPARATOR = r"(?:[ +\-._\u00a0]|%(?:20|2[BbDdEe]|5[Ff]|[Aa]0|[Cc]2%[Aa]0))"
_MAX_SEPARATORS = 3
# A run of 13 or more digits with separators between them. Its first digit follows no
# digit, or follows a percent escape (the 0 of %20 is not a card's digit), and is not
# inside an escape: checked after matching it, so the scan skips to digits quickly.
# Possessive: a separator is never a digit, so giving one back never helps a match.
_DIGIT_RUN = re.compile(
    r"\d(?<!%\d)(?<!%[0-9A-Fa-f]\d)(?:(?<!\d\d)|(?<=%[0-9A-Fa-f]\d\d))"
    rf"(?:{_SEPARATOR}{{0,{_MAX_SEPARATORS}}}+\d){{12,}}+(?!\d)"
)
_SEPARATORS = re.compile(rf"({_SEPARATOR}{{1,{_MAX_SEPARATORS}}})")
# One space or dash, also as URLs encode them: groups they join may have any length.
_PLAIN_SEPARATORS = frozenset({" ", "-", "+", "%20", "%2D", "%2d"})
_GROUP_LENGTHS = range(3, 7)  # of a card's groups: 4-4-4-4, 4-6-5, 4-4-4-4-3
_CARD_LENGTHS = range(13, 20)
_SMALLEST_CARD = 10**12

# Attributes every LogRecord has; anything else on a record came from ``extra=`` or
# from the log context.
STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_MARK = "_redacted"


def luhn_valid(digits: str) -> bool:
    """The payment-card checksum: what separates a card number from any long id."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def contains_card_number(run: str) -> bool:
    """Whether consecutive digit groups of ``run`` form a 13-19 digit Luhn-valid number.

    Groups, not arbitrary substrings: a card is written whole or in groups, and testing
    every window of a long id would redact almost every long id. Groups joined by one
    space or dash (or ``+``, ``%20``, ``%2D``, as URLs encode them) may have any length;
    joined by anything else, each must be 3-6 digits, the way cards are grouped: dots and
    underscores also join the parts of decimals, timestamps (``1705320005.123456``),
    versions and ids, which are not cards.
    """
    parts = _SEPARATORS.split(run)
    groups, separators = parts[::2], parts[1::2]
    for start in range(len(groups)):
        digits, plain, card_sized = "", True, True
        for index in range(start, len(groups)):
            if index > start:
                plain = plain and separators[index - 1] in _PLAIN_SEPARATORS
            card_sized = card_sized and len(groups[index]) in _GROUP_LENGTHS
            digits += groups[index]
            if len(digits) > _CARD_LENGTHS[-1] or not (plain or card_sized):
                break
            if len(digits) in _CARD_LENGTHS and luhn_valid(digits):
                return True
    return False


def mask_card_numbers(text: str) -> str:
    """Return ``text`` with every card number replaced by ``[REDACTED]``, the rest as is.

    For free text such as a payment's description or metadata. Card numbers are found as
    in log records (see the module docstring), but the text is not URL-decoded, so
    nothing else in it changes. Text shorter than a card number is returned at once.
    """
    if len(text) < _CARD_LENGTHS[0]:
        return text
    return _DIGIT_RUN.sub(_redact_card, text)


def is_sensitive_key(key: object) -> bool:
    """Whether a mapping key names a field whose value is always secret."""
    return isinstance(key, str) and _SENSITIVE_KEY.fullmatch(key) is not None


def _redact_card(match: re.Match) -> str:
    run = match.group(0)
    return REDACTED if contains_card_number(run) else run


class Redactor:
    """Replaces known secrets, bearer tokens, sensitive fields and card numbers.

    ``secrets``: exact strings that must never appear (the provider key, inbound keys).
    """

    def __init__(self, secrets: Iterable[str] = ()):
        literal = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, literal))) if literal else None

    def text(self, value: str) -> str:
        """Return ``value`` with every secret replaced by ``[REDACTED]``.

        If a card number shows only once ``value`` is URL-decoded, the decoded text,
        scrubbed the same way, is returned instead.
        """
        value = self._scrub(value)
        if "%" in value:
            decoded = unquote_plus(value)
            if mask_card_numbers(decoded) != decoded:
                value = self._scrub(decoded)
        return value

    def _scrub(self, value: str) -> str:
        if self._secrets is not None:
            value = self._secrets.sub(REDACTED, value)
        value = mask_card_numbers(value)
        if _KEY_OR_BEARER.search(value.lower()):
            value = _KEY_VALUE.sub(rf"\1{REDACTED}", value)
            value = _BEARER.sub(f"Bearer {REDACTED}", value)
        return value

    def value(self, value: object) -> object:
        """Redact a JSON-bound value: strings, card-like integers, nested containers.

        Other objects become their (redacted) ``str``, which is how they would be logged.
        """
        if isinstance(value, str):
            return self.text(value)
        if value is None or isinstance(value, bool | float | Decimal):
            return value
        if isinstance(value, int):
            return (
                REDACTED if value >= _SMALLEST_CARD and contains_card_number(str(value)) else value
            )
        if isinstance(value, Mapping):
            return {
                key: REDACTED if is_sensitive_key(key) else self.value(item)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            items = [self.value(item) for item in value]
            return tuple(items) if isinstance(value, tuple) else items
        return self.text(str(value))

    def _arg(self, arg: object) -> object:
        # Only plain containers are rebuilt: scalars keep their type for ``%d``/``%r``
        # and are covered by scrubbing the formatted message.
        return self.value(arg) if type(arg) in (dict, list, tuple) else arg

    def record(self, record: logging.LogRecord) -> None:
        """Scrub ``record`` in place, once; later handlers reuse the result."""
        if getattr(record, _MARK, False):
            return
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(self._arg(arg) for arg in args)
        elif type(args) is dict:
            record.args = {
                key: REDACTED if is_sensitive_key(key) else self.value(item)
                for key, item in args.items()
            }
        try:
            message = record.getMessage()
        except Exception:  # bad format string: keep the text, never the raw arguments
            message = f"{record.msg} (unformattable log arguments: {args!r})"
        record.msg, record.args = self.text(message), None

        for key, item in list(record.__dict__.items()):
            if key not in STANDARD_ATTRIBUTES and not key.startswith("_"):
                record.__dict__[key] = REDACTED if is_sensitive_key(key) else self.value(item)

        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.exc_type = type(exc).__name__
            record.exc_message = self.text(str(exc))
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.text(record.stack_info)
        setattr(record, _MARK, True)


class RedactingFilter(logging.Filter):
    """Handler filter running :meth:`Redactor.record`; attach it to every handler.

    A filter on the root *logger* would miss records propagated from child loggers;
    handler filters see every record the handler is given.
    """

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        self.redactor.record(record)
        return True
