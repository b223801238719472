"""A table after a year: a migrated database pre-filled with payments, in SQL.

The fill is three ``INSERT ... SELECT`` statements over ``generate_series`` in one
transaction, never the API: ``payments`` rows spread evenly over the last 365 days (ids,
keys and amounts shaped as the service writes them), then each payment's
``payment_attempts`` and ``payment_events`` rows derived from it, as the service leaves
them: a ``created`` event, one charge attempt (two when the first got a 503), the
settling event. The mix is what a year leaves behind: about 92 % ``succeeded``, 8 %
``failed`` (declined), a few ``unknown`` ones from the last hours, all older than the
reconciliation threshold that is meant to find them, and none ``pending``.

A bulk load the way ``pg_restore`` does one, so that it takes a minute, not several:
the keys, foreign keys and indexes of the three tables (not the partial index of the
unsettled payments: it holds only the ``unknown`` ones) are dropped first and rebuilt
after the load from the definitions the migrations created (read from the catalog, and
checked identical afterwards; rebuilding the foreign keys checks every row). Random-key
indexes are rebuilt about 70 % full, as a year of inserts in random key order leaves a
B-tree, then their definition is reset to the migrations' (time-ordered ones are built
full, as appends leave them). Then the tables are vacuumed and analysed (autovacuum
would have, over a year) and a checkpoint writes the load out, so the load that follows
does not pay for the fill.

:func:`reconcile` then captures the claim query's plan and times one reconciliation
pass over the full table, each in a child process (``bench/reconcile_pass.py``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from bench.procs import ROOT, SCRUBBED
from bench.scenarios import SERVICE_ENV, Bench

PAYMENTS = 2_000_000
UNKNOWN = 100
#: The fill is bounded: the server cancels it after this long.
FILL_TIMEOUT_S = 600
#: The unknown payments were left behind during these last hours.
UNKNOWN_WITHIN = timedelta(hours=6)
#: The newest pre-filled payment is this old, older than any reconciliation threshold.
NEWEST_AGE = timedelta(minutes=10)
TABLES = ("payments", "payment_attempts", "payment_events")
#: The reconciliation pass's threshold (``payments reconcile --older-than``'s default).
RECONCILE_OLDER_THAN_S = 60.0
RECONCILE_TIMEOUT_S = 120
#: Indexes whose keys arrive in time order (serial ids, status + time): built full.
#: Every other index of the three tables gets random keys and is built RANDOM_FILLFACTOR.
TIME_ORDERED = frozenset(
    {"pk_payment_attempts", "pk_payment_events", "ix_payments_status_updated_at"}
)
RANDOM_FILLFACTOR = 70

# Row i (1..n) is created at :start + (i - 1) * :step. Statuses: every :stride-th of the
# last rows is unknown (:unknown of them), every 13th other one failed (declined), the
# rest succeeded; every 50th succeeded one needed a retry after a 503.
_PAYMENTS = text(
    """
    INSERT INTO payments (id, idempotency_key, transaction_id, request_fingerprint,
        amount_minor, currency, payment_method, status, provider_charge_id, failure_code,
        failure_message, attempts, created_at, updated_at, version)
    SELECT 'pay_' || left(h, 24), k, k, md5(k) || md5(h), 100 + (i::bigint * 7919) % 99900, 'USD',
        'card', s,
        CASE WHEN s = 'succeeded' THEN 'ch_' || right(h, 24) END,
        CASE WHEN s = 'failed' THEN 'card_declined' END,
        CASE WHEN s = 'failed' THEN 'Your card was declined.' END,
        CASE WHEN s = 'unknown' THEN 3 WHEN s = 'succeeded' AND i % 50 = 0 THEN 2 ELSE 1 END,
        t,
        t + CASE WHEN s = 'unknown' THEN interval '15 s' ELSE interval '350 ms' END,
        1
    FROM (
        SELECT i, md5('pay' || i) AS h, 'order-' || md5('key' || i) AS k,
            CAST(:start AS timestamptz) + (i - 1) * CAST(:step AS interval) AS t,
            CASE
                WHEN i > :n - :unknown * :stride AND (:n - i) % :stride = 0 THEN 'unknown'
                WHEN i % 13 = 0 THEN 'failed'
                ELSE 'succeeded'
            END AS s
        FROM generate_series(1, :n) AS i
    ) AS g
    """
)
_ATTEMPTS = text(
    """
    INSERT INTO payment_attempts (payment_id, kind, attempt, started_at, duration_ms,
        http_status, error, outcome)
    SELECT p.id, 'charge', a, p.created_at + (a - 1) * interval '5 s', d,
        CASE
            WHEN p.status = 'unknown' THEN NULL
            WHEN a < p.attempts THEN 503
            WHEN p.status = 'failed' THEN 402
            ELSE 201
        END,
        CASE WHEN p.status = 'unknown' THEN
            'read: ReadTimeoutError: Read timed out. (read timeout=5)' END,
        CASE WHEN p.status = 'unknown' THEN 'read_timeout' ELSE 'answered' END
    FROM payments AS p,
        LATERAL generate_series(1, p.attempts) AS a,
        LATERAL (SELECT CASE WHEN p.status = 'unknown' THEN 5000
                             ELSE 150 + p.amount_minor % 200 END AS d) AS duration
    """
)
_EVENTS = text(
    """
    INSERT INTO payment_events (payment_id, at, from_status, to_status, reason)
    SELECT p.id,
        CASE WHEN e = 1 THEN p.created_at ELSE p.updated_at END,
        CASE WHEN e = 2 THEN 'pending' END,
        CASE WHEN e = 1 THEN 'pending' ELSE p.status END,
        CASE
            WHEN e = 1 THEN 'created'
            WHEN p.status = 'succeeded' THEN 'charged'
            WHEN p.status = 'failed' THEN 'card_declined'
            ELSE 'outcome_unknown'
        END
    FROM payments AS p, generate_series(1, 2) AS e
    """
)
#: Keys, unique constraints and foreign keys on or into the three tables.
_CONSTRAINTS = text(
    """
    SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid)
    FROM pg_constraint AS c
    WHERE c.contype IN ('p', 'u', 'f')
        AND (c.conrelid = ANY(CAST(:tables AS regclass[]))
             OR c.confrelid = ANY(CAST(:tables AS regclass[])))
    ORDER BY c.conname
    """
)
#: The other indexes of the three tables.
_INDEXES = text(
    """
    SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
    FROM pg_index AS i
    WHERE i.indrelid = ANY(CAST(:tables AS regclass[]))
        AND NOT EXISTS (SELECT 1 FROM pg_constraint AS c WHERE c.conindid = i.indexrelid)
    ORDER BY 1
    """
)


def plan(payments: int, unknown: int, now: datetime) -> dict:
    """The fill's parameters: ``payments`` rows over the year before ``now - NEWEST_AGE``."""
    if not 0 <= unknown <= payments:
        raise ValueError("unknown must be between 0 and payments")
    newest = now - NEWEST_AGE
    start = newest - timedelta(days=365)
    step = (newest - start) / max(1, payments - 1)
    per_window = int(UNKNOWN_WITHIN / step) if step else payments
    stride = max(1, min(per_window, payments) // max(1, unknown))
    return {"n": payments, "unknown": unknown, "stride": stride, "start": start, "step": step}


def fill(url: str, payments: int = PAYMENTS, unknown: int = UNKNOWN) -> dict:
    """Pre-fill the migrated, empty database at ``url``; return what it took.

    ``payments`` rows (with their attempts and events), ``unknown`` of them ``unknown``.
    """
    params = plan(payments, unknown, datetime.now(UTC))
    engine = create_engine(url, poolclass=NullPool)
    timings = {}
    try:
        started = time.monotonic()
        with engine.begin() as conn:
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = '{FILL_TIMEOUT_S}s'")
            conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
            schema = _schema(conn)
            _drop(conn, schema)
            for table, statement in zip(TABLES, (_PAYMENTS, _ATTEMPTS, _EVENTS), strict=True):
                t0 = time.monotonic()
                conn.execute(statement, params)
                timings[f"insert_{table}_s"] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            _rebuild(conn, schema)
            timings["rebuild_keys_and_indexes_s"] = round(time.monotonic() - t0, 1)
            if _schema(conn) != schema:
                raise RuntimeError("the rebuilt keys and indexes differ from the migrations'")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            t0 = time.monotonic()
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {', '.join(TABLES)}")
            timings["vacuum_analyze_s"] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            conn.exec_driver_sql("CHECKPOINT")
            timings["checkpoint_s"] = round(time.monotonic() - t0, 1)
            timings["fill_s"] = round(time.monotonic() - started, 1)
            sizes = {t: _size(conn, t) for t in TABLES}
            rows = {t: conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() for t in TABLES}
            statuses = dict(
                conn.exec_driver_sql("SELECT status, count(*) FROM payments GROUP BY status").all()
            )
    finally:
        engine.dispose()
    return {**timings, "rows": rows, "statuses": statuses, "size_mib": sizes}


def _schema(conn: Connection) -> dict[str, list]:
    """The keys, foreign keys and other indexes of the three tables, as the catalog has them."""
    tables = list(TABLES)
    return {
        "constraints": [tuple(r) for r in conn.execute(_CONSTRAINTS, {"tables": tables})],
        "indexes": [tuple(r) for r in conn.execute(_INDEXES, {"tables": tables})],
    }


def _rebuilt(indexes: list) -> list:
    """The indexes the fill drops and rebuilds: not the partial ones (the unsettled rows'
    indexes hold 100 rows; kept, they cost the load nothing, and a definition read back
    from the catalog would not come back word for word)."""
    return [(name, definition) for name, definition in indexes if " WHERE " not in definition]


def _drop(conn: Connection, schema: dict[str, list]) -> None:
    for table, name, _kind, _ in sorted(schema["constraints"], key=lambda c: c[2] != "f"):
        conn.exec_driver_sql(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for name, _ in _rebuilt(schema["indexes"]):
        conn.exec_driver_sql(f"DROP INDEX {name}")


def _rebuild(conn: Connection, schema: dict[str, list]) -> None:
    """Keys first, then indexes, then foreign keys (which check every row against a key)."""
    random_keys = []
    for table, name, kind, definition in sorted(schema["constraints"], key=lambda c: c[2] == "f"):
        if kind != "f" and name not in TIME_ORDERED:
            definition += f" WITH (fillfactor = {RANDOM_FILLFACTOR})"
            random_keys.append(name)
        conn.exec_driver_sql(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
    for name, definition in _rebuilt(schema["indexes"]):
        if name not in TIME_ORDERED:
            definition += f" WITH (fillfactor = {RANDOM_FILLFACTOR})"
            random_keys.append(name)
        conn.exec_driver_sql(definition)
    for name in random_keys:  # built sparse; later page splits as the migrations' index
        conn.exec_driver_sql(f'ALTER INDEX "{name}" RESET (fillfactor)')


def _size(conn: Connection, table: str) -> float:
    """Table plus indexes, MiB."""
    size = conn.exec_driver_sql(f"SELECT pg_total_relation_size('{table}')").scalar()
    return round(size / 2**20, 1)


def reconcile(bench: Bench, url: str) -> dict:
    """The claim query's plans, then one timed reconciliation pass over the database at
    ``url``, each in a child process configured like an operator's cron job."""
    bench.sandbox.reset()  # a healthy provider that has never seen the unknown payments' keys
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(
        SERVICE_ENV,
        **bench.service_env,
        DATABASE_URL=url,
        PAYMENT_API_URL=bench.sandbox.url,
        PAYMENT_API_KEY=bench.sandbox.api_key,
        REQUESTS_CA_BUNDLE=bench.sandbox.ca_bundle,
    )
    log = bench.tmp_dir / f"reconcile-{bench.run_token}.log"
    plans = _child(["--explain"], env, log)["plans"]
    timed = _child([], env, log)
    refunds = timed["report"].pop("refunds", None)  # the pass looks at refunds too
    return {
        "reconcile_pass_s": timed["pass_s"],
        "reconcile_sql_s": timed["sql_s"],
        "reconcile_sql_statements": timed["sql_statements"],
        "reconcile_report": timed["report"],
        "reconcile_refunds_report": refunds,
        "claim_plans": plans,
        "claim_uses_index": bool(plans) and all(uses_index(p) for p in plans),
        "claim_execution_ms": [execution_ms(p) for p in plans],
    }


def uses_index(plan: str) -> bool:
    """The plan reads payments through an index and never scans the whole table."""
    return "Seq Scan on payments" not in plan and re.search(r"Index (Only )?Scan", plan) is not None


def execution_ms(plan: str) -> float | None:
    match = re.search(r"Execution Time: ([0-9.]+) ms", plan)
    return float(match.group(1)) if match else None


def _child(args: list[str], env: dict[str, str], log: Path) -> dict:
    with open(log, "ab") as stderr:
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.reconcile_pass",
                "--older-than",
                str(RECONCILE_OLDER_THAN_S),
                *args,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            timeout=RECONCILE_TIMEOUT_S,
            check=False,
        )
    if completed.returncode != 0:
        tail = log.read_bytes()[-2000:].decode(errors="replace")
        raise RuntimeError(f"bench.reconcile_pass {' '.join(args)} failed:\n{tail}")
    return json.loads(completed.stdout)
