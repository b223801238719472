"""gunicorn settings: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Sizes and timeouts come from the app's own settings (``GUNICORN_WORKERS``,
``GUNICORN_THREADS``, ``PORT``, ``PAYMENT_DEADLINE``, ``DB_POOL_TIMEOUT``), so a bad value
stops the master at start-up with the variable's name. Two variables belong to the
server, not the app, and are read here:

- ``BIND``: listen addresses, comma-separated (``0.0.0.0:8000``, ``unix:/run/app.sock``,
  ``fd://3``). Default ``127.0.0.1:$PORT``: loopback unless an operator opens it up
  (in a container set ``BIND=0.0.0.0:8000``).
- ``PROMETHEUS_MULTIPROC_DIR``: where workers write metric samples for ``/metrics``.
  Its stale files are wiped at start; unset, a fresh temporary directory is used and
  removed at exit.

No app module is imported in the master: workers import the app after the fork
(``preload_app = False``), so no database connection, provider session, CloudWatch
thread or prometheus-client state is ever created before a fork and shared. Hooks
import what they need when they run.
"""

import glob
import math
import os
import shutil
import tempfile

from settings import get_settings

_settings = get_settings()

wsgi_app = "wsgi:app"
worker_class = "gthread"
workers = _settings.gunicorn_workers
threads = _settings.gunicorn_threads
bind = [a.strip() for a in os.environ.get("BIND", f"127.0.0.1:{_settings.port}").split(",")]
preload_app = False

# A payment takes at most PAYMENT_DEADLINE at the provider plus short database work on
# both sides (each bounded by DB_POOL_TIMEOUT): let an in-flight one finish on SIGTERM.
graceful_timeout = math.ceil(_settings.payment_deadline + _settings.db_pool_timeout) + 5
# gthread workers heartbeat from their main loop, so this catches a stuck worker, not a
# slow request; still kept above the longest payment.
timeout = max(30, math.ceil(_settings.payment_deadline) + 15)
# Recycle workers now and then (slow leaks), staggered so they do not restart together.
max_requests = 10_000
max_requests_jitter = 1_000

logger_class = "gunicorn_logging.GunicornJsonLogger"
accesslog = "-"
# gunicorn's default plus the duration and the request id the app echoed, which joins an
# access line to the app's log lines for the same request.
access_log_format = (
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(M)sms '
    "request_id=%({x-request-id}o)s"
)
# The control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl):
# several instances on a host would fight over it. Enable per instance if wanted.
control_socket_disable = True

_owned_metrics_dir = None


def on_starting(server):
    """Prepare PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus-client."""
    global _owned_metrics_dir
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)  # samples of a previous run would be added to this one's
    else:
        path = _owned_metrics_dir = tempfile.mkdtemp(prefix="payments-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    server.log.info("prometheus multiprocess directory: %s", path)


def post_fork(server, worker):
    """Give the worker its own log handlers, DB pool, provider session and breaker.

    Also makes gunicorn's own error answers (unparseable requests) problem+json.

    Each of these also resets itself through ``os.register_at_fork``; calling them here
    keeps the worker correct even if someone turns ``preload_app`` on.
    """
    import connection_pool
    import database_config
    import logging_setup
    import payment_handler
    from service import gunicorn_problems

    logging_setup.start_worker_logging(get_settings())  # first: later imports log
    database_config.reset_after_fork()
    connection_pool.reset_session()
    payment_handler.reset_payment_service()
    gunicorn_problems.install()


def worker_exit(server, worker):
    """Flush the worker's CloudWatch stream (bounded wait)."""
    import logging_setup

    logging_setup.shutdown_logging()


def child_exit(server, worker):
    """In the master, after any worker exit (including SIGKILL): retire its metric files.

    Its live gauges are dropped; its counters and histograms are added to the archives
    (``metrics_archive``), so recycled workers leave no files behind. Done here rather
    than in ``worker_exit``, which a killed worker never runs. An error is logged, not
    raised: it would stop the master's loop, and the worker's files still count as they
    are.
    """
    from prometheus_client import multiprocess

    import metrics_archive

    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]  # set or made by on_starting
    multiprocess.mark_process_dead(worker.pid, path)
    try:
        metrics_archive.archive_dead_worker(path, worker.pid)
    except Exception:
        server.log.exception("could not archive the metric files of worker %s", worker.pid)


def on_exit(server):
    if _owned_metrics_dir is not None:
        shutil.rmtree(_owned_metrics_dir, ignore_errors=True)
