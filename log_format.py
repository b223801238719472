"""What a log line looks like: one JSON object per record, with the log context's ids.

Kept apart from the handlers so every output (stderr, CloudWatch, gunicorn's file or
syslog outputs) writes the same line: DESIGN.md section 7 lists its fields.
"""

from __future__ import annotations

import json
import logging
import time

from log_context import current_log_context
from redaction import STANDARD_ATTRIBUTES

CONTEXT_FIELDS = ("request_id", "payment_id", "transaction_id")
EXCEPTION_FIELDS = ("exc_type", "exc_message", "traceback")
_NOT_EXTRA = STANDARD_ATTRIBUTES | set(CONTEXT_FIELDS) | set(EXCEPTION_FIELDS)


class JsonFormatter(logging.Formatter):
    """One JSON object per line.

    Keys: ``time`` (ISO 8601 UTC, milliseconds), ``level``, ``logger``, ``message`` (the
    formatted message exactly, so CloudWatch metric filters on the incident texts match),
    the context ids when known, ``extra=`` fields, ``exc_type``/``exc_message``/``traceback``
    when there is an exception, ``stack``, ``process`` and ``thread``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            if record.__dict__.get(key) is not None:
                entry[key] = record.__dict__[key]
        for key, value in record.__dict__.items():
            if key not in _NOT_EXTRA and not key.startswith("_"):
                entry.setdefault(key, value)
        entry.update(self._exception_fields(record))
        if record.stack_info:
            entry["stack"] = record.stack_info
        entry["process"] = record.process
        entry["thread"] = record.thread
        return json.dumps(entry, default=str, separators=(",", ":"))

    def _exception_fields(self, record: logging.LogRecord) -> dict:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if not record.exc_text:
            return {}
        # RedactingFilter leaves scrubbed exc_type/exc_message on the record.
        return {
            "exc_type": record.__dict__.get("exc_type", type(exc).__name__ if exc else None),
            "exc_message": record.__dict__.get("exc_message", str(exc) if exc else None),
            "traceback": record.exc_text,
        }


class ContextFilter(logging.Filter):
    """Copy the fields bound with ``bind_log_context`` onto the record (``extra=`` wins).

    Runs in the logging thread, where the context variable has this request's values.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current_log_context().items():
            if key not in STANDARD_ATTRIBUTES and key not in record.__dict__:
                record.__dict__[key] = value
        return True
