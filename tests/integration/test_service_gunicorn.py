"""The service under real gunicorn processes, PostgreSQL and the sandbox provider.

What only a real server shows: idempotency across instances sharing one database, the
incident replay (a provider that hangs every charge must not take health checks or the
database pool with it), graceful shutdown with payments in flight, and metrics summed
over workers.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import database_config
from tests.support.gunicorn import GunicornError, GunicornProcess
from tests.support.postgres import temporary_database
from tests.support.redis_breaker import BREAKER_OPEN_KEY, breaker_redis
from tests.support.sandbox import SandboxProcess

pytestmark = [pytest.mark.gunicorn, pytest.mark.postgres]

API_KEY = "gunicorn-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
REDIS_DB_URL = "redis://127.0.0.1:6379/11"  # an index of its own: the breaker keys are fixed
EXHAUSTED = "connection pool exhausted"
CHECKED_OUT = 'db_pool_connections{state="checked_out"}'


@pytest.fixture(scope="module")
def sandbox():
    with SandboxProcess() as process:
        yield process


@pytest.fixture
def database_url(sandbox):
    with temporary_database() as url:
        database_config.run_migrations(url)
        yield url
    sandbox.reset()


def service_env(sandbox, database_url, **extra) -> dict[str, str]:
    env = {
        "DATABASE_URL": database_url,
        "PAYMENT_API_URL": sandbox.url,
        "API_KEYS": API_KEY,
        "GUNICORN_WORKERS": "2",
        "GUNICORN_THREADS": "8",
    }
    env.update({name: str(value) for name, value in extra.items()})
    return env


def post_payment(url: str, key: str, amount: str = "10.00", timeout: float = 30):
    return requests.post(
        f"{url}/v1/payments",
        json={"amount": amount, "currency": "USD"},
        headers={**AUTH, "Idempotency-Key": key},
        timeout=timeout,
    )


def new_key() -> str:
    return f"order-{uuid.uuid4().hex}"


def payment_statuses(database_url: str) -> dict[str, int]:
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT status, count(*) FROM payments GROUP BY 1"))
            return dict(rows.all())
    finally:
        engine.dispose()


def metric(text_: str, prefix: str) -> float | None:
    """Sum of the samples whose line starts with ``prefix``; ``None`` if there are none."""
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text_.splitlines() if line.startswith(prefix)
    ]
    return sum(values) if values else None


# --------------------------------------------------------------------------- idempotency


def test_idempotency_holds_across_two_instances_sharing_the_database(sandbox, database_url):
    env = service_env(sandbox, database_url, GUNICORN_WORKERS=1, GUNICORN_THREADS=4)
    key = new_key()
    with GunicornProcess(env) as first, GunicornProcess(env) as second:
        created = post_payment(first.url, key)
        replayed = post_payment(second.url, key)
        changed = post_payment(second.url, key, amount="11.00")
    assert created.status_code == 201
    assert replayed.status_code == 201
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json() == created.json()
    assert changed.status_code == 422
    assert changed.headers["Content-Type"] == "application/problem+json"
    assert changed.json()["code"] == "idempotency_key_reused"
    assert [c["idempotency_key"] for c in sandbox.ledger()] == [key]


def test_gunicorn_refuses_to_start_without_api_keys(sandbox, database_url):
    env = service_env(sandbox, database_url, API_KEYS="", GUNICORN_WORKERS=1)
    with pytest.raises(GunicornError, match="API_KEYS is empty"):
        GunicornProcess(env).start()


# --------------------------------------------------------------------------- incident replay


class HealthProbe:
    """Polls /healthz and /readyz in a thread, recording (path, status, seconds)."""

    def __init__(self, url: str, interval: float = 0.05):
        self.url, self.interval = url, interval
        self.samples: list[tuple[str, int | None, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in ("/healthz", "/readyz"):
                started = time.perf_counter()
                try:
                    status = requests.get(self.url + path, timeout=2).status_code
                except requests.RequestException:
                    status = None
                self.samples.append((path, status, time.perf_counter() - started))
            self._stop.wait(self.interval)


@pytest.fixture
def redis_breaker_db():
    """A Redis index of its own for the shared breaker, without its keys before and after."""
    with breaker_redis(REDIS_DB_URL) as client:
        yield client


def wait_for_metric(url: str, prefix: str, value: float, timeout: float) -> float | None:
    """Scrape /metrics until the samples under ``prefix`` sum to ``value``; the last sum."""
    deadline = time.monotonic() + timeout
    while True:
        seen = metric(requests.get(url + "/metrics", timeout=2).text, prefix)
        if seen == value or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def wait_for_fast_failures(url: str, in_a_row: int, timeout: float) -> list[tuple]:
    """Send payments one by one until ``in_a_row`` consecutive ones are breaker-open 503s.

    Per-worker breakers open independently: a worker that saw few of the hung calls may
    still let a payment through (it hangs until the deadline and counts as a failure).
    Returns every (status, code, Retry-After, seconds) seen, for the caller to judge.
    """
    seen, streak, deadline = [], 0, time.monotonic() + timeout
    while streak < in_a_row:
        assert time.monotonic() < deadline, f"breaker never failed fast: {seen[-10:]}"
        started = time.perf_counter()
        response = post_payment(url, new_key())
        elapsed = time.perf_counter() - started
        code = response.json().get("code")
        seen.append((response.status_code, code, response.headers.get("Retry-After"), elapsed))
        streak = streak + 1 if code == "breaker_open" else 0
    return seen


def wait_for_recovery(url: str, in_a_row: int, timeout: float) -> None:
    """Send payments until ``in_a_row`` consecutive ones succeed (every worker recovered)."""
    streak, deadline = 0, time.monotonic() + timeout
    while streak < in_a_row:
        assert time.monotonic() < deadline, "payments did not recover after the breaker reset"
        if post_payment(url, new_key()).status_code == 201:
            streak += 1
        else:
            streak = 0
            time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("shared_breaker", [False, True], ids=["per-worker", "redis"])
def test_hanging_provider_keeps_health_fast_and_breaker_fails_fast(
    sandbox, database_url, request, shared_breaker
):
    redis_client = request.getfixturevalue("redis_breaker_db") if shared_breaker else None
    extra = {"REDIS_URL": REDIS_DB_URL} if shared_breaker else {}
    env = service_env(
        sandbox,
        database_url,
        GUNICORN_THREADS=32,  # outbound pool 24 per worker: the burst is not queued
        PAYMENT_DEADLINE=2,
        PAYMENT_CONNECT_TIMEOUT=0.5,
        PAYMENT_BREAKER_FAILURES=3,
        PAYMENT_BREAKER_RESET=3,
        **extra,
    )
    with GunicornProcess(env) as server:
        with ThreadPoolExecutor(8) as pool:  # warm both workers: pools, caches, sessions
            warm = pool.map(lambda _: post_payment(server.url, new_key()), range(16))
            assert {r.status_code for r in warm} == {201}
        sandbox.set_faults(hang=True)
        with HealthProbe(server.url) as probe:
            with ThreadPoolExecutor(40) as pool:
                futures = []
                for _ in range(40):  # arriving 10 ms apart; all 40 then hang together
                    futures.append(pool.submit(post_payment, server.url, new_key()))
                    time.sleep(0.01)
                sandbox.wait_for_state(lambda state: state["hung"] >= 24, timeout=1.5)
                held = wait_for_metric(server.url, CHECKED_OUT, 0, timeout=1.5)
            hung = [future.result() for future in futures]
            assert held == 0  # with 24+ payments waiting on the provider
            assert {r.status_code for r in hung} <= {202, 503}
            assert any(r.status_code == 202 and r.json()["status"] == "unknown" for r in hung)
            if redis_client is not None:  # one breaker for every worker, kept in Redis
                assert redis_client.exists(BREAKER_OPEN_KEY)

            seen = wait_for_fast_failures(server.url, in_a_row=20, timeout=20)
            fast = [s for s in seen if s[1] == "breaker_open"]
            assert {status for status, *_ in seen} <= {202, 503}
            assert all(int(retry_after) >= 1 for _, _, retry_after, _ in fast)
            elapsed = sorted(s[3] for s in fast)
            assert elapsed[len(elapsed) // 2] < 0.05, f"median breaker-open answer {elapsed}"
            assert elapsed[-1] < 0.25, f"a breaker-open answer waited: {elapsed[-1]:.3f} s"

            sandbox.set_faults()
            wait_for_recovery(server.url, in_a_row=6, timeout=15)
    assert EXHAUSTED not in server.stderr
    assert {status for _, status, _ in probe.samples} == {200}
    slowest = max(probe.samples, key=lambda sample: sample[2])
    assert slowest[2] < 0.2, f"{slowest[0]} took {slowest[2] * 1000:.0f} ms"
    assert len(probe.samples) > 40


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.slow
def test_sigterm_lets_in_flight_payments_finish(sandbox, database_url):
    sandbox.set_faults(latency_ms=1000)
    server = GunicornProcess(service_env(sandbox, database_url)).start()
    try:
        with ThreadPoolExecutor(6) as pool:
            in_flight = [pool.submit(post_payment, server.url, new_key()) for _ in range(6)]
            sandbox.wait_for_state(lambda state: state["requests"].get("POST /v1/charges", 0) >= 6)
            server.signal()
            responses = [future.result() for future in in_flight]
        assert server.wait() == 0
    finally:
        server.stop()
    assert [r.status_code for r in responses] == [201] * 6
    assert payment_statuses(database_url) == {"succeeded": 6}


def test_metrics_sum_requests_over_workers_and_show_pool_and_breaker(
    sandbox, database_url, tmp_path
):
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"stale garbage from an earlier run")
    env = service_env(sandbox, database_url, DB_POOL_SIZE=3, PROMETHEUS_MULTIPROC_DIR=metrics_dir)
    with GunicornProcess(env) as server:
        assert not (metrics_dir / "counter_1.db").exists()
        served, deadline = 0, time.monotonic() + 15
        with ThreadPoolExecutor(8) as pool:
            while True:  # until both workers have answered (each publishes pool size 3)
                statuses = pool.map(
                    lambda _: requests.get(server.url + "/openapi.json", timeout=5).status_code,
                    range(8),
                )
                assert set(statuses) == {200}
                served += 8
                scrape = requests.get(server.url + "/metrics", timeout=5).text
                if metric(scrape, 'db_pool_connections{state="size"}') == 6:
                    break
                assert time.monotonic() < deadline, "one worker never served a request"
        scrape = requests.get(server.url + "/metrics", timeout=5).text
    requests_total = 'http_requests_total{method="GET",route="/openapi.json",status="200"}'
    assert metric(scrape, requests_total) == served
    assert metric(scrape, 'db_pool_connections{state="checked_out"}') is not None
    assert metric(scrape, 'db_pool_connections{state="overflow"}') == 0
    assert metric(scrape, "payment_breaker_state ") == 0
