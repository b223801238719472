"""Refunds under provider faults, and a worker killed in the middle of one.

The refund lifecycle is the payment's (DESIGN.md section 4): a short transaction stores
the refund ``pending`` and reserves its amount on the payment row, the provider is asked
with no connection held, a short transaction stores the outcome. So each row of the
provider fault matrix (``test_provider_faults.py``) that applies to a refund is asserted
here for a refund: one fresh service, one 10.00 payment made while the provider is
healthy, then a 4.00 refund of it under the fault. Each row checks what we answer, what
we store, how often the sandbox was asked, what the payment holds (reserved / refunded)
right after, what reconciliation settles an unknown outcome to, what the same key gets
afterwards, and that the books balance at the end (``assert_refund_books_balance`` and
``assert_books_balance``).

``docs/RELIABILITY.md`` carries the table :func:`markdown_table` renders from ``ROWS``
(print it with ``python -m tests.faults.test_refund_faults``); a test keeps it current.
"""

from __future__ import annotations

import math
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
import requests

from reconciliation import in_flight_seconds
from tests.faults.harness import (
    ROOT,
    assert_books_balance,
    assert_refund_books_balance,
    new_key,
    payment_by_key,
    provider_calls,
    query,
    refund_at_sandbox,
    refund_attempt_count,
    refund_by_key,
    refund_calls,
    settle_refunds,
)
from tests.faults.test_crash_safety import SLOW_PROVIDER_ENV, kill_worker
from tests.faults.test_provider_faults import (
    TIMEOUT_LINE,
    failed_line,
    log_line,
    persistent,
    provider_url,
)

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres]

PAYMENT, REFUND = "10.00", "4.00"
REFUND_MINOR = 400


@dataclass(frozen=True)
class Row:
    """One provider fault and everything a refund under it must come to.

    ``stored`` is the refund's status (``failed: <failure_code>``; ``not stored`` when
    refused before a row was written); ``calls`` the refund requests the sandbox
    received; ``held`` the payment's (reserved, refunded) minor units right after the
    answer; ``log`` as in the payment matrix; ``settled`` what ``payments reconcile``
    makes of an unknown outcome. ``again`` is the answer to the same key sent to a
    healthy instance afterwards, ``again_replayed`` whether it was a replay and
    ``again_calls`` the refund requests it sent. ``refunded`` is the payment's refunded
    amount at the end; ``elsewhere`` an amount refunded at the sandbox directly before
    our refund. ``second_instance``: the refund is sent to another instance on the same
    database, with ``provider`` and ``env`` (the payment could not be made there).
    """

    fault: str
    status: int
    stored: str
    calls: int
    held: tuple[int, int]
    log: tuple[str, str, str] | None
    retry_after: str | None = None
    settled: str = ""
    again: int = 201
    again_replayed: bool = True
    again_calls: int = 0
    refunded: int = REFUND_MINOR
    elsewhere: int = 0
    faults: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    provider: str = "sandbox"  # or "refused", "blackhole"
    second_instance: bool = False
    payment_method: str = "card"
    failures_first: int = 0  # failed refunds (other keys) sent before the measured one


RESERVED = (REFUND_MINOR, 0)  # held for a refund that may have happened
REFUNDED = (REFUND_MINOR, REFUND_MINOR)
RELEASED = (0, 0)


def unknown_line(code: str, detail: str) -> tuple[str, str, str]:
    """The line an unknown refund logs (its start): what reconciliation will resolve."""
    return ("ERROR", "refunds", f"refund outcome unknown ({code}): {detail}")


def unavailable(status: int, attempts: int = 3, gave_up: str = "exhausted"):
    return failed_line(
        "provider_unavailable",
        f"provider unavailable: HTTP {status} after {attempts} attempt(s), gave up: {gave_up}",
    )


#: Sent again under its key: a refund that certainly failed is re-submitted (one request).
RESUBMITTED = {"again_replayed": False, "again_calls": 1}

