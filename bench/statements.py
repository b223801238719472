"""``python -m bench.statements [--requests N]``: what a payment and a refund ask of the database.

Run by the refunds scenario in a child process configured like the service
(``DATABASE_URL``, ``PAYMENT_API_URL``, ``PAYMENT_API_KEY``, ``REQUESTS_CA_BUNDLE``,
``API_KEYS`` in its environment), against its last round's database. In-process, through
Flask's test client, one request at a time: a payment and a refund of it to warm up, then
N payments and a partial refund of each. For every request it counts, at the engine:
connections checked out of the pool (each checkout of a pooled connection is a pre-ping,
``SELECT 1`` in a transaction of its own: ``pool_pre_ping``), transactions committed, the
statements by kind (verb and tables), and, for every statement that updates
``payments``, how the planner reaches the row (a plain ``EXPLAIN`` of it with the same
parameters, just before it runs). Prints one JSON object: the counts per request, averaged
over the N of each kind.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from collections import Counter

from sqlalchemy import event

import database_config

PAYMENT = {"amount": "25.99", "currency": "USD", "payment_method": "card"}
REFUND = {"amount": "5.00"}
_TABLES = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN)\s+(\w+)", re.IGNORECASE)
_CTE_NAMES = re.compile(r"(?:\bWITH|,)\s+(\w+)\s+AS\s*\(", re.IGNORECASE)
_SCAN = re.compile(r"(Index Only Scan|Index Scan|Bitmap Heap Scan|Seq Scan)(?: using (\w+))? on ")


def label(statement: str) -> str:
    """``INSERT refunds``, ``UPDATE payments``, ``WITH payments+payment_events`` ..."""
    verb = statement.split(None, 1)[0].upper()
    named = set(_CTE_NAMES.findall(statement))  # a WITH's own names are not tables
    tables = dict.fromkeys(t for t in _TABLES.findall(statement) if t not in named)
    return f"{verb} {'+'.join(tables)}".strip()


class Counts:
    """Per-request counters, filled by engine events."""

    def __init__(self) -> None:
        self.current: Counter = Counter()

    def attach(self, engine) -> None:
        @event.listens_for(engine, "checkout")
        def checkout(*_):
            self.current["checkouts"] += 1

        @event.listens_for(engine, "commit")
        def commit(*_):
            self.current["commits"] += 1

        @event.listens_for(engine, "before_cursor_execute")
        def before(conn, cursor, statement, parameters, context, executemany):
            self.current["statements"] += 1
            self.current[f"statement: {label(statement)}"] += 1
            if re.search(r"\bUPDATE payments\b", statement) and not executemany:
                cursor.execute("EXPLAIN " + statement, parameters)
                plan = "\n".join(row[0] for row in cursor.fetchall())
                scan = _SCAN.search(plan)
                how = "?" if scan is None else " ".join(p for p in scan.groups() if p)
                self.current[f"payments row found by: {how}"] += 1

    def take(self) -> Counter:
        taken, self.current = self.current, Counter()
        return taken


def measure(requests: int) -> dict:
    from service import create_app  # after the environment is read

    app = create_app()
    api_key = app.config["API_KEYS"][0] if app.config["API_KEYS"] else ""
    client = app.test_client()
    counts = Counts()
    counts.attach(database_config.get_engine())

    def post(path: str, body: dict) -> dict:
        headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": uuid.uuid4().hex}
        response = client.post(path, json=body, headers=headers)
        if response.status_code != 201:
            raise RuntimeError(f"{path}: {response.status_code} {response.get_data(as_text=True)}")
        return response.get_json()

    totals = {"payment": Counter(), "refund": Counter()}
    for i in range(requests + 1):
        counts.take()
        payment = post("/v1/payments", PAYMENT)
        paid = counts.take()
        post(f"/v1/payments/{payment['id']}/refunds", REFUND)
        refunded = counts.take()
        if i:  # the first of each opened the pool's connection and the provider's
            totals["payment"].update(paid)
            totals["refund"].update(refunded)
    return {
        "requests": requests,
        **{
            kind: {k: round(v / requests, 2) for k, v in sorted(c.items())}
            for kind, c in totals.items()
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.statements", description=__doc__)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args(argv)
    json.dump(measure(args.requests), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
