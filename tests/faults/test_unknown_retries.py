"""A payment whose outcome is unknown, retried under its key while the provider is not there.

The money rule: once a request may have reached the provider, only the provider's
definitive answer settles the payment. A retry that cannot reach the provider (the
breaker is open, or this instance's provider refuses connections) must leave the
payment ``unknown`` and say so (202), never record or answer "not charged" (503), and
reconciliation later settles it to the provider's truth.

``docs/RELIABILITY.md`` carries the table :func:`markdown_table` renders from ``ROWS``
(print it with ``python -m tests.faults.test_unknown_retries``); a test keeps it current.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.faults.harness import (
    ROOT,
    assert_books_balance,
    new_key,
    payment_by_key,
    provider_calls,
    refusing_port,
)

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres]


@dataclass(frozen=True)
class Row:
    """``first``: the sandbox faults of the first call (which ends ``unknown``); ``then``:
    ``"breaker open"`` or ``"refused"`` (the retry goes to an instance on the same
    database whose provider URL refuses connections)."""

    scenario: str
    first: dict
    then: str
    calls: int  # charge requests the sandbox received for the payment (the retry adds none)
    settled: str
    env: dict = field(default_factory=dict)


ROWS = [
    Row(
        "charged, answer unreadable; retried while the breaker is open",
        {"script": ["malformed_json"]},
        "breaker open",
        1,
        "succeeded",
        env={"PAYMENT_BREAKER_FAILURES": "2"},
    ),
    Row(
        "charged, answer unreadable; retried where the provider refuses connections",
        {"script": ["malformed_json"]},
        "refused",
        1,
        "succeeded",
    ),
    Row(
        "never charged, no answer (hang); retried where the provider refuses connections",
        {"hang": True},
        "refused",
        3,
        "failed: not_received",
    ),
]


def stored_state(row: dict) -> str:
    return f"failed: {row['failure_code']}" if row["status"] == "failed" else row["status"]


def open_the_breaker(service, sandbox) -> None:
    sandbox.set_faults(error_rate=1.0, error_status=503)
    for _ in range(5):
        refused = service.pay(new_key())
        if refused.json().get("code") == "breaker_open":
            return
    raise AssertionError("the breaker did not open")


@pytest.mark.parametrize("row", ROWS, ids=[row.scenario for row in ROWS])
def test_unknown_payment_retried_without_a_provider_stays_unknown(row: Row, sandbox, start_service):
    service = start_service(**row.env)
    key = new_key()
    sandbox.set_faults(**row.first)
    first = service.pay(key)
    sandbox.set_faults()
    assert first.status_code == 202 and first.json()["status"] == "unknown", first.text
    assert provider_calls(sandbox) == row.calls

    if row.then == "breaker open":
        open_the_breaker(service, sandbox)
        sandbox.set_faults()
        before = provider_calls(sandbox)
        retry = service.pay(key)
    else:
        with refusing_port() as url:
            elsewhere = start_service(database_url=service.database_url, provider_url=url)
            before = provider_calls(sandbox)
            retry = elsewhere.pay(key)

    assert retry.status_code == 202, retry.text
    assert retry.headers["Content-Type"] == "application/json"
    assert retry.json()["status"] == "unknown"
    assert payment_by_key(service.database_url, key)["status"] == "unknown"
    assert provider_calls(sandbox) == before  # the retry sent nothing to this provider

    report = service.reconcile(older_than=0)
    assert report["errors"] == 0
    assert stored_state(payment_by_key(service.database_url, key)) == row.settled
    assert_books_balance(service.database_url, sandbox)


# --------------------------------------------------------------------------- the document


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| first call; retry under the same key | the retry is answered | stored after the "
        "retry | charge requests at the provider | after `payments reconcile` |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.scenario} | 202, payment `unknown` | unknown | {row.calls} | {row.settled} |"
        )
    return "\n".join(lines)


def test_reliability_doc_shows_the_asserted_retries():
    document = (ROOT / "docs" / "RELIABILITY.md").read_text()
    assert markdown_table(ROWS) in document


if __name__ == "__main__":
    print(markdown_table(ROWS))