ROWS = [
    Row("healthy provider", 201, "succeeded", 1, REFUNDED, None),
    Row("503 once, then healthy", 201, "succeeded", 2, REFUNDED, None, faults={"script": [503]}),
    Row(
        "connection reset before the refund",
        201,
        "succeeded",
        2,
        REFUNDED,
        None,
        faults={"script": ["reset"]},
    ),
    Row(
        "connection reset mid-response (after refunding)",
        201,
        "succeeded",
        2,
        REFUNDED,
        None,
        faults={"script": ["reset_mid_response"]},
    ),
    Row(
        "read timeout (provider takes 1 s, then refunds)",
        201,
        "succeeded",
        3,
        REFUNDED,
        TIMEOUT_LINE,
        faults={"latency_ms": 1000},
    ),
    Row(
        "hang after refunding (the retry is answered from the provider's idempotency store)",
        201,
        "succeeded",
        2,
        REFUNDED,
        TIMEOUT_LINE,
        faults={"hang_after_commit": True},
    ),
    Row(
        "connection refused",
        503,
        "failed: provider_unavailable",
        0,
        RELEASED,
        failed_line(
            "provider_unavailable", "payment provider unreachable: connect: NewConnectionError"
        ),
        retry_after="5",
        provider="refused",
        second_instance=True,
        **RESUBMITTED,
    ),
    Row(
        "connect timeout (accept queue full)",
        503,
        "failed: provider_unavailable",
        0,
        RELEASED,
        TIMEOUT_LINE,
        retry_after="5",
        provider="blackhole",
        second_instance=True,
        **RESUBMITTED,
    ),
    *[
        Row(
            f"{status} on every attempt",
            503,
            "failed: provider_unavailable",
            3,
            RELEASED,
            unavailable(status),
            retry_after="1",
            faults=persistent(status),
            **RESUBMITTED,
        )
        for status in (500, 503)
    ],
    Row(
        "429 with Retry-After: 1 on every attempt",
        503,
        "failed: provider_unavailable",
        3,
        RELEASED,
        unavailable(429),
        retry_after="1",
        faults=persistent(429, retry_after=1),
        **RESUBMITTED,
    ),
    Row(
        "429 with Retry-After: 30 (beyond the deadline)",
        503,
        "failed: provider_unavailable",
        1,
        RELEASED,
        unavailable(429, 1, "retry_after_beyond_deadline"),
        retry_after="30",
        faults=persistent(429, retry_after=30),
        **RESUBMITTED,
    ),
    Row(
        "hang (never answers, never refunds)",
        202,
        "unknown",
        3,
        RESERVED,
        TIMEOUT_LINE,
        settled="failed: not_received",
        faults={"hang": True},
        **RESUBMITTED,
    ),
    Row(
        "hang after refunding, no retries (`PAYMENT_MAX_RETRIES=0`)",
        202,
        "unknown",
        1,
        RESERVED,
        TIMEOUT_LINE,
        settled="succeeded",
        faults={"hang_after_commit": True},
        env={"PAYMENT_MAX_RETRIES": "0"},
    ),
    Row(
        "409 in progress on every attempt",
        202,
        "unknown",
        3,
        RESERVED,
        unknown_line("outcome_unknown", "provider answered 409 after a request"),
        settled="failed: not_received",
        faults=persistent(409),
        **RESUBMITTED,
    ),
    Row(
        "read timeout, then 400 on the retry",
        202,
        "unknown",
        2,
        RESERVED,
        TIMEOUT_LINE,
        settled="failed: not_received",
        faults={"script": ["hang", 400]},
        **RESUBMITTED,
    ),
    Row(
        "answer trickled a byte every 400 ms (after refunding), past the 3 s deadline",
        202,
        "unknown",
        1,
        RESERVED,
        ("ERROR", "payment_client", "Payment service connection failed - timeout after 3000ms"),
        settled="succeeded",
        faults={"trickle_ms": 400},
    ),
    *[
        Row(
            f"{what} after refunding",
            202,
            "unknown",
            1,
            RESERVED,
            unknown_line("provider_response_invalid", "provider answered 200 with an unreadable"),
            settled="succeeded",
            faults={"script": [entry]},
        )
        for what, entry in (
            ("malformed JSON", "malformed_json"),
            ("HTML page (wrong content type)", "html"),
            ("200 without `status`", "missing_status"),
        )
    ],
    Row(
        "400 `amount_too_large`: 8.00 of the charge was refunded at the sandbox directly",
        422,
        "failed: amount_exceeds_refundable",
        1,
        RELEASED,
        None,
        again=422,
        refunded=0,
        elsewhere=800,
    ),
    Row(
        "refund failed by the provider (`refund_fails` charge)",
        402,
        "failed: declined",
        1,
        RELEASED,
        None,
        again=402,
        refunded=0,
        payment_method="refund_fails",
    ),
    Row(
        "provider refuses our API key (401)",
        502,
        "failed: provider_rejected_request",
        1,
        RELEASED,
        (
            "CRITICAL",
            "providers.sandbox",
            "payment provider rejected our credentials (HTTP 401): check PAYMENT_API_KEY",
        ),
        env={"PAYMENT_API_KEY": "sk_faults_not_the_right_key"},
        second_instance=True,
        **RESUBMITTED,
    ),
    Row(
        "breaker open (after 2 failed refunds)",
        503,
        "not stored",
        0,
        RELEASED,
        failed_line(
            "breaker_open", "payment provider circuit breaker is open after repeated failures"
        ),
        retry_after="30",
        again=503,
        again_replayed=False,
        refunded=0,
        faults=persistent(503),
        env={"PAYMENT_BREAKER_FAILURES": "2"},
        failures_first=2,
    ),
]


