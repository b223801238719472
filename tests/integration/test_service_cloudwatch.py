"""The real service under gunicorn logging to CloudWatch (a real moto server process).

The logging module's own tests drive it directly; these prove the wiring end to end:
the incident text of a real provider timeout arrives in CloudWatch with its request and
payment ids, in the stream of the worker that served it; secrets in a real request leave
no trace; a graceful stop loses nothing; an unreachable CloudWatch costs requests nothing.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid

import boto3
import pytest
import requests

import database_config
from tests.support.gunicorn import GunicornProcess
from tests.support.moto import MotoServer

pytestmark = [pytest.mark.gunicorn, pytest.mark.postgres]

API_KEY = "cloudwatch-test-inbound-key-0123"
PROVIDER_KEY = "sk_sandbox_local"  # the sandbox's default key; must never be logged
CARD = "4242 4242 4242 4242"
TIMEOUT_TEXT = "Payment service connection failed - timeout after 300ms"


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        yield server


@pytest.fixture
def database(tmp_path):
    url = f"sqlite:///{tmp_path / 'payments.db'}"
    database_config.run_migrations(url)
    return url


def aws(endpoint: str, tmp_path) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }


def service_env(sandbox, database, endpoint, tmp_path, group=None, **extra) -> dict[str, str]:
    env = {
        "DATABASE_URL": database,
        "PAYMENT_API_URL": sandbox.url,
        "API_KEYS": API_KEY,
        "GUNICORN_WORKERS": "2",
        "GUNICORN_THREADS": "4",
        "PAYMENT_READ_TIMEOUT": "0.3",
        "PAYMENT_CONNECT_TIMEOUT": "0.3",
        "PAYMENT_DEADLINE": "1",
        "PAYMENT_MAX_RETRIES": "0",
        **aws(endpoint, tmp_path),
        **{k: str(v) for k, v in extra.items()},
    }
    if group:
        env["CLOUDWATCH_LOG_GROUP"] = group
    return env


def pay(url: str, body: dict | None = None, **headers):
    return requests.post(
        f"{url}/v1/payments",
        json=body or {"amount": "10.00", "currency": "USD"},
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "Idempotency-Key": f"order-{uuid.uuid4().hex}",
            **headers,
        },
        timeout=30,
    )


def events_by_stream(endpoint: str, group: str, tmp_path) -> dict[str, list[dict]]:
    client = boto3.client(
        "logs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    streams = {}
    for stream in client.describe_log_streams(logGroupName=group)["logStreams"]:
        name = stream["logStreamName"]
        page = client.get_log_events(logGroupName=group, logStreamName=name, startFromHead=True)
        streams[name] = [json.loads(e["message"]) for e in page["events"]]
    return streams


def worker_pids(stderr: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", stderr)]


def test_provider_timeout_reaches_cloudwatch_with_its_ids_in_the_workers_stream(
    sandbox, database, moto, tmp_path
):
    group = f"payments-{uuid.uuid4().hex[:8]}"
    env = service_env(sandbox, database, moto.url, tmp_path, group)
    sandbox.set_faults(hang=True)
    with GunicornProcess(env) as server:
        response = pay(server.url, **{"X-Request-ID": "req-timeout-1"})
        assert response.status_code == 202 and response.json()["status"] == "unknown"
        payment_id = response.json()["id"]
        sandbox.set_faults()
        pids = worker_pids(server.stderr)
    # stopped gracefully: each worker flushed its stream on exit
    streams = events_by_stream(moto.url, group, tmp_path)
    timeouts = [
        (name, e)
        for name, events in streams.items()
        for e in events
        if e["message"] == TIMEOUT_TEXT
    ]
    assert len(timeouts) == 1
    name, record = timeouts[0]
    assert record["level"] == "ERROR"
    assert record["request_id"] == "req-timeout-1" and record["payment_id"] == payment_id
    host = socket.gethostname()
    assert any(name.startswith(f"{host}-{pid}-") for pid in pids)
    assert len(streams) == len(pids) == 2  # one stream per worker, none for the master


def test_secrets_in_a_request_leave_no_trace_in_cloudwatch_or_stderr(
    sandbox, database, moto, tmp_path
):
    group = f"payments-{uuid.uuid4().hex[:8]}"
    env = service_env(sandbox, database, moto.url, tmp_path, group, LOG_LEVEL="DEBUG")
    body = {
        "amount": "10.00",
        "currency": "USD",
        "description": f"card {CARD}",
        "metadata": {"card_number": CARD.replace(" ", ""), "cvv": "123", "note": CARD},
    }
    # Places that do reach the logs: the request line (access log), the Referer (access
    # log), and the request id (bound into every record of the request).
    leaky = {
        "Referer": f"https://shop.example/checkout?pan={CARD}&auth=Bearer {API_KEY}",
        "X-Request-ID": CARD.replace(" ", ""),
    }
    with GunicornProcess(env) as server:
        assert pay(server.url, body, **leaky).status_code == 201
        bad = {**body, "amount": CARD}  # invalid, and carrying the same secrets
        assert pay(server.url, bad, **leaky).status_code == 422
        response = requests.post(
            f"{server.url}/v1/payments?card={CARD.replace(' ', '')}",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}", **leaky},
            timeout=30,
        )
        assert response.status_code in (201, 400, 422)
        stderr = server.stderr
    shipped = json.dumps(events_by_stream(moto.url, group, tmp_path))
    for text in (stderr, shipped):
        for secret in (CARD, CARD.replace(" ", ""), API_KEY, PROVIDER_KEY):
            assert secret not in text
    assert "Bearer " not in shipped.replace("Bearer [REDACTED]", "")
    assert "[REDACTED]" in stderr and "[REDACTED]" in shipped  # they got there, scrubbed


def test_graceful_stop_loses_no_record(sandbox, database, moto, tmp_path):
    group = f"payments-{uuid.uuid4().hex[:8]}"
    env = service_env(sandbox, database, moto.url, tmp_path, group)
    with GunicornProcess(env) as server:
        ids = [pay(server.url, **{"X-Request-ID": f"req-{i}"}).json()["id"] for i in range(20)]
        stderr_before_stop = server.stderr
    logged = [json.loads(line) for line in stderr_before_stop.splitlines() if line.startswith("{")]
    access = [e for e in logged if e["logger"] == "gunicorn.access"]
    shipped = [e for events in events_by_stream(moto.url, group, tmp_path).values() for e in events]
    shipped_access = [e for e in shipped if e["logger"] == "gunicorn.access"]
    assert len(ids) == 20
    # every access line written before SIGTERM is in CloudWatch after the stop
    assert {e["message"] for e in access} <= {e["message"] for e in shipped_access}


def test_unreachable_cloudwatch_costs_requests_nothing_and_warns_once(
    sandbox, database, tmp_path, unused_port
):
    closed = f"http://127.0.0.1:{unused_port}"

    def run(group):
        env = service_env(sandbox, database, closed, tmp_path, group, GUNICORN_WORKERS=1)
        with GunicornProcess(env) as server:
            for _ in range(10):  # warm up
                assert pay(server.url).status_code == 201
            started = time.monotonic()
            for _ in range(200):
                assert pay(server.url).status_code == 201
            return time.monotonic() - started, server.stderr

    baseline, _ = run(None)
    with_cloudwatch, stderr = run("payments-unreachable")
    assert with_cloudwatch < baseline * 1.5 + 1.0  # generous: noise, not a slowdown
    logged = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    warnings = [e for e in logged if e["level"] == "WARNING" and "CloudWatch" in e["message"]]
    assert len(warnings) == 1  # one for the outage, not one per record
    assert warnings[0]["message"].startswith("CloudWatch log delivery is failing")
