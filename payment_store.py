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

from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError

import database_config as db

PENDING, SUCCEEDED, FAILED, UNKNOWN = "pending", "succeeded", "failed", "unknown"


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
        db.payment_events.insert().values(
            payment_id=payment_id,
            at=datetime.now(UTC),
            from_status=from_status,
            to_status=to_status,
            reason=(reason or None) and reason[:255],
        )
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
            conn.execute(db.payments.insert().values(**values))
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
        row = conn.execute(
            select(db.payments).where(db.payments.c.idempotency_key == idempotency_key)
        ).first()
    return _from_row(row) if row is not None else None


def find_by_id(payment_id: str) -> StoredPayment | None:
    with db.transaction() as conn:
        row = conn.execute(select(db.payments).where(db.payments.c.id == payment_id)).first()
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
    now = datetime.now(UTC)
    changes = dict(status=to_status, updated_at=now, reconcile_lease_until=None)
    if to_status != PENDING:
        changes.update(failure_code=failure_code, failure_message=failure_message)
    if provider_charge_id is not None:
        changes["provider_charge_id"] = provider_charge_id
    with db.transaction() as conn:
        if attempts:
            conn.execute(
                db.payment_attempts.insert(),
                [_attempt_values(payment_id, attempt_kind, a) for a in attempts],
            )
        if attempt_kind == "charge" and attempts:
            changes["attempts"] = db.payments.c.attempts + len(attempts)
        row = conn.execute(
            db.payments.update()
            .where(
                db.payments.c.id == payment_id,
                db.payments.c.status == from_status,
                *(
                    [db.payments.c.failure_code == only_if_failure_code]
                    if only_if_failure_code
                    else []
                ),
            )
            .values(**changes)
            .returning(*db.payments.c)
        ).first()
        if row is None:
            if "attempts" in changes:
                conn.execute(
                    db.payments.update()
                    .where(db.payments.c.id == payment_id)
                    .values(attempts=changes["attempts"])
                )
            return None
        _event(conn, payment_id, from_status, to_status, reason)
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
                db.payment_attempts.insert(),
                [_attempt_values(payment_id, kind, a) for a in attempts],
            )
