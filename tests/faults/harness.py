"""The fault suite's machinery: a service under test, its books, its logs, hostile ports.

Every scenario runs the real thing: a gunicorn master and workers on a loopback port,
a PostgreSQL database of its own (migrated, dropped afterwards) and the sandbox provider
process. After a scenario the books must balance: the payments we store as
``succeeded`` are exactly the charges the sandbox made, key for key, amount for amount,
charge id for charge id.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import database_config
from tests.support.gunicorn import SCRUBBED, GunicornProcess
from tests.support.postgres import SERVER_URL, temporary_database

ROOT = Path(__file__).resolve().parents[2]
#: Distinctive secrets, so a leak into a response or a log line is found by grep.
API_KEY = f"inbound-faults-{secrets.token_hex(12)}"
PROVIDER_KEY = f"sk_faults_{secrets.token_hex(12)}"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: Small timeouts so every fault resolves in a couple of seconds, and one worker whose
#: log and breaker are the only ones involved.
BASE_ENV = {
    "API_KEYS": API_KEY,
    "PAYMENT_API_KEY": PROVIDER_KEY,
    "GUNICORN_WORKERS": "1",
    "GUNICORN_THREADS": "4",
    "PAYMENT_CONNECT_TIMEOUT": "0.5",
    "PAYMENT_READ_TIMEOUT": "0.5",
    "PAYMENT_DEADLINE": "3",
    "PAYMENT_MAX_RETRIES": "2",
    "PAYMENT_BACKOFF_FACTOR": "0.05",
    "PAYMENT_BREAKER_FAILURES": "5",
    "PAYMENT_BREAKER_RESET": "30",
    "DB_POOL_SIZE": "4",
    "DB_MAX_OVERFLOW": "0",
    "DB_POOL_TIMEOUT": "2",
}
CHARGES = "POST /v1/charges"
REFUNDS = "POST /v1/refunds"
SERVICE_APPLICATION_NAME = database_config.APPLICATION_NAME


def new_key(prefix: str = "order") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def provider_calls(sandbox) -> int:
    """Charge requests the sandbox received (its own counter)."""
    return sandbox.state()["requests"].get(CHARGES, 0)


def refund_calls(sandbox) -> int:
    """Refund requests the sandbox received (its own counter)."""
    return sandbox.state()["requests"].get(REFUNDS, 0)


def refund_at_sandbox(sandbox, charge_id: str, amount_minor: int, key: str) -> dict:
    """Refund ``charge_id`` straight through the sandbox's API, behind the service's back
    (as an operator in the provider's dashboard would): the charge then has less left."""
    response = requests.post(
        f"{sandbox.url}/v1/refunds",
        json={"charge": charge_id, "amount": amount_minor},
        headers={"Authorization": f"Bearer {PROVIDER_KEY}", "Idempotency-Key": key},
        timeout=10,
    )
    assert response.status_code in (200, 201), response.text
    return response.json()


# --------------------------------------------------------------------------- the database


def query(database_url: str, sql: str, **params) -> list[dict]:
    """Run one statement on a connection of our own (never the service's pool)."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(sql), params)
            return [dict(row._mapping) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def payment_rows(database_url: str) -> list[dict]:
    return query(database_url, "SELECT * FROM payments ORDER BY created_at")


def payment_by_key(database_url: str, key: str) -> dict | None:
    rows = query(database_url, "SELECT * FROM payments WHERE idempotency_key = :key", key=key)
    return rows[0] if rows else None


def refund_rows(database_url: str) -> list[dict]:
    """Every refund, with its payment's charge id (``provider_charge_id``)."""
    return query(
        database_url,
        "SELECT r.*, p.provider_charge_id FROM refunds r JOIN payments p ON p.id = r.payment_id "
        "ORDER BY r.created_at",
    )


def refund_by_key(database_url: str, key: str) -> dict | None:
    rows = query(database_url, "SELECT * FROM refunds WHERE idempotency_key = :key", key=key)
    return rows[0] if rows else None


def refund_attempt_count(database_url: str, refund_id: str) -> int:
    rows = query(
        database_url,
        "SELECT count(*) AS n FROM refund_attempts WHERE refund_id = :id AND kind = 'refund'",
        id=refund_id,
    )
    return rows[0]["n"]


def attempt_count(database_url: str, payment_id: str) -> int:
    rows = query(
        database_url,
        "SELECT count(*) AS n FROM payment_attempts WHERE payment_id = :id AND kind = 'charge'",
        id=payment_id,
    )
    return rows[0]["n"]


def service_backends(database_url: str) -> list[dict]:
    """The service's sessions on this database, as PostgreSQL sees them."""
    name = database_url.rsplit("/", 1)[1]
    return query(
        f"{SERVER_URL}/postgres",
        "SELECT pid, state, wait_event_type FROM pg_stat_activity "
        "WHERE datname = :db AND application_name = :app",
        db=name,
        app=SERVICE_APPLICATION_NAME,
    )


def terminate_service_backends(database_url: str) -> int:
    """``pg_terminate_backend`` every session the service has open on this database."""
    name = database_url.rsplit("/", 1)[1]
    rows = query(
        f"{SERVER_URL}/postgres",
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
        "WHERE datname = :db AND application_name = :app",
        db=name,
        app=SERVICE_APPLICATION_NAME,
    )
    return rows[0]["n"]


def assert_books_balance(database_url: str, sandbox, *, settled: bool = True) -> dict:
    """Our succeeded payments are exactly the sandbox's succeeded charges.

    Row for row: the same idempotency keys, amounts, currencies and charge ids; one
    charge per key and per transaction id; equal totals per currency. ``settled``
    also requires that nothing is left ``pending`` or ``unknown``. Returns the totals.
    """
    rows = payment_rows(database_url)
    ledger = sandbox.ledger()
    per_key = Counter(c["idempotency_key"] for c in ledger)
    per_transaction = Counter(c["transaction_id"] for c in ledger)
    assert max(per_key.values(), default=1) == 1, "a key was charged twice"
    assert max(per_transaction.values(), default=1) == 1, "a transaction was charged twice"

    charged = {c["idempotency_key"]: c for c in ledger if c["status"] == "succeeded"}
    ours = {r["idempotency_key"]: r for r in rows if r["status"] == "succeeded"}
    assert sorted(ours) == sorted(charged), (
        f"charged but not succeeded here: {sorted(set(charged) - set(ours))}; "
        f"succeeded here but never charged: {sorted(set(ours) - set(charged))}"
    )
    for key, row in ours.items():
        charge = charged[key]
        assert (row["amount_minor"], row["currency"], row["provider_charge_id"]) == (
            charge["amount"],
            charge["currency"],
            charge["id"],
        ), key
    totals: Counter[str] = Counter()
    for row in ours.values():
        totals[row["currency"]] += row["amount_minor"]
    assert dict(totals) == sandbox.state()["succeeded_total_minor"]
    if settled:
        open_ = [r["idempotency_key"] for r in rows if r["status"] in ("pending", "unknown")]
        assert not open_, f"left unsettled: {open_}"
    return dict(totals)


def assert_refund_books_balance(
    database_url: str, sandbox, *, settled: bool = True, outside=()
) -> dict:
    """Our refunds are exactly the sandbox's refunds, charge by charge.

    Row for row, our ``succeeded`` refunds are the sandbox's succeeded refunds (our refund
    id as its idempotency key, amount, currency, refund id, charge id); no key was refunded
    twice; each payment's ``amount_refunded_minor`` is the sum of its succeeded refunds here
    and of its charge's succeeded refunds at the sandbox, and its ``refund_reserved_minor``
    the sum of its ``pending``, ``unknown`` and ``succeeded`` refunds; equal totals per
    currency (``/_sandbox/state`` ``refunded_total_minor``). ``outside``: keys of refunds
    made at the sandbox directly (:func:`refund_at_sandbox`), which we cannot know about.
    ``settled`` also requires that no refund is left ``pending`` or ``unknown`` and, once
    the sandbox has none pending either, that each charge's ``amount_refunded`` (which
    counts pending refunds) is ours plus what was refunded outside. Returns the totals.
    """
    outside = set(outside)
    books = sandbox.books()
    charges = {c["id"]: c for c in books["data"]}
    per_key = Counter(r["idempotency_key"] for r in books["refunds"])
    assert max(per_key.values(), default=1) == 1, "a refund key was refunded twice"
    theirs = [r for r in books["refunds"] if r["idempotency_key"] not in outside]
    rows = refund_rows(database_url)

    # The provider knows a refund by our refund id (refunds.provider_key), not the caller's key.
    refunded = {r["idempotency_key"]: r for r in theirs if r["status"] == "succeeded"}
    ours = {r["id"]: r for r in rows if r["status"] == "succeeded"}
    assert sorted(ours) == sorted(refunded), (
        f"refunded but not succeeded here: {sorted(set(refunded) - set(ours))}; "
        f"succeeded here but never refunded: {sorted(set(ours) - set(refunded))}"
    )
    for key, row in ours.items():
        refund = refunded[key]
        assert (
            row["amount_minor"],
            row["currency"],
            row["provider_refund_id"],
            row["provider_charge_id"],
        ) == (refund["amount"], refund["currency"], refund["id"], refund["charge"]), key

    for payment in payment_rows(database_url):
        mine = [r for r in rows if r["payment_id"] == payment["id"]]
        succeeded = sum(r["amount_minor"] for r in mine if r["status"] == "succeeded")
        held = sum(
            r["amount_minor"] for r in mine if r["status"] in ("pending", "unknown", "succeeded")
        )
        charge_id = payment["provider_charge_id"]
        at_sandbox = sum(
            r["amount"] for r in refunded.values() if r["charge"] == charge_id and charge_id
        )
        books_of = (payment["amount_refunded_minor"], succeeded, at_sandbox)
        assert books_of == (succeeded,) * 3, (payment["id"], "refunded here, ours, sandbox")
        assert payment["refund_reserved_minor"] == held, (payment["id"], "reserved", held)

    totals: Counter[str] = Counter()
    for row in ours.values():
        totals[row["currency"]] += row["amount_minor"]
    elsewhere: Counter[str] = Counter()
    for refund in books["refunds"]:
        if refund["idempotency_key"] in outside and refund["status"] == "succeeded":
            elsewhere[refund["currency"]] += refund["amount"]
    assert sandbox.state()["refunded_total_minor"] == dict(totals + elsewhere)

    if settled:
        open_ = [r["idempotency_key"] for r in rows if r["status"] in ("pending", "unknown")]
        assert not open_, f"refunds left unsettled: {open_}"
        if not [r for r in books["refunds"] if r["status"] == "pending"]:
            for payment in payment_rows(database_url):
                charge = charges.get(payment["provider_charge_id"])
                if charge is None:
                    continue
                outside_amount = sum(
                    r["amount"]
                    for r in books["refunds"]
                    if r["charge"] == charge["id"]
                    and r["idempotency_key"] in outside
                    and r["status"] == "succeeded"
                )
                assert charge["amount_refunded"] == (
                    payment["amount_refunded_minor"] + outside_amount
                ), payment["id"]
    return dict(totals)


# --------------------------------------------------------------------------- the service


class Service:
    """A running gunicorn serving the app, its database and the sandbox it charges."""

    def __init__(self, gunicorn: GunicornProcess, database_url: str, sandbox, env: dict):
        self.gunicorn = gunicorn
        self.database_url = database_url
        self.sandbox = sandbox
        self.env = env

    @property
    def url(self) -> str:
        return self.gunicorn.url

    def pay(
        self,
        key: str | None = None,
        amount: str = "10.00",
        *,
        payment_method: str = "card",
        currency: str = "USD",
        timeout: float = 30,
        session: requests.Session | None = None,
    ) -> requests.Response:
        """``POST /v1/payments`` with ``key`` as Idempotency-Key and a fresh request id."""
        headers = {**AUTH, "X-Request-ID": uuid.uuid4().hex}
        if key is not None:
            headers["Idempotency-Key"] = key
        body = {"amount": amount, "currency": currency, "payment_method": payment_method}
        send = session.post if session is not None else requests.post
        return send(f"{self.url}/v1/payments", json=body, headers=headers, timeout=timeout)

    def refund(
        self,
        payment_id: str,
        amount: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 30,
    ) -> requests.Response:
        """``POST /v1/payments/<id>/refunds`` (no ``amount``: the rest), ``key`` as its
        Idempotency-Key."""
        headers = {**AUTH, "X-Request-ID": uuid.uuid4().hex}
        if key is not None:
            headers["Idempotency-Key"] = key
        body = {} if amount is None else {"amount": amount}
        return requests.post(
            f"{self.url}/v1/payments/{payment_id}/refunds",
            json=body,
            headers=headers,
            timeout=timeout,
        )

    def get(self, path: str, timeout: float = 5) -> requests.Response:
        return requests.get(self.url + path, headers=AUTH, timeout=timeout)

    def stderr(self) -> str:
        """Everything the master and workers logged so far (also after they stopped)."""
        return self.gunicorn.stderr

    def log_records(self) -> list[dict]:
        """Every JSON line the master and workers wrote to stderr."""
        return parse_log(self.stderr())

    def logs_for(self, response: requests.Response) -> list[dict]:
        """The application's records for one request (gunicorn's access line left out)."""
        request_id = response.headers.get("X-Request-ID")
        return [
            r
            for r in self.log_records()
            if r.get("request_id") == request_id and r.get("logger") != "gunicorn.access"
        ]

    def worker_pids(self) -> list[int]:
        """Pids of every worker booted so far, from gunicorn's own log lines."""
        booted = re.findall(r"Booting worker with pid: (\d+)", self.stderr())
        return [int(pid) for pid in booted]

    def reconcile(self, older_than: float = 0, timeout: float = 60) -> dict:
        """``flask --app wsgi payments reconcile`` in a subprocess with the service's env."""
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env.update(self.env)
        completed = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "wsgi", "payments", "reconcile"]
            + ["--older-than", str(older_than)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert completed.returncode in (0, 1), completed.stderr[-2000:]
        return json.loads(completed.stdout.strip().splitlines()[-1])

    def settle(self, timeout: float = 30) -> None:
        """Reconcile until nothing is ``pending`` or ``unknown`` (a charge still in flight
        may be left alone by one run), failing after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.reconcile(older_than=0)
            rows = payment_rows(self.database_url)
            if not [r for r in rows if r["status"] in ("pending", "unknown")]:
                return
            assert time.monotonic() < deadline, "payments left unsettled by reconciliation"
            time.sleep(0.5)


def settle_refunds(service: Service, timeout: float = 30) -> dict:
    """Reconcile until no refund is ``pending`` or ``unknown`` (a refund still in flight is
    left alone by a run); the last run's refund report. Fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        report = service.reconcile(older_than=0)["refunds"]
        rows = refund_rows(service.database_url)
        if not [r for r in rows if r["status"] in ("pending", "unknown")]:
            return report
        assert time.monotonic() < deadline, f"refunds left unsettled by reconciliation: {rows}"
        time.sleep(0.5)


def parse_log(stderr: str) -> list[dict]:
    records = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def service_env(sandbox, database_url: str, provider_url: str | None = None, **extra) -> dict:
    env = {**BASE_ENV, "DATABASE_URL": database_url, "PAYMENT_API_URL": provider_url or sandbox.url}
    env.update({name: str(value) for name, value in extra.items()})
    return env


@contextmanager
def migrated_database() -> Iterator[str]:
    with temporary_database() as url:
        database_config.run_migrations(url)
        yield url


@contextmanager
def running_service(
    sandbox, database_url: str | None = None, provider_url: str | None = None, **extra
) -> Iterator[Service]:
    """A gunicorn on a fresh database (or ``database_url``); stopped before the drop."""
    with ExitStack() as stack:
        url = database_url or stack.enter_context(migrated_database())
        env = service_env(sandbox, url, provider_url, **extra)
        gunicorn = stack.enter_context(GunicornProcess(env))
        yield Service(gunicorn, url, sandbox, env)


# --------------------------------------------------------------------------- hostile ports


@contextmanager
def refusing_port() -> Iterator[str]:
    """A loopback URL where nothing listens: every connect is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


@contextmanager
def blackhole_port() -> Iterator[str]:
    """A loopback URL whose accept queue is full: SYNs are dropped, connects time out.

    The listener never accepts; ``listen(0)`` leaves room for one queued connection,
    which a filler takes. Linux then drops further SYNs (``tcp_abort_on_overflow`` is 0
    by default), so a client sees exactly what an unreachable host looks like.
    """
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.3)
            fillers.append(filler)
            try:
                filler.connect(address)
            except TimeoutError:
                break
        else:
            raise RuntimeError("could not fill the accept queue of the blackhole listener")
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def wait_until(predicate, timeout: float, interval: float = 0.02, message: str = ""):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {message}")
        time.sleep(interval)
