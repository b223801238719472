"""Scale-out: two gunicorn instances, one PostgreSQL, 1,000 payments, 10% duplicate keys.

The instances share nothing but the database (and Redis for the breaker in the second
run). Requests alternate between them from 16 client threads, duplicates shuffled in so
that some race their original on the other instance. The provider fails 10% of charge
attempts with a 503, so retries happen under the load too. Afterwards the sandbox
ledger has exactly one charge per key and our table matches it row for row.
"""

from __future__ import annotations

import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults.harness import assert_books_balance, new_key, payment_rows
from tests.support.redis_breaker import breaker_redis

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres, pytest.mark.slow]

PAYMENTS = 1000
DUPLICATES = PAYMENTS // 10
CLIENTS = 16
TIME_BOUND_S = 120
REDIS_URL = "redis://127.0.0.1:6379/12"  # an index of its own: the breaker keys are fixed


@pytest.fixture
def shared_breaker():
    with breaker_redis(REDIS_URL) as client:
        yield client


def workload(rng: random.Random) -> list[tuple[str, str]]:
    """(key, amount) for 900 distinct payments and 100 repeats of earlier ones, shuffled."""
    originals = [(new_key("scale"), f"{rng.randint(100, 99_999) / 100:.2f}") for _ in range(900)]
    repeats = [rng.choice(originals) for _ in range(DUPLICATES)]
    requests_ = originals + repeats
    rng.shuffle(requests_)
    return requests_


@pytest.mark.parametrize("breaker", ["per-worker", "redis"])
def test_two_instances_charge_each_key_exactly_once(breaker, sandbox, start_service, request):
    extra = {"GUNICORN_WORKERS": 2, "PAYMENT_BREAKER_FAILURES": 50}
    if breaker == "redis":
        redis_client = request.getfixturevalue("shared_breaker")
        extra["REDIS_URL"] = REDIS_URL
    first = start_service(**extra)
    services = [first, start_service(database_url=first.database_url, **extra)]
    sandbox.set_faults(error_rate=0.1, error_status=503)
    work = workload(random.Random(7))

    def pay(indexed):
        # A new connection per request: a kept-alive one that gunicorn closes after its
        # 2 s keep-alive while a client reuses it is a reset no server can prevent.
        index, (key, amount) = indexed
        return key, amount, services[index % 2].pay(key, amount)

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(pay, enumerate(work)))
    elapsed = time.monotonic() - started
    sandbox.set_faults()
    if breaker == "redis":  # the workers of both instances keep the breaker there
        ours = redis_client.client_id()
        others = [c for c in redis_client.client_list() if c["db"] == "12" and c["id"] != str(ours)]
        assert len(others) >= 4, others

    assert elapsed < TIME_BOUND_S
    statuses = {response.status_code for _, _, response in results}
    assert statuses <= {201, 409, 503}, statuses
    charged = {c["idempotency_key"]: c for c in sandbox.ledger()}
    for key, amount, response in results:
        if response.status_code == 201:  # originals and replays carry the one charge id
            assert response.json()["provider_charge_id"] == charged[key]["id"]
            assert response.json()["amount"] == amount
        else:
            assert response.json()["code"] in ("payment_in_progress", "provider_unavailable")
    rows = payment_rows(first.database_url)
    assert len(rows) == len({key for key, _ in work}) == 900
    assert sum(r["status"] == "succeeded" for r in rows) >= 850
    assert_books_balance(first.database_url, sandbox)


def test_unreachable_redis_falls_back_to_per_worker_breakers(sandbox, start_service):
    """``REDIS_URL`` set but nothing listening: payments go on, each worker's own breaker
    takes over, and the fallback is logged once per worker, not once per payment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    service = start_service(REDIS_URL=f"redis://127.0.0.1:{port}/0", PAYMENT_BREAKER_FAILURES=2)
    assert [service.pay(new_key()).status_code for _ in range(10)] == [201] * 10
    sandbox.set_faults(error_rate=1.0, error_status=503)
    failures = [service.pay(new_key()).json()["code"] for _ in range(3)]
    assert failures == ["provider_unavailable", "provider_unavailable", "breaker_open"]
    fallbacks = [
        r
        for r in service.log_records()
        if r["message"].startswith("circuit breaker: Redis unavailable")
    ]
    assert len(fallbacks) == 1 and fallbacks[0]["level"] == "WARNING"
