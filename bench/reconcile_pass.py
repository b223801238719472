"""``python -m bench.reconcile_pass [--explain] [--older-than S]``: one reconciliation pass.

Run by the year scenario in a child process configured like an operator's cron job
(``DATABASE_URL``, ``PAYMENT_API_URL``, ``PAYMENT_API_KEY``, ``REQUESTS_CA_BUNDLE`` in its
environment); prints one JSON object on stdout.

Without ``--explain``: the wall time of ``payment_handler.reconcile_payments(S)`` as the
process's first call (so it includes the first database connection and the first TLS
handshake with the provider, as a cron run pays them), its report, and the time its SQL
statements took (timed at the cursor).

With ``--explain``: the statement ``SqlPaymentStore.claim_for_reconciliation`` sends,
captured at the cursor and run first under ``EXPLAIN (ANALYZE, BUFFERS)`` with the same
parameters in the same transaction, for the first two batches of a pass with threshold
S (the second one continues after the first, as a pass does); the leases it took are
released again, so the pass that follows finds the same payments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import event

import database_config
import payment_handler
from payment_store import ReconcileClaim
from settings import get_settings

#: The claim statement, told apart from every other statement of a pass.
CLAIM_MARKERS = ("FROM payments", "FOR UPDATE SKIP LOCKED")


def timed_pass(older_than: float) -> dict:
    engine = database_config.get_engine()
    sql = {"statements": 0, "seconds": 0.0}
    started_at: list[float] = []

    @event.listens_for(engine, "before_cursor_execute")
    def before(*_):
        started_at.append(time.perf_counter())

    @event.listens_for(engine, "after_cursor_execute")
    def after(*_):
        sql["statements"] += 1
        sql["seconds"] += time.perf_counter() - started_at.pop()

    t0 = time.perf_counter()
    report = payment_handler.reconcile_payments(older_than_seconds=older_than)
    seconds = time.perf_counter() - t0
    return {
        "pass_s": round(seconds, 3),
        "sql_s": round(sql["seconds"], 3),
        "sql_statements": sql["statements"],
        "report": report.to_dict(),
    }


def explain_claims(older_than: float, batches: int = 2) -> dict:
    """Plans of the claim statement for the first ``batches`` batches of a pass."""
    settings = get_settings()
    store = payment_handler.get_payment_service().store
    engine = database_config.get_engine()
    plans: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def explain(conn, cursor, statement, parameters, context, executemany):
        if all(marker in statement for marker in CLAIM_MARKERS):
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            plans.append("\n".join(row[0] for row in cursor.fetchall()))

    # The cut-offs ``PaymentService.reconcile`` computes for this threshold.
    now = datetime.now(UTC)
    in_flight = settings.payment_deadline + settings.db_pool_timeout + 1
    claim = ReconcileClaim(
        unknown_before=now - timedelta(seconds=older_than),
        pending_before=now - timedelta(seconds=max(older_than, in_flight)),
        lease_until=now + timedelta(seconds=60),
        limit=payment_handler.RECONCILE_BATCH,
    )
    leased = []
    for _ in range(batches):
        batch = store.claim_for_reconciliation(claim)
        leased += [p.id for p in batch]
        if not batch:
            break
        claim = replace(claim, after=(batch[-1].updated_at, batch[-1].id))
    store.release(leased)
    return {"plans": plans, "claimed": len(leased)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile_pass", description=__doc__)
    parser.add_argument("--older-than", type=float, default=60.0)
    parser.add_argument("--explain", action="store_true")
    args = parser.parse_args(argv)
    result = explain_claims(args.older_than) if args.explain else timed_pass(args.older_than)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