def stored_state(row: dict | None) -> str:
    if row is None:
        return "not stored"
    if row["status"] == "failed":
        return f"failed: {row['failure_code']}"
    return row["status"]


def payment_amounts(database_url: str, payment_id: str) -> tuple[int, int]:
    (row,) = query(
        database_url,
        "SELECT refund_reserved_minor, amount_refunded_minor FROM payments WHERE id = :id",
        id=payment_id,
    )
    return row["refund_reserved_minor"], row["amount_refunded_minor"]


def charge_id_of(service, payment: requests.Response) -> str:
    return payment_by_key(service.database_url, payment.json()["idempotency_key"])[
        "provider_charge_id"
    ]


@pytest.mark.parametrize("row", ROWS, ids=[row.fault for row in ROWS])
def test_refund_under_provider_fault(row: Row, sandbox, start_service):
    first = start_service(**({} if row.second_instance else row.env))
    paid = first.pay(new_key(), PAYMENT, payment_method=row.payment_method)
    assert paid.status_code == 201, paid.text
    payment_id = paid.json()["id"]
    outside = []
    if row.elsewhere:
        outside.append(new_key("direct"))
        refund_at_sandbox(sandbox, charge_id_of(first, paid), row.elsewhere, outside[0])

    with provider_url(row.provider) as url:
        service = first
        if row.second_instance:
            service = start_service(database_url=first.database_url, provider_url=url, **row.env)
        sandbox.set_faults(**row.faults)  # after the payment: script entries are for refunds
        for _ in range(row.failures_first):
            assert service.refund(payment_id, REFUND, new_key("refund")).status_code == 503
        before = refund_calls(sandbox)
        key = new_key("refund")
        response = service.refund(payment_id, REFUND, key)
        calls = refund_calls(sandbox) - before
        sandbox.set_faults()  # frees hung requests; lookups never see faults anyway
        held = payment_amounts(first.database_url, payment_id)

    assert response.status_code == row.status, response.text
    expected_type = "application/json" if row.status < 300 else "application/problem+json"
    assert response.headers["Content-Type"] == expected_type
    assert response.headers.get("Retry-After") == row.retry_after
    stored = refund_by_key(first.database_url, key)
    assert stored_state(stored) == row.stored
    if row.status < 300:
        assert response.json()["status"] == stored["status"]
    assert calls == row.calls
    if stored is not None:
        assert stored["attempts"] == refund_attempt_count(first.database_url, stored["id"])
    assert held == row.held
    assert log_line(service, response, row.log) == row.log
    if row.status >= 500:
        assert "Traceback" not in service.stderr()
    if not row.settled:  # an answer that settled the refund: the books balance already
        assert_refund_books_balance(first.database_url, sandbox, outside=outside)

    if row.settled:
        report = settle_refunds(first)
        assert report["errors"] == 0, report
        assert stored_state(refund_by_key(first.database_url, key)) == row.settled
    # The same key again, on a healthy instance: a refund that happened replays without a
    # request; one the provider certainly never made is re-submitted under the same key.
    before = refund_calls(sandbox)
    again = first.refund(payment_id, REFUND, key)
    assert again.status_code == row.again, again.text
    assert again.headers.get("Idempotent-Replayed") == ("true" if row.again_replayed else None)
    assert refund_calls(sandbox) - before == row.again_calls
    (charge,) = [c for c in sandbox.ledger() if c["id"] == charge_id_of(first, paid)]
    assert charge["amount_refunded"] == row.refunded + row.elsewhere
    assert payment_amounts(first.database_url, payment_id)[1] == row.refunded
    assert first.get(f"/v1/payments/{payment_id}").json()["amount_refunded"] == minor(row.refunded)
    assert_refund_books_balance(first.database_url, sandbox, outside=outside)
    assert_books_balance(first.database_url, sandbox)


