"""CloudWatch delivery logic with scripted set-up calls: no boto3 client, no network.

The handler's two set-up steps (``_client``: the boto3 client, ``_sender``: watchtower's
handler) are replaced by fakes; everything else (queueing, dropping, the delivery
thread, close) is the real code. Delivery to a real endpoint is in
``tests/integration/test_logging_setup.py``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from cloudwatch_logging import CloudWatchHandler, DeliveryMonitor, logger, worker_stream_name

WAIT_S = 5.0


class FakeSender:
    """The parts of watchtower's handler that CloudWatchHandler uses."""

    def __init__(self, threads=()):
        self.queues: dict = {}
        self.threads = list(threads)
        self.records: list[logging.LogRecord] = []
        self.closed = False
        self.FLUSH_TIMEOUT = 30.0
        self.cwl_client = SimpleNamespace(closed=False)
        self.cwl_client.close = lambda: setattr(self.cwl_client, "closed", True)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


class ScriptedHandler(CloudWatchHandler):
    """CloudWatchHandler whose set-up returns ``sender``, or raises ``error``.

    ``answered``: when given, set-up waits for it (CloudWatch slow to answer).
    """

    def __init__(self, *, sender=None, error=None, answered=None, **kwargs):
        self.sender = sender or FakeSender()
        self.error = error
        self.answered = answered
        super().__init__("/payments/unit", "host-1-stream", **kwargs)

    def _client(self):
        if self.error is not None:
            raise self.error
        return SimpleNamespace(close=lambda: None)

    def _sender(self, client):
        if self.answered is not None:
            self.answered.wait(WAIT_S)
        return self.sender


@pytest.fixture
def handlers():
    """Handlers a test made; each is closed and its delivery thread gone afterwards."""
    made: list[CloudWatchHandler] = []
    yield made
    for handler in made:
        handler.close(timeout=1.0)
        assert not handler._thread.is_alive()


def _record(message: str, name: str = "payments") -> logging.LogRecord:
    return logging.makeLogRecord({"name": name, "msg": message, "levelno": logging.INFO})


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def status_lines(caplog):
    """The handler's own status lines so far, as (level, message)."""
    caplog.set_level(logging.INFO, logger=logger.name)
    return lambda: [(r.levelno, r.getMessage()) for r in caplog.records if r.name == logger.name]


# --------------------------------------------------------------------------- the handler


def test_records_are_shipped_in_order_with_their_creation_time(handlers):
    handler = ScriptedHandler()
    handlers.append(handler)
    records = [_record(f"record {n}") for n in range(3)]
    for record in records:
        handler.handle(record)
    handler.close(timeout=2.0)

    sent = handler.sender.records
    assert [r.msg for r in sent] == ["record 0", "record 1", "record 2"]
    assert [r.created for r in sent] == [r.created for r in records]


def test_close_flushes_and_closes_the_sender_and_its_client_within_the_timeout(handlers):
    handler = ScriptedHandler()
    handlers.append(handler)
    handler.handle(_record("last words"))
    handler.close(timeout=2.0)

    assert handler.sender.closed and handler.sender.cwl_client.closed
    assert 0.0 <= handler.sender.FLUSH_TIMEOUT <= 2.0
    assert [r.msg for r in handler.sender.records] == ["last words"]


def test_emit_does_not_wait_for_a_slow_cloudwatch_and_drops_beyond_the_queue_bound(
    handlers, status_lines
):
    answered = threading.Event()
    handler = ScriptedHandler(answered=answered, max_queue=5)
    handlers.append(handler)
    for number in range(8):
        handler.handle(_record(f"record {number}"))  # returns while set-up still waits

    assert handler.monitor.dropped == 3
    assert status_lines() == [
        (
            logging.WARNING,
            "CloudWatch log delivery is failing (too many records waiting for CloudWatch;"
            " dropping new ones); records still go to stderr",
        )
    ]
    answered.set()
    _wait_for(lambda: len(handler.sender.records) == 5, "the queued records")
    assert [r.msg for r in handler.sender.records] == [f"record {n}" for n in range(5)]


