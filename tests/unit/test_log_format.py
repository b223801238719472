"""The JSON line every log output writes, and the log context it carries."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading

from log_context import bind_log_context
from log_format import ContextFilter, JsonFormatter
from logging_setup import configure_logging
from settings import Settings

PAYMENT_TIMEOUT_TEXT = "Payment service connection failed - timeout after 5000ms"
POOL_EXHAUSTED_TEXT = "Database query failed: connection pool exhausted"


def _record(msg, args=(), exc_info=None, **extra) -> logging.LogRecord:
    return logging.getLogger("payment_handler").makeRecord(
        "payment_handler", logging.ERROR, __file__, 1, msg, args, exc_info, extra=extra
    )


def test_json_formatter_writes_one_object_per_record():
    record = _record(
        "Payment service connection failed - timeout after %dms",
        (5000,),
        request_id="req-1",
        attempt=3,
    )
    line = JsonFormatter().format(record)
    entry = json.loads(line)

    assert "\n" not in line
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "payment_handler"
    assert entry["message"] == PAYMENT_TIMEOUT_TEXT
    assert entry["request_id"] == "req-1"
    assert entry["attempt"] == 3
    assert entry["process"] == os.getpid()
    assert entry["thread"] == threading.get_ident()
    assert "payment_id" not in entry and "exc_type" not in entry


def test_json_formatter_adds_the_exception():
    try:
        raise ConnectionError("HTTPSConnectionPool timeout")
    except ConnectionError:
        record = _record("failed", exc_info=sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["exc_type"] == "ConnectionError"
    assert entry["exc_message"] == "HTTPSConnectionPool timeout"
    assert entry["traceback"].startswith("Traceback (most recent call last):")
    assert entry["traceback"].endswith("ConnectionError: HTTPSConnectionPool timeout")


def test_context_filter_copies_the_bound_ids_and_lets_extra_fields_win():
    record = _record(POOL_EXHAUSTED_TEXT, request_id="req-from-extra")
    with bind_log_context(request_id="req-bound", payment_id="pay_7"):
        assert ContextFilter().filter(record) is True

    assert record.request_id == "req-from-extra"
    assert record.payment_id == "pay_7"
    assert not hasattr(record, "transaction_id")


def test_stderr_lines_carry_the_log_context(restore_root_logging, capsys):
    configure_logging(Settings(cloudwatch_log_group="/payments/unit"), cloudwatch=False)
    with bind_log_context(request_id="req-7", payment_id="pay_7", transaction_id="txn-7"):
        logging.getLogger("database_config").error(POOL_EXHAUSTED_TEXT)

    (entry,) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert entry["message"] == POOL_EXHAUSTED_TEXT
    assert (entry["request_id"], entry["payment_id"], entry["transaction_id"]) == (
        "req-7",
        "pay_7",
        "txn-7",
    )