# --------------------------------------------------------------------------- more than one call


def test_unknown_refund_keeps_its_reservation_until_reconciled(sandbox, start_service):
    """A hung refund holds its 4.00: 7.00 more is refused until reconciliation finds the
    provider never made it; then the 7.00 goes through, and the hung key re-submitted
    finds only 3.00 left."""
    service = start_service()
    payment_id = service.pay(new_key(), PAYMENT).json()["id"]
    sandbox.set_faults(hang=True)
    hung_key = new_key("refund")
    assert service.refund(payment_id, REFUND, hung_key).status_code == 202
    sandbox.set_faults()
    assert payment_amounts(service.database_url, payment_id) == RESERVED

    refused = service.refund(payment_id, "7.00", new_key("refund"))
    assert refused.status_code == 422 and refused.json()["code"] == "amount_exceeds_refundable"
    assert refund_calls(sandbox) == 3  # the hung refund's attempts only

    assert settle_refunds(service)["failed"] == 1
    assert stored_state(refund_by_key(service.database_url, hung_key)) == "failed: not_received"
    assert payment_amounts(service.database_url, payment_id) == RELEASED
    assert service.refund(payment_id, "7.00", new_key("refund")).status_code == 201
    again = service.refund(payment_id, REFUND, hung_key)
    assert again.status_code == 422 and again.json()["code"] == "amount_exceeds_refundable"
    assert payment_amounts(service.database_url, payment_id) == (700, 700)
    assert_refund_books_balance(service.database_url, sandbox)
    assert_books_balance(service.database_url, sandbox)


def test_unknown_refund_retried_before_reconciliation_refunds_once(sandbox, start_service):
    """The provider refunded but the answer was lost: the same key, sent again before any
    reconciliation, is re-submitted and answered from the provider's idempotency store."""
    service = start_service(PAYMENT_MAX_RETRIES=0)
    payment_id = service.pay(new_key(), PAYMENT).json()["id"]
    sandbox.set_faults(hang_after_commit=True)
    key = new_key("refund")
    first = service.refund(payment_id, REFUND, key)
    sandbox.set_faults()
    assert first.status_code == 202 and first.json()["status"] == "unknown", first.text

    again = service.refund(payment_id, REFUND, key)
    assert again.status_code == 201 and again.json()["status"] == "succeeded", again.text
    (refund,) = sandbox.refunds()
    assert again.json()["provider_refund_id"] == refund["id"]
    assert refund_calls(sandbox) == 2  # the lost answer and the re-submit; one refund
    assert payment_amounts(service.database_url, payment_id) == REFUNDED
    assert_refund_books_balance(service.database_url, sandbox)
    assert_books_balance(service.database_url, sandbox)


# --------------------------------------------------------------------------- kill -9


#: The crash suite's budgets, with a longer DB_POOL_TIMEOUT so that a reconciliation run
#: right after the crash surely lands inside the in-flight window
#: (``reconciliation.in_flight_seconds``: 2.6 + 4 + 1 = 7.6 s after the refund was stored).
CRASH_ENV = {**SLOW_PROVIDER_ENV, "DB_POOL_TIMEOUT": "4"}
IN_FLIGHT_S = in_flight_seconds(
    types.SimpleNamespace(
        payment_deadline=float(CRASH_ENV["PAYMENT_DEADLINE"]),
        db_pool_timeout=float(CRASH_ENV["DB_POOL_TIMEOUT"]),
    )
)