def test_unreachable_cloudwatch_warns_once_and_counts_the_undelivered_records_at_close(
    handlers, status_lines
):
    handler = ScriptedHandler(error=ConnectionError("connection refused"))
    handlers.append(handler)
    for number in range(4):
        handler.handle(_record(f"record {number}"))
    _wait_for(lambda: handler.monitor.failing, "the failed set-up")

    started = time.monotonic()
    handler.close(timeout=1.0)
    assert time.monotonic() - started < 1.0

    assert handler.monitor.dropped == 4
    assert status_lines() == [
        (
            logging.WARNING,
            "CloudWatch log delivery is failing (set-up: connection refused);"
            " records still go to stderr",
        ),
        (logging.INFO, "4 log records were not delivered to CloudWatch"),
    ]


def test_status_lines_and_records_of_delivery_threads_are_not_shipped(handlers):
    delivery_thread = SimpleNamespace(ident=-7)  # an ident no real thread has
    handler = ScriptedHandler(sender=FakeSender(threads=[delivery_thread]))
    handlers.append(handler)
    handler.handle(_record("first"))
    _wait_for(lambda: handler.sender.records, "the first record")

    from_delivery = _record("botocore chatter", name="botocore.endpoint")
    from_delivery.thread = delivery_thread.ident
    assert not handler.filter(_record("CloudWatch log delivery recovered", name=logger.name))
    assert not handler.filter(from_delivery)
    assert handler.filter(_record("an ordinary record"))


def test_records_after_close_are_ignored(handlers):
    handler = ScriptedHandler()
    handlers.append(handler)
    handler.close(timeout=2.0)
    handler.handle(_record("too late"))

    assert handler.sender.records == []
    assert handler.monitor.dropped == 0


# --------------------------------------------------------------------------- the monitor


def _response(status: int) -> SimpleNamespace:
    return SimpleNamespace(status_code=status)


PUT = SimpleNamespace(name="PutLogEvents")


@pytest.mark.parametrize(
    ("status", "parsed", "failed"),
    [
        (200, {}, False),
        (200, {"rejectedLogEventsInfo": {"tooOldLogEventEndIndex": 2}}, True),
        (400, {"Error": {"Code": "ResourceAlreadyExistsException"}}, False),
        (400, {"Error": {"Code": "ResourceNotFoundException"}}, False),
        (400, {"Error": {"Code": "AccessDeniedException"}}, True),
        (503, {"Error": {"Code": "ServiceUnavailableException"}}, True),
    ],
)
def test_monitor_counts_a_failure_only_for_answers_watchtower_cannot_handle(status, parsed, failed):
    monitor = DeliveryMonitor()
    monitor.after_call(_response(status), parsed, PUT)
    assert (monitor.failures, monitor.failing) == ((1, True) if failed else (0, False))


def test_monitor_warns_once_per_outage_and_reports_the_recovery(status_lines):
    monitor = DeliveryMonitor()
    for _ in range(3):
        monitor.after_call(_response(503), {"Error": {"Code": "Throttled"}}, PUT)
    monitor.after_call(_response(200), {}, PUT)
    monitor.after_call(_response(200), {}, PUT)
    monitor.after_call_error(ConnectionError("refused"), "after-call-error.logs.PutLogEvents")

    assert status_lines() == [
        (
            logging.WARNING,
            "CloudWatch log delivery is failing (PutLogEvents answered HTTP 503 Throttled);"
            " records still go to stderr",
        ),
        (
            logging.INFO,
            "CloudWatch log delivery recovered (3 failures, 0 records dropped so far)",
        ),
        (
            logging.WARNING,
            "CloudWatch log delivery is failing (PutLogEvents: refused);"
            " records still go to stderr",
        ),
    ]


def test_monitor_warns_on_the_first_dropped_record_only():
    monitor = DeliveryMonitor()
    monitor.drop()
    monitor.drop(4)
    assert (monitor.dropped, monitor.failures, monitor.warned) == (5, 1, True)


# --------------------------------------------------------------------------- stream names


def test_worker_stream_name_is_host_pid_and_start_time():
    name = worker_stream_name()
    prefix = f"{socket.gethostname()}-{os.getpid()}-"
    assert name.startswith(prefix)
    assert re.fullmatch(r"\d{8}T\d{6}Z", name[len(prefix) :])
