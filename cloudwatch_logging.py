"""CloudWatch Logs delivery that never slows or fails a request (DESIGN.md section 7).

Its own module because it is the one part of logging with threads, network calls and
failure modes: records are queued in memory (bounded, the overflow dropped and counted)
and shipped by a thread of the handler's own, which also does the start-up calls
watchtower makes. An outage gives one warning on stderr, not one per record. boto3 and
watchtower are imported only by that thread, so a process without CloudWatch (the
gunicorn master) never loads them.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time

# Status lines (outage, recovery, records not delivered); the handler never ships them.
logger = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT = 5.0
DEFAULT_MAX_QUEUE = 10_000  # records waiting for CloudWatch before new ones are dropped
DEFAULT_SEND_INTERVAL = 5.0  # seconds watchtower holds a batch
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
MAX_ATTEMPTS = 2  # per CloudWatch call, first try included
MAX_SETUP_DELAY = 60.0  # ceiling of the back-off between failed start-up attempts

# CloudWatch errors watchtower deals with itself: a stream's first write, an existing group.
_HANDLED_ERRORS = frozenset(
    {
        "ResourceNotFoundException",
        "ResourceAlreadyExistsException",
        "DataAlreadyAcceptedException",
        "InvalidSequenceTokenException",
        "OperationAbortedException",
    }
)
_STOP = object()


class DeliveryMonitor:
    """Turn CloudWatch call outcomes into one warning per outage and one line on recovery."""

    def __init__(self):
        self._lock = threading.Lock()
        self.failing = False
        self.warned = False
        self.failures = 0
        self.dropped = 0

    def after_call(self, http_response, parsed, model, **_) -> None:
        """botocore ``after-call`` hook: CloudWatch answered."""
        status = http_response.status_code
        code = parsed.get("Error", {}).get("Code")
        if status < 300 and not parsed.get("rejectedLogEventsInfo"):
            self.succeeded()
        elif status < 300:
            self.failed(f"{model.name} rejected events: {parsed['rejectedLogEventsInfo']}")
        elif code not in _HANDLED_ERRORS:
            self.failed(f"{model.name} answered HTTP {status} {code}")

    def after_call_error(self, exception, event_name, **_) -> None:
        """botocore ``after-call-error`` hook: no answer (refused, timed out, ...)."""
        self.failed(f"{event_name.rsplit('.', 1)[-1]}: {exception}")

    def failed(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            if self.failing:
                return
            self.failing = self.warned = True
        logger.warning(
            "CloudWatch log delivery is failing (%s); records still go to stderr", reason
        )

    def succeeded(self) -> None:
        with self._lock:
            if not self.failing:
                return
            self.failing = False
            failures, dropped = self.failures, self.dropped
        logger.info(
            "CloudWatch log delivery recovered (%d failures, %d records dropped so far)",
            failures,
            dropped,
        )

    def drop(self, count: int = 1) -> None:
        with self._lock:
            self.dropped += count
            if self.failing:
                return
        self.failed("too many records waiting for CloudWatch; dropping new ones")


class CloudWatchHandler(logging.Handler):
    """Ship records to CloudWatch Logs through watchtower without ever blocking the caller.

    ``emit`` formats and queues; the handler's thread builds the watchtower handler (its
    constructor calls CloudWatch: describe/create group, retention), retrying with
    back-off, then feeds it. Records logged on the delivery threads (botocore, urllib3,
    watchtower) and this module's own status lines are not shipped, so nothing loops.

    log_group: group to write to, created when missing.
    stream_name: this process's stream (see :func:`worker_stream_name`).
    retention_days: retention set on the group; ``None`` leaves it as it is.
    max_queue: records waiting (here and in watchtower) before new ones are dropped.
    send_interval: seconds watchtower holds a batch before sending it.
    """

    def __init__(
        self,
        log_group: str,
        stream_name: str,
        *,
        retention_days: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        send_interval: float = DEFAULT_SEND_INTERVAL,
    ):
        super().__init__()
        self.log_group = log_group
        self.stream_name = stream_name
        self.retention_days = retention_days
        self.max_queue = max_queue
        self.send_interval = send_interval
        self.monitor = DeliveryMonitor()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pid = os.getpid()
        self._closed = False
        self._stop = threading.Event()
        self._deadline = 0.0
        self._delivery_threads: frozenset[int] = frozenset()
        self._thread = threading.Thread(target=self._run, name="cloudwatch-logs", daemon=True)
        self._thread.start()

    def filter(self, record: logging.LogRecord) -> bool:
        # Checked before the handler lock is taken: a delivery thread logging while
        # close() holds that lock must not wait for it.
        if record.thread in self._delivery_threads or record.name == logger.name:
            return False
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed or os.getpid() != self._pid:
            return  # closed, or inherited across fork: the worker builds its own
        try:
            item = (record.created, self.format(record))
        except Exception:
            self.handleError(record)
            return
        if self._queue.qsize() >= self.max_queue:  # emit runs under the handler lock
            self.monitor.drop()
        else:
            self._queue.put(item)

    def close(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        """Deliver what is queued, waiting at most ``timeout`` seconds, then stop."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() == self._pid:  # one inherited across fork has nothing to deliver
            self._finish(timeout)
        super().close()

    def _finish(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        level = logging.INFO if self.monitor.warned else logging.WARNING
        if self._thread.is_alive():
            logger.log(level, "CloudWatch delivery did not finish within %.1f s", timeout)
        elif self.monitor.dropped:
            logger.log(
                level, "%d log records were not delivered to CloudWatch", self.monitor.dropped
            )

    def _run(self) -> None:
        self._delivery_threads = frozenset({threading.get_ident()})
        try:
            sender = self._connect()
            if sender is None:
                self._discard_queue()
            else:
                self._forward(sender)
        except Exception:  # the thread must not die silently
            logger.exception("CloudWatch log delivery stopped")

    def _connect(self):
        delay = 1.0
        while True:
            client = None
            try:
                client = self._client()
                return self._sender(client)
            except Exception as exc:
                if client is not None:
                    client.close()
                self.monitor.failed(f"set-up: {exc}")
            if self._stop.wait(delay):
                return None
            delay = min(delay * 2, MAX_SETUP_DELAY)

    def _client(self):
        # Imported here: processes without CloudWatch (the gunicorn master) never load boto3.
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        )
        client = boto3.session.Session().client("logs", config=config)
        client.meta.events.register("after-call.cloudwatch-logs", self.monitor.after_call)
        client.meta.events.register(
            "after-call-error.cloudwatch-logs", self.monitor.after_call_error
        )
        return client

    def _sender(self, client):
        """watchtower's handler; its constructor creates the group and sets retention."""
        import watchtower

        sender = watchtower.CloudWatchLogHandler(
            log_group_name=self.log_group,
            log_stream_name=self.stream_name.replace("{", "{{").replace("}", "}}"),
            boto3_client=client,
            send_interval=self.send_interval,
            log_group_retention_days=self.retention_days,
        )
        sender.FLUSH_TIMEOUT = DEFAULT_SHUTDOWN_TIMEOUT  # its default of 30 s per queue
        return sender

    def _forward(self, sender) -> None:
        known_threads = 0
        while (item := self._queue.get()) is not _STOP:
            if sum(q.qsize() for q in sender.queues.values()) >= self.max_queue:
                self.monitor.drop()
                continue
            created, text = item
            sender.emit(logging.makeLogRecord({"msg": text, "created": created}))
            if len(sender.threads) > known_threads:  # watchtower starts one per stream
                known_threads = len(sender.threads)
                self._delivery_threads |= {t.ident for t in sender.threads}
        sender.FLUSH_TIMEOUT = max(0.0, self._deadline - time.monotonic())
        sender.close()
        sender.cwl_client.close()

    def _discard_queue(self) -> None:
        lost = 0
        while not self._queue.empty():
            if self._queue.get() is not _STOP:
                lost += 1
        if lost:
            self.monitor.drop(lost)


def worker_stream_name() -> str:
    """This process's stream: host, pid and start time (a restarted pid gets a new one)."""
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{socket.gethostname()}-{os.getpid()}-{started}"