def refund_expecting_crash(service, payment_id: str, key: str, amount: str = REFUND):
    """The refund's answer, or the connection error a killed worker leaves behind."""
    try:
        return service.refund(payment_id, amount, key, timeout=20)
    except requests.ConnectionError as exc:
        return exc


def crash_mid_refund(service, sandbox, payment_id: str, key: str) -> None:
    """Send the refund, SIGKILL the worker while the sandbox holds it (``hung``), wait for
    the master's replacement; the client sees the connection drop."""
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(refund_expecting_crash, service, payment_id, key)
        sandbox.wait_for_state(lambda s: s["hung"] == 1, 10)
        kill_worker(service)
        assert isinstance(answer.result(timeout=30), requests.ConnectionError)
    sandbox.set_faults()  # frees the hung request (the worker that sent it is gone)


def test_worker_killed_mid_refund_leaves_pending_that_reconcile_settles(sandbox, start_service):
    """The provider made the refund, the worker died before step 3: the refund is left
    ``pending`` with its amount reserved; the same key is a conflict (told when to come
    back), and one ``payments reconcile --older-than 0`` settles it from the provider's
    final answer without waiting out the in-flight window."""
    service = start_service(**CRASH_ENV)
    payment_id = service.pay(new_key(), PAYMENT).json()["id"]
    sandbox.set_faults(hang_after_commit=True)  # the provider refunds, the answer never comes
    key = new_key("refund")
    crash_mid_refund(service, sandbox, payment_id, key)
    assert refund_by_key(service.database_url, key)["status"] == "pending"
    assert payment_amounts(service.database_url, payment_id) == RESERVED
    (refund,) = sandbox.refunds()
    assert refund["status"] == "succeeded"

    # Retrying while it is pending is a conflict, never a second refund.
    conflict = service.refund(payment_id, REFUND, key)
    assert conflict.status_code == 409 and conflict.json()["code"] == "payment_in_progress"
    assert 1 <= int(conflict.headers["Retry-After"]) <= math.ceil(IN_FLIGHT_S)
    assert refund_calls(sandbox) == 1

    report = service.reconcile(older_than=0)["refunds"]  # once, inside the window
    assert (report["examined"], report["succeeded"], report["errors"]) == (1, 1, 0), report
    settled = refund_by_key(service.database_url, key)
    assert (settled["status"], settled["provider_refund_id"]) == ("succeeded", refund["id"])
    assert payment_amounts(service.database_url, payment_id) == REFUNDED

    replay = service.refund(payment_id, REFUND, key)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert refund_calls(sandbox) == 1 and len(sandbox.refunds()) == 1
    assert_refund_books_balance(service.database_url, sandbox)
    assert_books_balance(service.database_url, sandbox)


def test_worker_killed_while_provider_hangs_on_a_refund_is_not_received_and_retry_refunds_once(
    sandbox, start_service
):
    """The provider never made the refund: "never saw it" proves nothing while the
    request may be in flight, so reconciliation leaves the refund ``pending`` (reserved)
    until the window has passed, then fails it ``not_received`` and releases the amount;
    the same key is then re-submitted and refunded exactly once."""
    service = start_service(**CRASH_ENV)
    payment_id = service.pay(new_key(), PAYMENT).json()["id"]
    sandbox.set_faults(hang=True)
    key = new_key("refund")
    sent = time.monotonic()
    crash_mid_refund(service, sandbox, payment_id, key)  # the provider dropped it

    report = service.reconcile(older_than=0)["refunds"]
    # The refund was stored after `sent`: a run that ended before `sent + IN_FLIGHT_S`
    # ran inside its window (asserted unless this machine was slower than that).
    if time.monotonic() < sent + IN_FLIGHT_S:
        assert (report["examined"], report["still_pending"], report["failed"]) == (1, 1, 0)
        assert refund_by_key(service.database_url, key)["status"] == "pending"
        assert payment_amounts(service.database_url, payment_id) == RESERVED

    settle_refunds(service, timeout=IN_FLIGHT_S + 20)
    stored = refund_by_key(service.database_url, key)
    assert (stored["status"], stored["failure_code"]) == ("failed", "not_received")
    assert payment_amounts(service.database_url, payment_id) == RELEASED
    assert_refund_books_balance(service.database_url, sandbox)

    retried = service.refund(payment_id, REFUND, key)  # never received: re-submitted
    assert retried.status_code == 201, retried.text
    assert [r["idempotency_key"] for r in sandbox.refunds()] == [stored["id"]]
    assert payment_amounts(service.database_url, payment_id) == REFUNDED
    assert_refund_books_balance(service.database_url, sandbox)
    assert_books_balance(service.database_url, sandbox)


