"""One logging set-up for the service, the gunicorn master and each worker (DESIGN.md §7).

The wiring only: which handlers a process gets, once, and when they are flushed. JSON
lines on stderr always (:mod:`log_format`); CloudWatch Logs when ``CLOUDWATCH_LOG_GROUP``
is set, one stream per worker process (:mod:`cloudwatch_logging`). Every handler
installed here first copies the log context (request, payment, transaction ids) onto the
record and then redacts it (:mod:`redaction`), so no handler ever sees a secret or a
card number. gunicorn wiring::

    logger_class = "gunicorn_logging.GunicornJsonLogger"  # master and gunicorn's own logs
    accesslog = "-"                                       # access log on, as JSON

    def post_fork(server, worker):
        start_worker_logging(get_settings())  # first, so the worker's start-up logs ship

    def worker_exit(server, worker):
        shutdown_logging()
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass

from cloudwatch_logging import DEFAULT_SHUTDOWN_TIMEOUT, CloudWatchHandler, worker_stream_name
from log_format import ContextFilter, JsonFormatter
from redaction import RedactingFilter, Redactor
from settings import Settings


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
_master_pid: int | None = None  # set by configure_master_logging: CloudWatch waits for the fork


def _prepare(handler: logging.Handler, filters) -> logging.Handler:
    handler.setFormatter(JsonFormatter())
    for record_filter in filters:
        handler.addFilter(record_filter)
    return handler


def configure_logging(settings: Settings, *, cloudwatch: bool = True) -> None:
    """Install the JSON stderr handler and, when configured, the CloudWatch handler on root.

    Idempotent per process: a repeated call with the same settings changes nothing. A
    CloudWatch handler inherited across fork is dropped, never flushed: its threads and
    connections belong to the parent. In a gunicorn master (see
    :func:`configure_master_logging`) ``cloudwatch`` is ignored, so even a preloaded app
    cannot start CloudWatch there.
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


def configure_master_logging(settings: Settings) -> None:
    """Configure a gunicorn master: JSON on stderr, CloudWatch only in its workers.

    Marks this process as the master, so later :func:`configure_logging` calls here (a
    preloaded app's) leave CloudWatch off too.
    """
    global _master_pid
    _master_pid = os.getpid()
    configure_logging(settings, cloudwatch=False)


def prepare_handler(handler: logging.Handler) -> logging.Handler:
    """Give a handler installed elsewhere the JSON format, log context and redaction.

    For outputs this module did not create (gunicorn's file or syslog handlers); call
    after :func:`configure_logging`, whose filters it shares.
    """
    return _prepare(handler, _installed.filters)


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
