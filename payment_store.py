"""Where payments are kept: the store the lifecycle is given, and its SQL implementation.

:class:`PaymentStore` is what ``payment_handler`` needs from a store; :class:`SqlPaymentStore`
keeps payments in the database of ``database_config`` (tests also use an in-memory one).
Each method is one short transaction and returns plain values, so no connection is ever
held while the provider is called. Rows are never deleted; every status change writes a
``payment_events`` row and every provider request a ``payment_attempts`` row.

Every status change is conditional on the version the caller read (bumped by each
change), so two writers can never both settle a payment, and a verdict reached about
an older version of a payment can never overwrite a newer one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import and_, bindparam, func, literal, or_, select, tuple_
from sqlalchemy.exc import IntegrityError

import database_config as db
from connection_pool import Attempt
from errors import DatabaseUnavailable
from payment_states import PaymentStatus

#: ``payment_attempts.kind``: a request that may move money, or a lookup by key.
CHARGE, LOOKUP = "charge", "lookup"


@dataclass(frozen=True)
class NewPayment:
    """A validated payment request, as step 1 stores it."""

    id: str
    idempotency_key: str
    transaction_id: str
    fingerprint: str
    amount_minor: int
    currency: str
    payment_method: str
    description: str | None
    metadata: dict | None


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
    status: PaymentStatus
    provider_charge_id: str | None
    failure_code: str | None
    failure_message: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    version: int
    #: Held by refunds that are or may be moving money; the part the provider confirmed.
    refund_reserved_minor: int = 0
    amount_refunded_minor: int = 0

    @classmethod
    def pending(cls, new: NewPayment, now: datetime) -> StoredPayment:
        """``new`` as step 1 stores it."""
        return cls(
            id=new.id,
            idempotency_key=new.idempotency_key,
            transaction_id=new.transaction_id,
            request_fingerprint=new.fingerprint,
            amount_minor=new.amount_minor,
            currency=new.currency,
            payment_method=new.payment_method,
            description=new.description,
            metadata=new.metadata,
            status=PaymentStatus.PENDING,
            provider_charge_id=None,
            failure_code=None,
            failure_message=None,
            attempts=0,
            created_at=now,
            updated_at=now,
            version=0,
        )


@dataclass(frozen=True)
class Change:
    """One status change and what it records with it (step 3, or a reconciliation)."""

    to_status: PaymentStatus
    reason: str
    attempts: Sequence[Attempt] = ()
    attempt_kind: str = CHARGE
    provider_charge_id: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None


@dataclass(frozen=True)
class ReconcileClaim:
    """Which payments one reconciliation batch may lease.

    ``unknown`` payments last updated before ``unknown_before`` and ``pending`` ones
    before ``pending_before``, whose lease is free; oldest first, strictly after
    ``after`` (the ``(updated_at, id)`` of the previous batch's last row), so one run
    passes over each payment once even when a lease expires during the run.
    """

    unknown_before: datetime
    pending_before: datetime
    lease_until: datetime
    limit: int
    after: tuple[datetime, str] | None = None


class PaymentStore(Protocol):
    """What the lifecycle needs from a store; every method is its own short transaction."""

    def insert_pending(self, new: NewPayment) -> tuple[StoredPayment, bool]:
        """Store ``new`` as ``pending``; ``(payment, True)``, or ``(existing, False)`` if
        its idempotency key is taken (the unique key decides races across hosts)."""
        ...

    def find_by_key(self, idempotency_key: str) -> StoredPayment | None: ...

    def find_by_id(self, payment_id: str) -> StoredPayment | None: ...

    def transition(self, payment: StoredPayment, change: Change) -> StoredPayment | None:
        """Apply ``change`` if ``payment`` is unchanged since it was read (same version).

        ``None`` when someone else changed it first; the attempts are recorded anyway:
        they happened.
        """
        ...

    def record_attempts(
        self,
        payment_id: str,
        attempts: Sequence[Attempt],
        kind: str,
        provider_charge_id: str | None = None,
    ) -> StoredPayment | None:
        """Append provider requests that changed no status (and the id of a charge the
        provider is still processing); the row when ``kind`` is a charge (its attempt
        count grows), else ``None``."""
        ...

    def claim_for_reconciliation(self, claim: ReconcileClaim) -> list[StoredPayment]: ...

    def release(self, payment_ids: Iterable[str]) -> None:
        """Free the reconciliation leases of payments a run did not get to."""
        ...


# --------------------------------------------------------------------------- SQL

# Statements are built once: rebuilding them per call (``.values(**kw)``) cost about a
# sixth of the service's CPU per payment in the overhead benchmark.
_p = db.payments.c
_INSERT_PAYMENT = db.payments.insert()
_INSERT_EVENT = db.payment_events.insert()
_INSERT_ATTEMPTS = db.payment_attempts.insert()
_SELECT_BY_KEY = select(db.payments).where(_p.idempotency_key == bindparam("key"))
_SELECT_BY_ID = select(db.payments).where(_p.id == bindparam("payment_id"))
_SETTLE = (
    db.payments.update()
    .where(
        _p.id == bindparam("payment_id"),
        _p.version == bindparam("version"),
        _p.status == bindparam("from_status"),
    )
    .values(
        status=bindparam("to_status"),
        version=_p.version + 1,
        updated_at=bindparam("now"),
        reconcile_lease_until=None,
        failure_code=bindparam("new_failure_code"),
        failure_message=bindparam("new_failure_message"),
        provider_charge_id=func.coalesce(bindparam("charge_id"), _p.provider_charge_id),
        attempts=_p.attempts + bindparam("charge_attempts"),
    )
    .returning(*db.payments.c)
)
_COUNT_ATTEMPTS = (
    db.payments.update()
    .where(_p.id == bindparam("payment_id"))
    .values(
        attempts=_p.attempts + bindparam("charge_attempts"),
        provider_charge_id=func.coalesce(bindparam("pending_charge_id"), _p.provider_charge_id),
    )
    .returning(*db.payments.c)
)

# On PostgreSQL a change and its event row go in one statement (a data-modifying CTE):
# one round trip instead of two, and the event can never be left out.
_EVENT_COLUMNS = ("payment_id", "at", "from_status", "to_status", "reason")
_PAYMENT_COLUMNS = (
    "id", "idempotency_key", "transaction_id", "request_fingerprint", "amount_minor",
    "currency", "payment_method", "description", "metadata_json", "status", "attempts",
    "created_at", "updated_at", "version",
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
        literal(PaymentStatus.PENDING.value),
        literal("created"),
    ),
)
_settled = _SETTLE.cte("settled")
_SETTLE_WITH_EVENT = select(_settled).add_cte(
    db.payment_events.insert()
    .from_select(
        _EVENT_COLUMNS,
        select(
            _settled.c.id,
            _settled.c.updated_at,
            bindparam("from_status"),
            _settled.c.status,
            bindparam("reason"),
        ),
    )
    .cte("logged")
)


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
        status=PaymentStatus(m["status"]),
        provider_charge_id=m["provider_charge_id"],
        failure_code=m["failure_code"],
        failure_message=m["failure_message"],
        attempts=m["attempts"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        version=m["version"],
        refund_reserved_minor=m["refund_reserved_minor"],
        amount_refunded_minor=m["amount_refunded_minor"],
    )


def attempt_row(
    owner_id: str, kind: str, attempt: Attempt, owner: str = "payment_id"
) -> dict[str, Any]:
    """The ``payment_attempts`` (or ``refund_attempts``) row of one provider request."""
    if attempt.status is not None:
        outcome = "answered"
    elif attempt.timeout is not None:
        outcome = f"{attempt.error_kind}_timeout"
    else:
        outcome = f"{attempt.error_kind}_error"
    return {
        owner: owner_id,
        "kind": kind,
        "attempt": attempt.number,
        "started_at": attempt.started_at,
        "duration_ms": int(round(attempt.duration * 1000)),
        "http_status": attempt.status,
        "error": attempt.error,
        "outcome": outcome,
    }


def event_row(
    owner_id: str,
    from_status,
    to_status,
    reason: str | None,
    at: datetime,
    owner: str = "payment_id",
) -> dict[str, Any]:
    """The ``payment_events`` (or ``refund_events``) row of one status change."""
    return {
        owner: owner_id,
        "at": at,
        "from_status": from_status.value if from_status is not None else None,
        "to_status": to_status.value,
        "reason": (reason or None) and reason[:255],
    }


@dataclass
class SqlPaymentStore:
    """:class:`PaymentStore` in the service's database (``database_config.transaction``).

    :param clock: the time written into rows and compared with leases (aware UTC).
    """

    clock: Callable[[], datetime] = field(default=db.utcnow)

    def insert_pending(self, new: NewPayment) -> tuple[StoredPayment, bool]:
        payment = StoredPayment.pending(new, self.clock())
        values = {
            **{
                name: getattr(payment, name) for name in _PAYMENT_COLUMNS if name != "metadata_json"
            },
            "status": payment.status.value,
            "metadata_json": (
                json.dumps(new.metadata, sort_keys=True) if new.metadata is not None else None
            ),
        }
        try:
            with db.transaction() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(_CREATE_WITH_EVENT, values)
                else:
                    conn.execute(_INSERT_PAYMENT, values)
                    self._event(
                        conn, new.id, None, PaymentStatus.PENDING, "created", payment.created_at
                    )
        except IntegrityError:
            existing = self.find_by_key(new.idempotency_key)
            if existing is None:
                raise  # some other constraint: a bug, not a race
            return existing, False
        return payment, True

    def find_by_key(self, idempotency_key: str) -> StoredPayment | None:
        with db.transaction() as conn:
            row = conn.execute(_SELECT_BY_KEY, {"key": idempotency_key}).first()
        return _from_row(row) if row is not None else None

    def find_by_id(self, payment_id: str) -> StoredPayment | None:
        with db.transaction() as conn:
            row = conn.execute(_SELECT_BY_ID, {"payment_id": payment_id}).first()
        return _from_row(row) if row is not None else None

    def transition(self, payment: StoredPayment, change: Change) -> StoredPayment | None:
        charge_attempts = len(change.attempts) if change.attempt_kind == CHARGE else 0
        params = dict(
            payment_id=payment.id,
            version=payment.version,
            from_status=payment.status.value,
            to_status=change.to_status.value,
            now=self.clock(),
            new_failure_code=change.failure_code,
            new_failure_message=change.failure_message,
            charge_id=change.provider_charge_id,
            charge_attempts=charge_attempts,
            pending_charge_id=None,
            reason=change.reason[:255],
        )
        with db.transaction() as conn:
            if change.attempts:
                rows = [attempt_row(payment.id, change.attempt_kind, a) for a in change.attempts]
                conn.execute(_INSERT_ATTEMPTS, rows)
            if conn.dialect.name == "postgresql":
                row = conn.execute(_SETTLE_WITH_EVENT, params).first()
            else:
                row = conn.execute(_SETTLE, params).first()
                if row is not None:
                    self._event(
                        conn,
                        payment.id,
                        payment.status,
                        change.to_status,
                        change.reason,
                        params["now"],
                    )
            if row is None:
                if charge_attempts:  # only its own parameters: an UPDATE SETs the rest
                    conn.execute(
                        _COUNT_ATTEMPTS,
                        {
                            "payment_id": payment.id,
                            "charge_attempts": charge_attempts,
                            "pending_charge_id": None,
                        },
                    )
                return None
        return _from_row(row)

    def record_attempts(
        self,
        payment_id: str,
        attempts: Sequence[Attempt],
        kind: str,
        provider_charge_id: str | None = None,
    ) -> StoredPayment | None:
        if not attempts:
            return self.find_by_id(payment_id) if kind == CHARGE else None
        with db.transaction() as conn:
            conn.execute(_INSERT_ATTEMPTS, [attempt_row(payment_id, kind, a) for a in attempts])
            if kind != CHARGE:
                return None
            row = conn.execute(
                _COUNT_ATTEMPTS,
                {
                    "payment_id": payment_id,
                    "charge_attempts": len(attempts),
                    "pending_charge_id": provider_charge_id,
                },
            ).first()
        return _from_row(row) if row is not None else None

    def claim_for_reconciliation(self, claim: ReconcileClaim) -> list[StoredPayment]:
        rows = claim_batch(db.payments, claim, self.clock())
        return sorted((_from_row(r) for r in rows), key=lambda r: (r.updated_at, r.id))

    def release(self, payment_ids: Iterable[str]) -> None:
        release_leases(db.payments, payment_ids)

    @staticmethod
    def _event(conn, payment_id, from_status, to_status, reason, at) -> None:
        conn.execute(_INSERT_EVENT, event_row(payment_id, from_status, to_status, reason, at))


def claim_batch(table, claim: ReconcileClaim, now: datetime) -> list:
    """Lease a batch of ``table`` (payments or refunds) with ``FOR UPDATE SKIP LOCKED``
    (PostgreSQL): reconcilers on several hosts take disjoint batches, and no transaction
    stays open while one of them asks the provider."""
    c = table.c
    conditions = [
        or_(
            and_(c.status == PaymentStatus.UNKNOWN.value, c.updated_at < claim.unknown_before),
            and_(c.status == PaymentStatus.PENDING.value, c.updated_at < claim.pending_before),
        ),
        or_(c.reconcile_lease_until.is_(None), c.reconcile_lease_until < now),
    ]
    if claim.after is not None:
        conditions.append(tuple_(c.updated_at, c.id) > tuple_(*claim.after))
    with db.transaction() as conn:
        ids = conn.scalars(
            select(c.id)
            .where(*conditions)
            .order_by(c.updated_at, c.id)
            .limit(claim.limit)
            .with_for_update(skip_locked=True)
        ).all()
        if not ids:
            return []
        return list(
            conn.execute(
                table.update()
                .where(c.id.in_(ids))
                .values(reconcile_lease_until=claim.lease_until)
                .returning(*table.c)
            ).all()
        )


def release_leases(table, ids: Iterable[str]) -> None:
    """Free the reconciliation leases of rows a run did not get to."""
    ids = list(ids)
    if ids:
        with db.transaction() as conn:
            conn.execute(
                table.update().where(table.c.id.in_(ids)).values(reconcile_lease_until=None)
            )


T = TypeVar("T")


def write_with_retries(
    write: Callable[[], T], *, retries: int, sleep: Callable[[float], None]
) -> T:
    """``write()``, tried again (0.1 s, doubling) while the database is unavailable.

    For step 3: the provider has answered, and a database blip must not lose what it
    said. Raises the last ``DatabaseUnavailable`` when every try failed.
    """
    delay = 0.1
    for _ in range(retries):
        try:
            return write()
        except DatabaseUnavailable:
            sleep(delay)
            delay *= 2
    return write()
