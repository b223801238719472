"""The logging set-up against a real moto server process reached over HTTP.

CloudWatch is found the way production finds it: boto3 reads the region, credentials
and ``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS`` from the environment. Also here: forked workers
and a real gunicorn with ``GunicornJsonLogger``. The JSON format and the CloudWatch
handler's own logic are tested without processes or sockets in ``tests/unit``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest

from cloudwatch_logging import CloudWatchHandler
from log_context import bind_log_context
from logging_setup import configure_logging, shutdown_logging, start_worker_logging
from redaction import REDACTED
from settings import Settings
from tests.support.moto import MotoServer

ROOT = Path(__file__).resolve().parents[2]
PROVIDER_KEY = "sk_live_provider_0123456789"
INBOUND_KEY = "inbound-key-abcdefghijklmnop"
BEARER_TOKEN = "tok_bearer_secret_42"
ORDER_ID = "1234567812345678"  # 16 digits, fails the Luhn check: not a card
CARDS = ("4242 4242 4242 4242", "4111-1111-1111-1111", "5555555555554444")
SECRETS = (
    *CARDS,
    "4242424242424242",
    "4111111111111111",
    PROVIDER_KEY,
    INBOUND_KEY,
    BEARER_TOKEN,
)
PAYMENT_TIMEOUT_TEXT = "Payment service connection failed - timeout after 5000ms"
POOL_EXHAUSTED_TEXT = "Database query failed: connection pool exhausted"


@pytest.fixture(scope="module")
def moto_server():
    with MotoServer() as server:
        yield server


@pytest.fixture(autouse=True)
def restore_logging(restore_root_logging):
    """The root logger as it was (``restore_root_logging``); no delivery thread outlives a test."""
    threads = set(threading.enumerate())
    yield
    # Runs before restore_root_logging's teardown: stop the handlers' threads here first.
    shutdown_logging(timeout=2.0)
    deadline = time.monotonic() + 15
    for thread in set(threading.enumerate()) - threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not [t for t in set(threading.enumerate()) - threads if t.is_alive()]


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Point boto3 at an endpoint with dummy credentials, ignoring any real AWS config."""

    def point_at(endpoint: str) -> dict[str, str]:
        values = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": endpoint,
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        }
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        return values

    yield point_at
    shutdown_logging(timeout=2.0)  # while the environment still points at the endpoint


def _settings() -> Settings:
    return Settings(
        cloudwatch_log_group=f"/payments/test-{uuid.uuid4().hex[:12]}",
        payment_api_key=PROVIDER_KEY,
        api_keys=(INBOUND_KEY,),
    )


@pytest.fixture
def cloudwatch(aws_env, moto_server) -> Settings:
    """Settings with a fresh log group on the moto server."""
    aws_env(moto_server.url)
    return _settings()


