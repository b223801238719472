"""Per-request and per-payment fields carried into every log record.

A ``contextvars`` mapping, so each thread (and each request) sees only its own ids.
``log_format.ContextFilter`` (installed by ``logging_setup``) copies the bound fields
onto every record; code binds them with::

    with bind_log_context(payment_id=payment.id, transaction_id=key):
        ...
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

_EMPTY: dict[str, str] = {}
_fields: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "log_fields",
    default=_EMPTY,  # noqa: B039 - never mutated, always replaced
)


def current_log_context() -> dict[str, str]:
    """The fields bound in this context (a copy callers may not mutate)."""
    return dict(_fields.get())


@contextmanager
def bind_log_context(**values: str | None) -> Iterator[None]:
    """Add fields (``None`` values are skipped) for the duration of the block."""
    merged = {**_fields.get(), **{k: v for k, v in values.items() if v is not None}}
    token = _fields.set(merged)
    try:
        yield
    finally:
        _fields.reset(token)
