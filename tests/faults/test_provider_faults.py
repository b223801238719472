"""Provider fault matrix: every fault against the real gunicorn service and the sandbox.

Each row starts a fresh service (one worker, small timeouts: ``harness.BASE_ENV``) on a
fresh database against a reset sandbox, sends one payment under the fault and checks
what we answer, what we store, how often the provider was asked, what we logged, what
reconciliation settles an unknown outcome to, and that the books balance afterwards.

``docs/RELIABILITY.md`` carries the table :func:`markdown_table` renders from ``ROWS``
(print it with ``python -m tests.faults.test_provider_faults``); a test keeps it current.
Its last column is the same fault on the Stripe path, from ``STRIPE`` (keyed by the
row's fault), asserted by tests/faults/test_stripe_faults.py (end to end, against
localstripe behind a fault proxy) and tests/unit/test_stripe_faults.py (``responses``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pytest

from tests.faults.harness import (
    ROOT,
    assert_books_balance,
    attempt_count,
    blackhole_port,
    new_key,
    payment_by_key,
    provider_calls,
    refusing_port,
)

pytestmark = [pytest.mark.faults, pytest.mark.gunicorn, pytest.mark.postgres]

TIMEOUT_LINE = (
    "ERROR",
    "payment_client",
    "Payment service connection failed - timeout after 500ms",
)


@dataclass(frozen=True)
class Row:
    """One provider fault and everything the service must do about it.

    ``stored`` is the payment's status (``failed: <failure_code>`` when failed; ``not
    stored`` when refused before a row was written); ``calls`` the charge requests the
    sandbox received; ``attempts`` the requests our audit trail recorded; ``log`` the
    application line (level, logger, message start) or ``None`` when only the access
    line is written; ``settled`` what ``payments reconcile`` makes of an unknown outcome.
    """

    fault: str
    status: int
    stored: str
    calls: int
    attempts: int
    log: tuple[str, str, str] | None
    retry_after: str | None = None
    settled: str = ""
    faults: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    provider: str = "sandbox"  # or "refused", "blackhole"
    payment_method: str = "card"
    failures_first: int = 0  # failed payments sent before the measured one


def failed_line(code: str, detail: str) -> tuple[str, str, str]:
    """The line every 5xx answer logs: the cause the client is not told."""
    return ("WARNING", "service.problems", f"payment request failed ({code}): {detail}")


def unknown_line(code: str, detail: str) -> tuple[str, str, str]:
    """The line an unknown outcome logs: the cause reconciliation will resolve."""
    return ("ERROR", "payment_handler", f"payment outcome unknown ({code}): {detail}")


def persistent(status: int, **extra) -> dict:
    return {"error_rate": 1.0, "error_status": status, **extra}


ROWS = [
    Row("healthy provider", 201, "succeeded", 1, 1, None),
    Row(
        "connection refused",
        503,
        "failed: provider_unavailable",
        0,
        3,
        failed_line(
            "provider_unavailable", "payment provider unreachable: connect: NewConnectionError"
        ),
        retry_after="5",
        provider="refused",
    ),
    Row(
        "connect timeout (accept queue full)",
        503,
        "failed: provider_unavailable",
        0,
        3,
        TIMEOUT_LINE,
        retry_after="5",
        provider="blackhole",
    ),
    Row(
        "read timeout (provider takes 1 s, then charges)",
        201,
        "succeeded",
        3,
        3,
        TIMEOUT_LINE,
        faults={"latency_ms": 1000},
    ),
    Row(
        "hang (never answers, never charges)",
        202,
        "unknown",
        3,
        3,
        TIMEOUT_LINE,
        settled="failed: not_received",
        faults={"hang": True},
    ),
    Row(
        "hang after charging",
        201,
        "succeeded",
        2,
        2,
        TIMEOUT_LINE,
        faults={"hang_after_commit": True},
    ),
    Row(
        "connection reset before the charge",
        201,
        "succeeded",
        2,
        2,
        None,
        faults={"script": ["reset"]},
    ),
    Row(
        "connection reset mid-response (after charging)",
        201,
        "succeeded",
        2,
        2,
        None,
        faults={"script": ["reset_mid_response"]},
    ),
    *[
        Row(
            f"{status} on every attempt",
            503,
            "failed: provider_unavailable",
            3,
            3,
            failed_line(
                "provider_unavailable",
                f"provider unavailable: HTTP {status} after 3 attempt(s), gave up: exhausted",
            ),
            retry_after="1",
            faults=persistent(status),
        )
        for status in (500, 502, 503, 504)
    ],
    Row("503 once, then healthy", 201, "succeeded", 2, 2, None, faults={"script": [503]}),
    Row(
        "429 with Retry-After: 1 on every attempt",
        503,
        "failed: provider_unavailable",
        3,
        3,
        failed_line(
            "provider_unavailable",
            "provider unavailable: HTTP 429 after 3 attempt(s), gave up: exhausted",
        ),
        retry_after="1",
        faults=persistent(429, retry_after=1),
    ),
    Row(
        "429 with Retry-After: 30 (beyond the deadline)",
        503,
        "failed: provider_unavailable",
        1,
        1,
        failed_line(
            "provider_unavailable",
            "provider unavailable: HTTP 429 after 1 attempt(s), "
            "gave up: retry_after_beyond_deadline",
        ),
        retry_after="30",
        faults=persistent(429, retry_after=30),
    ),
    Row(
        "429 without Retry-After on every attempt",
        503,
        "failed: provider_unavailable",
        3,
        3,
        failed_line(
            "provider_unavailable",
            "provider unavailable: HTTP 429 after 3 attempt(s), gave up: exhausted",
        ),
        retry_after="1",
        faults=persistent(429),
    ),
    Row(
        "409 in progress on every attempt",
        202,
        "unknown",
        3,
        3,
        unknown_line("outcome_unknown", "provider answered 409 after a request that may"),
        settled="failed: not_received",
        faults=persistent(409),
    ),
    Row(
        "answer trickled a byte every 400 ms (after charging), past the 3 s deadline",
        202,
        "unknown",
        1,
        1,
        unknown_line(
            "outcome_unknown",
            "no answer from the provider after sending the charge (read: DeadlineExceeded",
        ),
        settled="succeeded",
        faults={"trickle_ms": 400},
    ),
    Row(
        "read timeout, then 400 on the retry",
        202,
        "unknown",
        2,
        2,
        unknown_line("outcome_unknown", "attempt 1 may have reached the provider"),
        settled="failed: not_received",
        faults={"script": ["hang", 400]},
    ),
    Row(
        "malformed JSON after charging",
        202,
        "unknown",
        1,
        1,
        unknown_line(
            "provider_response_invalid",
            "provider answered 200 with an unreadable charge (JSONDecodeError",
        ),
        settled="succeeded",
        faults={"script": ["malformed_json"]},
    ),
    Row(
        "HTML page (wrong content type) after charging",
        202,
        "unknown",
        1,
        1,
        unknown_line(
            "provider_response_invalid",
            "provider answered 200 with an unreadable charge (ValueError: content type",
        ),
        settled="succeeded",
        faults={"script": ["html"]},
    ),
    Row(
        "200 without `status` after charging",
        202,
        "unknown",
        1,
        1,
        unknown_line(
            "provider_response_invalid",
            "provider answered 200 with an unreadable charge (KeyError: 'status')",
        ),
        settled="succeeded",
        faults={"script": ["missing_status"]},
    ),
    Row(
        "card declined (402)",
        402,
        "failed: card_declined",
        1,
        1,
        None,
        payment_method="card_declined",
    ),
    Row(
        "provider refuses our API key (401)",
        502,
        "failed: provider_rejected_request",
        1,
        1,
        (
            "CRITICAL",
            "providers.sandbox",
            "payment provider rejected our credentials (HTTP 401): check PAYMENT_API_KEY",
        ),
        env={"PAYMENT_API_KEY": "sk_faults_not_the_right_key"},
    ),
    Row(
        "breaker open (after 2 failed payments)",
        503,
        "not stored",
        0,
        0,
        failed_line(
            "breaker_open", "payment provider circuit breaker is open after repeated failures"
        ),
        retry_after="30",
        faults=persistent(503),
        env={"PAYMENT_BREAKER_FAILURES": "2"},
        failures_first=2,
    ),
]


# --------------------------------------------------------------------------- the Stripe path

#: How a Stripe row was run: tests/faults/test_stripe_faults.py (gunicorn, the fault
#: proxy, localstripe), tests/unit/test_stripe_faults.py (PaymentClient, StripeProvider
#: and the lifecycle over ``responses``), or the first up to the ``unknown`` answer and
#: the second for reconciliation, which lists PaymentIntents by ``created``: localstripe
#: has no such filter.
END_TO_END = "end to end"
UNIT = "unit (responses)"
RECONCILED_IN_UNIT = "end to end, reconcile unit (responses)"


@dataclass(frozen=True)
class StripeRow:
    """The same fault on the Stripe path (``PAYMENT_PROVIDER=stripe``, DESIGN.md 5b).

    ``status``, ``retry_after``, ``stored`` and ``settled`` mean what they mean in
    :class:`Row`. ``requests`` counts the ``POST /v1/payment_intents`` that reached
    Stripe (the fault proxy's count end to end, ``responses``' in unit tests);
    ``intents`` the PaymentIntents Stripe holds under the key afterwards (localstripe's,
    or the scripted Stripe's); ``attempts`` our audit rows: every charge first reads its
    PaymentMethod (``GET /v1/payment_methods/<id>``), one attempt more than the
    sandbox's. ``run`` is how it was run; ``note`` says why the outcome is not the
    sandbox's, or what stopped it.
    """

    status: int
    stored: str
    requests: int
    intents: int
    attempts: int
    run: str
    retry_after: str | None = None
    settled: str = ""
    note: str = ""


def _unknown_on_stripe(requests: int, settled: str, run: str = RECONCILED_IN_UNIT, **kw):
    intents = 1 if settled == "succeeded" else 0
    return StripeRow(202, "unknown", requests, intents, requests + 1, run, settled=settled, **kw)


def _unavailable_on_stripe(requests: int, retry_after: str, **kw) -> StripeRow:
    return StripeRow(
        503,
        "failed: provider_unavailable",
        requests,
        0,
        requests + 1,
        END_TO_END,
        retry_after=retry_after,
        **kw,
    )


FIVE_XX = 'Stripe may have acted on a 5xx, so it is not "certainly not charged"'
REPLAYED = "Stripe replays the first request's answer under the key"
METHOD_READ_FAILS = "the PaymentMethod read fails first: no PaymentIntent request"

STRIPE: dict[str, StripeRow] = {
    "healthy provider": StripeRow(201, "succeeded", 1, 1, 2, END_TO_END),
    "connection refused": StripeRow(
        503, "failed: provider_unavailable", 0, 0, 3, END_TO_END, "5", note=METHOD_READ_FAILS
    ),
    "connect timeout (accept queue full)": StripeRow(
        503, "failed: provider_unavailable", 0, 0, 3, END_TO_END, "5", note=METHOD_READ_FAILS
    ),
    "read timeout (provider takes 1 s, then charges)": _unknown_on_stripe(
        3,
        "succeeded",
        UNIT,
        note="while the first request runs, Stripe answers the retries 409 "
        "`idempotency_key_in_use` without Retry-After (the sandbox's 409 says 1 s)",
    ),
    "hang (never answers, never charges)": _unknown_on_stripe(3, "failed: not_received"),
    "hang after charging": StripeRow(201, "succeeded", 2, 1, 3, UNIT, note=REPLAYED),
    "connection reset before the charge": StripeRow(201, "succeeded", 2, 1, 3, END_TO_END),
    "connection reset mid-response (after charging)": StripeRow(
        201, "succeeded", 2, 1, 3, UNIT, note=REPLAYED
    ),
    **{
        f"{status} on every attempt": _unknown_on_stripe(3, "failed: not_received", note=FIVE_XX)
        for status in (500, 502, 503, 504)
    },
    "503 once, then healthy": StripeRow(201, "succeeded", 2, 1, 3, END_TO_END),
    "429 with Retry-After: 1 on every attempt": _unavailable_on_stripe(3, "1"),
    "429 with Retry-After: 30 (beyond the deadline)": _unavailable_on_stripe(1, "30"),
    "429 without Retry-After on every attempt": _unavailable_on_stripe(3, "1"),
    "409 in progress on every attempt": _unknown_on_stripe(3, "failed: not_received"),
    "answer trickled a byte every 400 ms (after charging), past the 3 s deadline": (
        _unknown_on_stripe(1, "succeeded")
    ),
    "read timeout, then 400 on the retry": _unknown_on_stripe(2, "failed: not_received"),
    "malformed JSON after charging": _unknown_on_stripe(1, "succeeded"),
    "HTML page (wrong content type) after charging": _unknown_on_stripe(1, "succeeded"),
    "200 without `status` after charging": _unknown_on_stripe(1, "succeeded"),
    "card declined (402)": StripeRow(
        402,
        "failed: card_declined",
        1,
        1,
        2,
        END_TO_END,
        note="test card 4000000000000341",
    ),
    "provider refuses our API key (401)": StripeRow(
        502,
        "failed: provider_rejected_request",
        0,
        0,
        1,
        END_TO_END,
        note="refused at the PaymentMethod read, logged CRITICAL by `providers.stripe`",
    ),
    "breaker open (after 2 failed payments)": StripeRow(
        503,
        "not stored",
        0,
        0,
        0,
        END_TO_END,
        "30",
        note="the 2 payments before it met 503s: each answered 202 `unknown`",
    ),
}


@contextlib.contextmanager
def provider_url(kind: str):
    if kind == "refused":
        with refusing_port() as url:
            yield url
    elif kind == "blackhole":
        with blackhole_port() as url:
            yield url
    else:
        yield None


def stored_state(row: dict | None) -> str:
    if row is None:
        return "not stored"
    if row["status"] == "failed":
        return f"failed: {row['failure_code']}"
    return row["status"]


def log_line(service, response, expected) -> tuple[str, str, str] | None:
    """The expected application record for this request, or the most severe one."""
    records = service.logs_for(response)
    for record in records:
        level, logger, message = record["level"], record["logger"], record["message"]
        if expected and (level, logger) == expected[:2] and message.startswith(expected[2]):
            return expected
    severe = [r for r in records if r["level"] in ("WARNING", "ERROR", "CRITICAL")]
    return (severe[0]["level"], severe[0]["logger"], severe[0]["message"]) if severe else None


@pytest.mark.parametrize("row", ROWS, ids=[row.fault for row in ROWS])
def test_provider_fault(row: Row, sandbox, start_service):
    with provider_url(row.provider) as url:
        service = start_service(provider_url=url, **row.env)
        sandbox.set_faults(**row.faults)
        for _ in range(row.failures_first):
            assert service.pay(new_key()).status_code == 503
        before = provider_calls(sandbox)
        key = new_key()
        response = service.pay(key, payment_method=row.payment_method)
        calls = provider_calls(sandbox) - before
        sandbox.set_faults()  # frees hung requests; lookups never see faults anyway

    assert response.status_code == row.status, response.text
    expected_type = "application/json" if row.status < 300 else "application/problem+json"
    assert response.headers["Content-Type"] == expected_type
    assert response.headers.get("Retry-After") == row.retry_after
    stored = payment_by_key(service.database_url, key)
    assert stored_state(stored) == row.stored
    assert calls == row.calls
    if stored is not None:
        assert stored["attempts"] == attempt_count(service.database_url, stored["id"])
    assert (stored["attempts"] if stored else 0) == row.attempts
    assert log_line(service, response, row.log) == row.log
    if row.status >= 500:
        assert "Traceback" not in service.stderr()

    if row.settled:
        report = service.reconcile(older_than=0)
        assert report["examined"] == 1 and report["errors"] == 0
        assert stored_state(payment_by_key(service.database_url, key)) == row.settled
        # The same key again: a settled charge replays without a call; a payment the
        # provider never received is re-submitted under the same key.
        before = provider_calls(sandbox)
        again = service.pay(key, payment_method=row.payment_method)
        assert again.status_code == 201
        replayed = row.settled == "succeeded"
        assert again.headers.get("Idempotent-Replayed") == ("true" if replayed else None)
        assert provider_calls(sandbox) - before == (0 if replayed else 1)
    assert_books_balance(service.database_url, sandbox)


# --------------------------------------------------------------------------- the document


def markdown_table(rows: list[Row]) -> str:
    """The fault table of docs/RELIABILITY.md, rendered from what the tests assert."""
    lines = [
        "| provider fault | we answer | stored payment | charge requests at the provider "
        "| attempts recorded | application log line | after `payments reconcile` "
        "| Stripe path: outcome; PaymentIntent requests, PaymentIntents; how it was run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        answer = f"{row.status}" + (f", Retry-After: {row.retry_after}" if row.retry_after else "")
        log = f"{row.log[0]} `{row.log[1]}`: {row.log[2]}" if row.log else "none (access log only)"
        lines.append(
            f"| {row.fault} | {answer} | {row.stored} | {row.calls} | {row.attempts} "
            f"| {log} | {row.settled or '-'} | {stripe_cell(STRIPE[row.fault])} |"
        )
    return "\n".join(lines)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def stripe_cell(row: StripeRow) -> str:
    """The Stripe column: e.g. ``202 unknown -> reconciled succeeded; 1 request, 1
    PaymentIntent; end to end, reconcile unit (responses)``, then the note."""
    answer = f"{row.status}" + (f" (Retry-After: {row.retry_after})" if row.retry_after else "")
    outcome = f"{answer} {row.stored}" + (f" -> reconciled {row.settled}" if row.settled else "")
    counts = f"{_plural(row.requests, 'request')}, {_plural(row.intents, 'PaymentIntent')}"
    note = f". {row.note[0].upper()}{row.note[1:]}" if row.note else ""
    return f"{outcome}; {counts}; {row.run}{note}"


def test_reliability_doc_shows_the_asserted_matrix():
    document = (ROOT / "docs" / "RELIABILITY.md").read_text()
    assert markdown_table(ROWS) in document


if __name__ == "__main__":
    print(markdown_table(ROWS))