@pytest.fixture
def logs_client(moto_server):
    return boto3.client(
        "logs",
        endpoint_url=moto_server.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL nothing listens on: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def hanging_url(restore_logging):
    """A loopback URL that accepts connections and never answers (torn down first)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def read_events(client, group: str) -> dict[str, list[dict]]:
    """Every event of every stream of ``group``, parsed, by stream name."""
    streams = {}
    for stream in client.describe_log_streams(logGroupName=group)["logStreams"]:
        name, token, events = stream["logStreamName"], None, []
        while True:
            page = client.get_log_events(
                logGroupName=group,
                logStreamName=name,
                startFromHead=True,
                **({"nextToken": token} if token else {}),
            )
            events += [json.loads(event["message"]) for event in page["events"]]
            if not page["events"] or page["nextForwardToken"] == token:
                break
            token = page["nextForwardToken"]
        streams[name] = events
    return streams


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cloudwatch_handler() -> CloudWatchHandler:
    (handler,) = [h for h in logging.getLogger().handlers if isinstance(h, CloudWatchHandler)]
    return handler


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_configure_logging_is_idempotent(cloudwatch, capsys):
    configure_logging(cloudwatch)
    configure_logging(cloudwatch)
    logging.getLogger("x").warning("once")

    assert len(json_lines(capsys.readouterr().err)) == 1
    assert cloudwatch_handler() is not None  # exactly one (unpacking asserts it)
    assert logging.getLogger().level == logging.INFO


def test_records_reach_cloudwatch_in_a_stream_named_for_host_and_pid(cloudwatch, logs_client):
    configure_logging(cloudwatch)
    log = logging.getLogger("payment_handler")
    with bind_log_context(request_id="req-1", payment_id="pay_1", transaction_id="txn-1"):
        log.error("Payment service connection failed - timeout after %dms", 5000)
        log.error(POOL_EXHAUSTED_TEXT)
    shutdown_logging(timeout=10)

    streams = read_events(logs_client, cloudwatch.cloudwatch_log_group)
    (name,) = streams
    assert name.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    entries = [e for e in streams[name] if e["logger"] == "payment_handler"]
    assert [e["message"] for e in entries] == [PAYMENT_TIMEOUT_TEXT, POOL_EXHAUSTED_TEXT]
    for entry in entries:
        assert (entry["request_id"], entry["payment_id"], entry["transaction_id"]) == (
            "req-1",
            "pay_1",
            "txn-1",
        )
        assert entry["level"] == "ERROR"
    (group,) = logs_client.describe_log_groups(logGroupNamePrefix=cloudwatch.cloudwatch_log_group)[
        "logGroups"
    ]
    assert group["retentionInDays"] == 30


def test_secrets_leave_no_trace_in_cloudwatch_or_stderr(cloudwatch, logs_client, capsys):
    configure_logging(cloudwatch)
    log = logging.getLogger("payments.api.child")  # propagates to the root handlers
    log.info(f"card {CARDS[0]} cvv=8642 sent with Authorization: Bearer {BEARER_TOKEN}")
    log.warning("charging %s with key %s for order %s", CARDS[1], PROVIDER_KEY, ORDER_ID)
    log.info(
        "request received",
        extra={
            "body": {"card": {"number": CARDS[2], "cvc": "8642"}, "order_id": ORDER_ID},
            "headers": [{"Authorization": f"Bearer {INBOUND_KEY}"}],
        },
    )
    try:
        raise RuntimeError(f"provider refused 4242424242424242 for key {PROVIDER_KEY}")
    except RuntimeError:
        log.exception("charge failed for %s", INBOUND_KEY)
    shutdown_logging(timeout=10)

    stderr = capsys.readouterr().err
    (events,) = read_events(logs_client, cloudwatch.cloudwatch_log_group).values()
    for output in (stderr, json.dumps(events)):
        for secret in SECRETS:
            assert secret not in output
        assert ORDER_ID in output
    for entries in (json_lines(stderr), events):
        first, second, extra, failure = [e for e in entries if e["logger"] == log.name]
        assert first["message"] == (
            f"card {REDACTED} cvv={REDACTED} sent with Authorization: {REDACTED}"
        )
        assert second["message"] == f"charging {REDACTED} with key {REDACTED} for order {ORDER_ID}"
        assert extra["body"] == {
            "card": {"number": REDACTED, "cvc": REDACTED},
            "order_id": ORDER_ID,
        }
        assert extra["headers"] == [{"Authorization": REDACTED}]
        assert failure["exc_message"] == f"provider refused {REDACTED} for key {REDACTED}"
        assert failure["traceback"].endswith(failure["exc_message"])


def test_shutdown_delivers_every_record_logged_before_it(cloudwatch, logs_client):
    configure_logging(cloudwatch)
    log = logging.getLogger("payments")
    for number in range(300):
        log.info("record %d", number)
    shutdown_logging(timeout=10)

    (events,) = read_events(logs_client, cloudwatch.cloudwatch_log_group).values()
    messages = [e["message"] for e in events if e["logger"] == "payments"]
    assert sorted(messages) == sorted(f"record {n}" for n in range(300))


def _log_500(log: logging.Logger) -> float:
    started = time.perf_counter()
    for number in range(500):
        log.info("record %d for order %s", number, ORDER_ID)
    return time.perf_counter() - started


def test_unreachable_cloudwatch_costs_logging_nothing_and_warns_once(
    aws_env, closed_port_url, capsys
):
    aws_env(closed_port_url)
    settings = _settings()
    log = logging.getLogger("payments")
    configure_logging(settings, cloudwatch=False)
    without_cloudwatch = _log_500(log)

    started = time.perf_counter()
    configure_logging(settings)
    assert time.perf_counter() - started < 0.5
    with_cloudwatch = _log_500(log)
    # Two set-up attempts (each a refused call) have failed, well after the first warning.
    wait_for(lambda: cloudwatch_handler().monitor.failures >= 4, 15, "set-up retries")
    shutdown_logging(timeout=2)

    assert with_cloudwatch < without_cloudwatch * 5 + 0.5
    entries = json_lines(capsys.readouterr().err)
    assert sum(1 for e in entries if e["message"].startswith("record ")) == 1000
    warnings = [e for e in entries if e["level"] == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0]["message"].startswith("CloudWatch log delivery is failing")


@pytest.mark.parametrize("endpoint", ["closed_port_url", "hanging_url"])
def test_shutdown_returns_within_its_timeout_when_cloudwatch_is_unreachable(
    aws_env, endpoint, request
):
    aws_env(request.getfixturevalue(endpoint))
    configure_logging(_settings())
    log = logging.getLogger("payments")
    for number in range(100):
        log.info("record %d", number)

    started = time.monotonic()
    shutdown_logging(timeout=1.0)
    assert time.monotonic() - started < 1.5


def test_logs_of_the_delivery_machinery_are_not_shipped(cloudwatch, logs_client, capsys):
    configure_logging(cloudwatch.with_overrides(log_level="DEBUG"))
    for number in range(3):
        logging.getLogger("payments").debug("record %d", number)
    shutdown_logging(timeout=10)

    stderr_loggers = {e["logger"] for e in json_lines(capsys.readouterr().err)}
    assert "botocore.endpoint" in stderr_loggers  # the delivery threads did log
    (events,) = read_events(logs_client, cloudwatch.cloudwatch_log_group).values()
    assert [e["message"] for e in events] == ["record 0", "record 1", "record 2"]


def test_records_queued_during_an_outage_arrive_when_cloudwatch_recovers(
    aws_env, closed_port_url, capsys
):
    aws_env(closed_port_url)
    settings = _settings()
    configure_logging(settings)
    log = logging.getLogger("payments")
    log.info("during the outage")
    wait_for(lambda: cloudwatch_handler().monitor.failing, 10, "the outage to be noticed")

    with MotoServer(port=int(closed_port_url.rsplit(":", 1)[1])) as late_server:
        wait_for(lambda: not cloudwatch_handler().monitor.failing, 20, "the recovery")
        log.info("after the recovery")
        shutdown_logging(timeout=10)
        client = boto3.client("logs", endpoint_url=late_server.url)
        (events,) = read_events(client, settings.cloudwatch_log_group).values()

    assert [e["message"] for e in events] == ["during the outage", "after the recovery"]
    status = [e for e in json_lines(capsys.readouterr().err) if e["logger"] == "cloudwatch_logging"]
    assert [e["level"] for e in status] == ["WARNING", "INFO"]
    assert status[1]["message"].startswith("CloudWatch log delivery recovered")


def _wait_for_exit(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("forked worker did not exit")
        time.sleep(0.05)


@pytest.mark.parametrize("master_had_cloudwatch", [False, True])
def test_forked_worker_logs_to_a_stream_of_its_own(cloudwatch, logs_client, master_had_cloudwatch):
    group = cloudwatch.cloudwatch_log_group
    configure_logging(cloudwatch, cloudwatch=master_had_cloudwatch)
    master = logging.getLogger("master")
    if master_had_cloudwatch:
        master.info("master before fork")
        # Fork once the master's handler has finished its start-up calls.
        wait_for(
            lambda: logs_client.describe_log_groups(logGroupNamePrefix=group)["logGroups"],
            10,
            "the master's handler to create the group",
        )
    else:
        assert "cloudwatch-logs" not in [t.name for t in threading.enumerate()]

    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            start_worker_logging(cloudwatch)
            logging.getLogger("worker").info("hello from worker %d", os.getpid())
            shutdown_logging(timeout=10)
            code = 0
        finally:
            os._exit(code)
    assert _wait_for_exit(pid, 20) == 0
    master.info("master after fork")
    shutdown_logging(timeout=10)

    streams = read_events(logs_client, group)
    (worker_stream,) = [name for name in streams if f"-{pid}-" in name]
    assert worker_stream.startswith(f"{socket.gethostname()}-{pid}-")
    messages = [e["message"] for e in streams[worker_stream]]
    assert f"hello from worker {pid}" in messages
    assert not [m for m in messages if m.startswith("master")]
    master_streams = [name for name in streams if f"-{os.getpid()}-" in name]
    if master_had_cloudwatch:
        (master_stream,) = master_streams
        master_messages = [e["message"] for e in streams[master_stream]]
        assert "master after fork" in master_messages
        assert f"hello from worker {pid}" not in master_messages
    else:
        assert master_streams == []


GUNICORN_CONF = """
from logging_setup import shutdown_logging, start_worker_logging
from settings import get_settings

bind = "127.0.0.1:0"
workers = 2
preload_app = True  # the app configures logging at import, in the master
logger_class = "gunicorn_logging.GunicornJsonLogger"
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s "%({authorization}i)s"'

def post_fork(server, worker):
    start_worker_logging(get_settings())

def worker_exit(server, worker):
    shutdown_logging()
"""

WSGI_APP = """
import logging

from logging_setup import configure_logging
from settings import get_settings

configure_logging(get_settings())  # what an app factory does; a no-op in the master

def app(environ, start_response):
    logging.getLogger("test_app").info("handled %s", environ["QUERY_STRING"])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


@pytest.mark.gunicorn
def test_gunicorn_logs_json_and_each_worker_ships_its_own_stream(
    aws_env, moto_server, logs_client, tmp_path
):
    settings = _settings()
    (tmp_path / "gunicorn_logging_conf.py").write_text(GUNICORN_CONF)
    (tmp_path / "logging_test_app.py").write_text(WSGI_APP)
    env = {
        **os.environ,
        **aws_env(moto_server.url),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}",
        "CLOUDWATCH_LOG_GROUP": settings.cloudwatch_log_group,
        "PAYMENT_API_KEY": PROVIDER_KEY,
        "API_KEYS": INBOUND_KEY,
    }
    stderr_path = tmp_path / "gunicorn.err"
    with open(stderr_path, "wb") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn_logging_conf.py"]
            + ["logging_test_app:app"],
            cwd=tmp_path,
            env=env,
            stdout=stderr,
            stderr=subprocess.STDOUT,
        )
    try:
        listening = re.compile(r"Listening at: (http://127\.0\.0\.1:\d+)")
        wait_for(lambda: listening.search(stderr_path.read_text()), 20, "gunicorn to listen")
        wait_for(lambda: stderr_path.read_text().count("Booting worker") == 2, 20, "workers")
        url = listening.search(stderr_path.read_text()).group(1)
        for _ in range(4):
            request = urllib.request.Request(
                f"{url}/?card=4242424242424242&order={ORDER_ID}",
                headers={"Authorization": f"Bearer {INBOUND_KEY}"},
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.read() == b"ok"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    output = stderr_path.read_text()
    entries = json_lines(output)  # every line gunicorn and the app wrote is JSON
    for secret in (INBOUND_KEY, "4242424242424242"):
        assert secret not in output
    access = [e for e in entries if e["logger"] == "gunicorn.access"]
    assert len(access) == 4
    assert (
        f'"GET /?card={REDACTED}&order={ORDER_ID} HTTP/1.1" 200 "Bearer {REDACTED}"'
        in (access[0]["message"])
    )
    worker_pids = [
        int(m) for e in entries for m in re.findall(r"Booting worker with pid: (\d+)", e["message"])
    ]
    assert len(worker_pids) == 2

    streams = read_events(logs_client, settings.cloudwatch_log_group)
    assert len(streams) == 2  # one per worker, none for the master
    for pid in worker_pids:
        (name,) = [n for n in streams if n.startswith(f"{socket.gethostname()}-{pid}-")]
        assert f"Worker exiting (pid: {pid})" in [e["message"] for e in streams[name]]
    handled = [e for events in streams.values() for e in events if e["logger"] == "test_app"]
    assert [e["message"] for e in handled] == [f"handled card={REDACTED}&order={ORDER_ID}"] * 4