def test_worker_killed_with_many_refunds_in_flight_never_refunds_more(sandbox, start_service):
    """One worker with 8 partial refunds of one payment in flight dies: every refund the
    provider made is ``succeeded``, every other one ``failed: not_received`` with its
    reservation released, and the payment's refunded amount is the provider's."""
    service = start_service(GUNICORN_THREADS=8, PAYMENT_POOL_MAXSIZE=8, **SLOW_PROVIDER_ENV)
    payment_id = service.pay(new_key(), PAYMENT).json()["id"]
    sandbox.set_faults(latency_ms=1000)
    keys = [new_key("refund") for _ in range(8)]
    with ThreadPoolExecutor(len(keys)) as pool:
        answers = [
            pool.submit(refund_expecting_crash, service, payment_id, key, "1.00") for key in keys
        ]
        sandbox.wait_for_state(lambda s: s["requests"].get("POST /v1/refunds", 0) >= 5, 10)
        kill_worker(service)
        outcomes = [answer.result(timeout=30) for answer in answers]
    assert all(isinstance(o, requests.ConnectionError) for o in outcomes), outcomes
    sandbox.set_faults()

    sandbox.wait_for_state(lambda s: s["in_flight"] == 0, 10)
    settle_refunds(service, timeout=IN_FLIGHT_S + 20)
    refunded = {r["idempotency_key"] for r in sandbox.refunds() if r["status"] == "succeeded"}
    assert len(refunded) >= 5
    for key in keys:
        row = refund_by_key(service.database_url, key)
        if row is not None and row["id"] in refunded:  # the provider's key is our refund id
            assert row["status"] == "succeeded"
        elif row is not None:  # stored, never sent: the provider never saw it
            assert (row["status"], row["failure_code"]) == ("failed", "not_received")
    assert payment_amounts(service.database_url, payment_id) == (100 * len(refunded),) * 2
    assert assert_refund_books_balance(service.database_url, sandbox) == {
        "USD": 100 * len(refunded)
    }
    assert_books_balance(service.database_url, sandbox)
    assert provider_calls(sandbox) == 1


# --------------------------------------------------------------------------- the document


def minor(amount: int) -> str:
    return str(Decimal(amount).scaleb(-2))


def answer_again(row: Row) -> str:
    if row.again_replayed:
        how = "replayed"
    elif row.again_calls:
        how = f"re-submitted ({row.again_calls} request)"
    else:
        how = "nothing sent"
    return f"{row.again}, {how}"


def books(row: Row) -> str:
    text = f"{minor(row.refunded)} = {minor(row.refunded)}"
    if row.elsewhere:
        text += f" (+ {minor(row.elsewhere)} refunded at the sandbox directly)"
    return text


def markdown_table(rows: list[Row]) -> str:
    """The refund fault table of docs/RELIABILITY.md, rendered from what the tests assert."""
    lines = [
        "| provider fault (during the refund) | we answer | stored refund | refund requests at "
        "the provider | payment reserved / refunded | application log line | after `payments "
        "reconcile` | same key again | books: refunded here = at the sandbox |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        answer = f"{row.status}" + (f", Retry-After: {row.retry_after}" if row.retry_after else "")
        log = f"{row.log[0]} `{row.log[1]}`: {row.log[2]}" if row.log else "none (access log only)"
        held = f"{minor(row.held[0])} / {minor(row.held[1])}"
        lines.append(
            f"| {row.fault} | {answer} | {row.stored} | {row.calls} | {held} | {log} "
            f"| {row.settled or '-'} | {answer_again(row)} | {books(row)} |"
        )
    return "\n".join(lines)


def test_reliability_doc_shows_the_asserted_refund_matrix():
    document = (ROOT / "docs" / "RELIABILITY.md").read_text()
    assert markdown_table(ROWS) in document


if __name__ == "__main__":
    print(markdown_table(ROWS))
