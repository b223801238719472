"""The SQL of the payment lifecycle: short transactions only, never across network I/O.

Each function opens its own transaction through ``database_config.transaction()``
and returns plain values, so no connection is ever held while the provider is called.
Rows are never deleted; every status change writes a ``payment_events`` row and every
provider request a ``payment_attempts`` row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, bindparam, func, literal, or_, select
from sqlalchemy.exc import IntegrityError

import database_config as db

PENDING, SUCCEEDED, FAILED, UNKNOWN = "pending", "succeeded", "failed", "unknown"

# Statements are built once: rebuilding them per call (``.values(**kw)``) cost about a
# sixth of the service's CPU per payment in the overhead benchmark.
_p = db.payments.c
_INSERT_PAYMENT = db.payments.insert()
_INSERT_EVENT = db.payment_events.insert()
_INSERT_ATTEMPTS = db.payment_attempts.insert()
_SELECT_BY_KEY = select(db.payments).where(_p.idempotency_key == bindparam("key"))
_SELECT_BY_ID = select(db.payments).where(_p.id == bindparam("payment_id"))
_SETTLE_VALUES = dict(
    status=bindparam("to_status"),
    updated_at=bindparam("now"),
    reconcile_lease_until=None,
    failure_code=bindparam("new_failure_code"),
    failure_message=bindparam("new_failure_message"),
    provider_charge_id=func.coalesce(bindparam("charge_id"), _p.provider_charge_id),
    attempts=_p.attempts + bindparam("charge_attempts"),
)
_SETTLE_WHERE = (_p.id == bindparam("payment_id"), _p.status == bindparam("from_status"))
_SETTLE = (
    db.payments.update().where(*_SETTLE_WHERE).values(**_SETTLE_VALUES).returning(*db.payments.c)
)
_SETTLE_IF_CODE = (
    db.payments.update()
    .where(*_SETTLE_WHERE, _p.failure_code == bindparam("expected_failure_code"))
    .values(**_SETTLE_VALUES)
    .returning(*db.payments.c)
)

# On PostgreSQL a change and its event row go in one statement (a data-modifying CTE):
# one round trip instead of two, and the event can never be left out.
_EVENT_COLUMNS = ("payment_id", "at", "from_status", "to_status", "reason")
_PAYMENT_COLUMNS = (
    "id", "idempotency_key", "transaction_id", "request_fingerprint", "amount_minor",
    "currency", "payment_method", "description", "metadata_json", "status", "attempts",
    "created_at", "updated_at",
)  # fmt: skip
_created = (
    db.payments.insert()
    .values({c: bindparam(c, type_=_p[c].type) for c in _PAYMENT_COLUMNS})
    .returning(_p.id, _p.created_at)
    .cte("created")
)
_CREATE_WITH_EVENT = db.payment_events.insert().from_select(
    _EVENT_COLUMNS,
    select(
        _created.c.id,
        _created.c.created_at,
        literal(None, db.payment_events.c.from_status.type),
        literal(PENDING),
        literal("created"),
    ),
)


def _with_event(settle):
    settled = settle.cte("settled")
    logged = db.payment_events.insert().from_select(
        _EVENT_COLUMNS,
        select(
            settled.c.id,
            settled.c.updated_at,
            bindparam("from_status"),
            settled.c.status,
            bindparam("reason"),
        ),
    )
    return select(settled).add_cte(logged.cte("logged"))


_SETTLE_WITH_EVENT = _with_event(_SETTLE)
_SETTLE_IF_CODE_WITH_EVENT = _with_event(_SETTLE_IF_CODE)
_COUNT_ATTEMPTS = (
    db.payments.update()
    .where(_p.id == bindparam("payment_id"))
    .values(attempts=_p.attempts + bindparam("charge_attempts"))
)


@dataclass(frozen=True)
class StoredPayment:
    """A ``payments`` row."""

    id: str
    idempotency_key: str
    transaction_id: str
    request_fingerprint: str
    amount_minor: int
    currency: str
    payment_method: str
    description: str | None
    metadata: dict | None
    status: str
    provider_charge_id: str | None
    failure_code: str | None
    failure_message: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime


def _from_row(row) -> StoredPayment:
    m = row._mapping
    return StoredPayment(
        id=m["id"],
        idempotency_key=m["idempotency_key"],
        transaction_id=m["transaction_id"],
        request_fingerprint=m["request_fingerprint"],
        amount_minor=m["amount_minor"],
        currency=m["currency"],
        payment_method=m["payment_method"],
        description=m["description"],
        metadata=json.loads(m["metadata_json"]) if m["metadata_json"] else None,
        status=m["status"],
        provider_charge_id=m["provider_charge_id"],
        failure_code=m["failure_code"],
        failure_message=m["failure_message"],
        attempts=m["attempts"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
    )


def _event(conn, payment_id: str, from_status: str | None, to_status: str, reason: str | None):
    conn.execute(
        _INSERT_EVENT,
        dict(
            payment_id=payment_id,
            at=datetime.now(UTC),
            from_status=from_status,
            to_status=to_status,
            reason=(reason or None) and reason[:255],
        ),
    )


def insert_pending(
    *,
    payment_id: str,
    idempotency_key: str,
    transaction_id: str,
    fingerprint: str,
    amount_minor: int,
    currency: str,
    payment_method: str,
    description: str | None,
    metadata: dict | None,
) -> StoredPayment | None:
    """Insert a new ``pending`` payment and commit; ``None`` if the key already exists.

    The unique constraint on ``idempotency_key`` decides races between threads,
    processes and hosts: exactly one insert wins.
    """
    now = datetime.now(UTC)
    values = dict(
        id=payment_id,
        idempotency_key=idempotency_key,
        transaction_id=transaction_id,
        request_fingerprint=fingerprint,
        amount_minor=amount_minor,
        currency=currency,
        payment_method=payment_method,
        description=description,
        metadata_json=json.dumps(metadata, sort_keys=True) if metadata is not None else None,
        status=PENDING,
        attempts=0,
        created_at=now,
        updated_at=now,
    )
    try:
        with db.transaction() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(_CREATE_WITH_EVENT, values)
            else:
                conn.execute(_INSERT_PAYMENT, values)
                _event(conn, payment_id, None, PENDING, "created")
    except IntegrityError:
        if find_by_key(idempotency_key) is None:
            raise  # some other constraint: a bug, not a race
        return None
    return StoredPayment(
        **{k: v for k, v in values.items() if k != "metadata_json"},
        metadata=metadata,
        provider_charge_id=None,
        failure_code=None,
        failure_message=None,
    )


def find_by_key(idempotency_key: str) -> StoredPayment | None:
    with db.transaction() as conn:
        row = conn.execute(_SELECT_BY_KEY, {"key": idempotency_key}).first()
    return _from_row(row) if row is not None else None


def find_by_id(payment_id: str) -> StoredPayment | None:
    with db.transaction() as conn:
        row = conn.execute(_SELECT_BY_ID, {"payment_id": payment_id}).first()
    return _from_row(row) if row is not None else None


def transition(
    payment_id: str,
    *,
    from_status: str,
    to_status: str,
    reason: str,
    attempts: Iterable = (),
    attempt_kind: str = "charge",
    provider_charge_id: str | None = None,
    failure_code: str | None = None,
    failure_message: str | None = None,
    only_if_failure_code: str | None = None,
) -> StoredPayment | None:
    """Move a payment from ``from_status`` to ``to_status`` and record why, in one commit.

    The update is conditional on ``from_status``: if another thread, process or
    reconciler changed the payment first, nothing is written and ``None`` is returned,
    so no payment is ever settled twice. The provider ``attempts`` are recorded either
    way: they happened.
    """
    attempts = list(attempts)
    charge_attempts = len(attempts) if attempt_kind == "charge" else 0
    params = dict(
        payment_id=payment_id,
        from_status=from_status,
        to_status=to_status,
        now=datetime.now(UTC),
        new_failure_code=failure_code,
        new_failure_message=failure_message,
        charge_id=provider_charge_id,
        charge_attempts=charge_attempts,
        expected_failure_code=only_if_failure_code,
        reason=reason[:255],
    )
    with db.transaction() as conn:
        if attempts:
            conn.execute(
                _INSERT_ATTEMPTS, [_attempt_values(payment_id, attempt_kind, a) for a in attempts]
            )
        if conn.dialect.name == "postgresql":
            settle = _SETTLE_IF_CODE_WITH_EVENT if only_if_failure_code else _SETTLE_WITH_EVENT
            row = conn.execute(settle, params).first()
        else:
            row = conn.execute(_SETTLE_IF_CODE if only_if_failure_code else _SETTLE, params).first()
            if row is not None:
                _event(conn, payment_id, from_status, to_status, reason)
        if row is None:
            if charge_attempts:
                conn.execute(_COUNT_ATTEMPTS, params)
            return None
    return _from_row(row)


def _attempt_values(payment_id: str, kind: str, attempt) -> dict:
    return dict(
        payment_id=payment_id,
        kind=kind,
        attempt=attempt.number,
        started_at=attempt.started_at,
        duration_ms=int(round(attempt.duration * 1000)),
        http_status=attempt.status,
        error=attempt.error,
        outcome=_attempt_outcome(attempt),
    )


def _attempt_outcome(attempt) -> str:
    if attempt.status is not None:
        return "answered"
    if attempt.timeout is not None:
        return f"{attempt.error_kind}_timeout"
    return f"{attempt.error_kind}_error"


def claim_for_reconciliation(
    older_than_seconds: float, pending_older_than_seconds: float, lease_seconds: float, limit: int
) -> list[StoredPayment]:
    """Lease up to ``limit`` ``unknown`` (and older ``pending``) payments not updated lately.

    On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets reconcilers on several hosts take
    disjoint batches; the lease keeps a payment from being taken again while one of
    them asks the provider about it, without holding a transaction across that call.
    """
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=older_than_seconds)
    pending_cutoff = now - timedelta(seconds=pending_older_than_seconds)
    p = db.payments.c
    with db.transaction() as conn:
        rows = conn.execute(
            select(p.id)
            .where(
                or_(
                    and_(p.status == UNKNOWN, p.updated_at < cutoff),
                    and_(p.status == PENDING, p.updated_at < pending_cutoff),
                ),
                or_(p.reconcile_lease_until.is_(None), p.reconcile_lease_until < now),
            )
            .order_by(p.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        ids = [r.id for r in rows]
        if ids:
            conn.execute(
                db.payments.update()
                .where(p.id.in_(ids))
                .values(reconcile_lease_until=now + timedelta(seconds=lease_seconds))
            )
        claimed = conn.execute(select(db.payments).where(p.id.in_(ids))).all() if ids else []
    return [_from_row(r) for r in claimed]


def record_attempts(payment_id: str, attempts: Iterable, kind: str) -> None:
    """Append provider requests that changed no status (a lookup that found it pending)."""
    attempts = list(attempts)
    if attempts:
        with db.transaction() as conn:
            conn.execute(
                _INSERT_ATTEMPTS,
                [_attempt_values(payment_id, kind, a) for a in attempts],
            )
