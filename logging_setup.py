"""One logging set-up for the service, the gunicorn master and each worker (DESIGN.md §7).

JSON lines on stderr always; CloudWatch Logs through watchtower when
``CLOUDWATCH_LOG_GROUP`` is set, one stream per worker process. Every handler installed
here first copies the log context (request, payment, transaction ids) onto the record
and then redacts it, so no handler ever sees a secret or a card number.

CloudWatch is never on the request path: records are queued in memory (bounded, the
overflow dropped and counted) and shipped by a thread of the handler's own, which also
does the start-up calls watchtower makes. An outage gives one warning on stderr, not one
per record. gunicorn wiring::

    logger_class = "logging_setup.GunicornJsonLogger"   # master and gunicorn's own logs
    accesslog = "-"                                     # access log on, as JSON

    def post_fork(server, worker):
        start_worker_logging(get_settings())  # first, so the worker's start-up logs ship

    def worker_exit(server, worker):
        shutdown_logging()
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass

from gunicorn import glogging

from log_context import current_log_context
from redaction import STANDARD_ATTRIBUTES, RedactingFilter, Redactor
from settings import Settings, get_settings

logger = logging.getLogger(__name__)

CONTEXT_FIELDS = ("request_id", "payment_id", "transaction_id")
EXCEPTION_FIELDS = ("exc_type", "exc_message", "traceback")
_NOT_EXTRA = STANDARD_ATTRIBUTES | set(CONTEXT_FIELDS) | set(EXCEPTION_FIELDS)

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


@dataclass
class _Installed:
    pid: int
    settings: Settings
    cloudwatch: bool
    filters: tuple[logging.Filter, ...]
    stderr: logging.Handler
    cloudwatch_handler: CloudWatchHandler | None


_lock = threading.Lock()
_installed: _Installed | None = None
_master_pid: int | None = None  # set by GunicornJsonLogger: CloudWatch waits for the fork


def _prepare(handler: logging.Handler, filters) -> logging.Handler:
    handler.setFormatter(JsonFormatter())
    for record_filter in filters:
        handler.addFilter(record_filter)
    return handler


def configure_logging(settings: Settings, *, cloudwatch: bool = True) -> None:
    """Install the JSON stderr handler and, when configured, the CloudWatch handler on root.

    Idempotent per process: a repeated call with the same settings changes nothing. A
    CloudWatch handler inherited across fork is dropped, never flushed: its threads and
    connections belong to the parent. In a gunicorn master (see :class:`GunicornJsonLogger`)
    ``cloudwatch`` is ignored, so even a preloaded app cannot start CloudWatch there.
    """
    global _installed
    root = logging.getLogger()
    cloudwatch = cloudwatch and os.getpid() != _master_pid
    with _lock:
        current = _installed
        if (
            current is not None
            and current.pid == os.getpid()
            and (current.settings, current.cloudwatch) == (settings, cloudwatch)
            and current.stderr in root.handlers
        ):
            return
        replaced = None
        if current is not None:
            root.removeHandler(current.stderr)
            if current.cloudwatch_handler is not None:
                root.removeHandler(current.cloudwatch_handler)
                replaced = current.cloudwatch_handler
        redactor = Redactor((settings.payment_api_key, *settings.api_keys))
        filters = (ContextFilter(), RedactingFilter(redactor))
        stderr = _prepare(logging.StreamHandler(sys.stderr), filters)
        root.addHandler(stderr)
        handler = None
        if cloudwatch and settings.cloudwatch_log_group:
            # watchtower warns once per failed call; DeliveryMonitor reports an outage once.
            warnings.filterwarnings("ignore", module=r"watchtower\Z")
            handler = CloudWatchHandler(
                settings.cloudwatch_log_group,
                worker_stream_name(),
                retention_days=settings.cloudwatch_retention_days,
            )
            root.addHandler(_prepare(handler, filters))
        root.setLevel(settings.log_level)
        _installed = _Installed(os.getpid(), settings, cloudwatch, filters, stderr, handler)
    if replaced is not None:
        replaced.close()  # a no-op for one inherited across fork


def start_worker_logging(settings: Settings) -> None:
    """Give this gunicorn worker its own CloudWatch stream, thread and boto3 client.

    Call after fork (``post_fork``). Whatever the master installed stays with the master.
    """
    configure_logging(settings, cloudwatch=True)


def shutdown_logging(timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
    """Flush and close the CloudWatch handler, returning within ``timeout`` seconds."""
    with _lock:
        current = _installed
        if current is None or current.cloudwatch_handler is None:
            return
        handler = current.cloudwatch_handler
        logging.getLogger().removeHandler(handler)
        current.cloudwatch_handler, current.cloudwatch = None, False
    handler.close(timeout)


# Runs before logging's own exit hook (atexit is last-registered first): queued records
# are delivered within DEFAULT_SHUTDOWN_TIMEOUT, and logging.shutdown then finds
# watchtower's handler already closed instead of flushing and closing it again.
atexit.register(shutdown_logging)


class GunicornJsonLogger(glogging.Logger):
    """gunicorn's error and access logs as JSON through the root logger's handlers.

    Use as ``logger_class``; gunicorn's stdout/stderr handlers are removed and its
    loggers propagate. File or syslog outputs, when configured, get the same JSON
    format and redaction.
    """

    def setup(self, cfg) -> None:
        global _master_pid
        super().setup(cfg)
        _master_pid = os.getpid()
        configure_logging(get_settings(), cloudwatch=False)
        filters = _installed.filters
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                if not getattr(handler, "_gunicorn", False):
                    continue
                if type(handler) is logging.StreamHandler:
                    log.removeHandler(handler)
                elif not handler.filters:
                    _prepare(handler, filters)
            log.propagate = True
