"""Where refunds are kept, and the refund ceiling that the database enforces.

A refund holds its amount on its payment's row (``refund_reserved_minor``) from the
moment it is stored until it certainly failed; ``amount_refunded_minor`` counts what the
provider confirmed. Every change to those two columns is one conditional UPDATE in the
same short transaction as the refund's own change, and a CHECK constraint keeps
``0 <= refunded <= reserved <= amount``: no interleaving of requests on any number of
hosts can refund more than was charged, and no lock outlives the transaction.

Like payments, every refund status change is conditional on the version that was read
and writes a ``refund_events`` row; every provider request a ``refund_attempts`` row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from sqlalchemy import bindparam, func, literal, select
from sqlalchemy.exc import IntegrityError

import database_config as db
from connection_pool import Attempt
from errors import RefundNotAllowed
from money import to_major_units
from payment_states import PaymentStatus, RefundState
from payment_store import ReconcileClaim, attempt_row, claim_batch, event_row, release_leases

#: ``refund_attempts.kind``: a request that may move money, or a lookup by key.
REFUND, LOOKUP = "refund", "lookup"

_P, _S, _F, _U = RefundState.PENDING, RefundState.SUCCEEDED, RefundState.FAILED, RefundState.UNKNOWN


@dataclass(frozen=True)
class NewRefund:
    """A validated refund of a payment (in its currency), as step 1 stores it."""

    id: str
    payment_id: str
    idempotency_key: str
    fingerprint: str
    amount_minor: int
    currency: str
    reason: str | None
    metadata: dict | None


@dataclass(frozen=True)
class StoredRefund:
    """A ``refunds`` row."""

    id: str
    payment_id: str
    idempotency_key: str
    request_fingerprint: str
    amount_minor: int
    currency: str
    reason: str | None
    metadata: dict | None
    status: RefundState
    provider_refund_id: str | None
    failure_code: str | None
    failure_message: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    version: int


@dataclass(frozen=True)
class RefundChange:
    """One refund status change and what it records with it."""

    to_status: RefundState
    reason: str
    attempts: Sequence[Attempt] = ()
    attempt_kind: str = REFUND
    provider_refund_id: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None


def ceiling_moves(from_status: RefundState, to_status: RefundState) -> tuple[int, int]:
    """How a change moves the payment's (reserved, refunded) amounts, in refund amounts.

    Money that is or may be moving stays reserved; only a refund that certainly failed
    gives its amount back, and one that comes back to life takes it again.
    """
    holding = {_P: (1, 0), _U: (1, 0), _S: (1, 1), _F: (0, 0)}
    before, after = holding[from_status], holding[to_status]
    return after[0] - before[0], after[1] - before[1]


class RefundStore(Protocol):
    """What the refund lifecycle needs; every method is its own short transaction."""

    def reserve(self, new: NewRefund) -> tuple[StoredRefund, bool]:
        """Store ``new`` as ``pending`` and reserve its amount on the payment, together.

        ``(refund, True)``; ``(existing, False)`` when the key is taken. Raises
        ``RefundNotAllowed`` when the payment is not ``succeeded`` or has less than the
        amount left to refund (nothing is stored then).
        """
        ...

    def find_refund_by_key(self, idempotency_key: str) -> StoredRefund | None: ...

    def find_refund(self, refund_id: str) -> StoredRefund | None: ...

    def transition_refund(self, refund: StoredRefund, change: RefundChange) -> StoredRefund | None:
        """Apply ``change`` if ``refund`` is unchanged since it was read, moving the
        payment's amounts with it (:func:`ceiling_moves`); ``None`` if someone changed it
        first. Raises ``RefundNotAllowed`` if a failed refund cannot take its amount back."""
        ...

    def record_refund_attempts(
        self,
        refund_id: str,
        attempts: Sequence[Attempt],
        kind: str,
        provider_refund_id: str | None = None,
    ) -> StoredRefund | None:
        """Append provider requests that changed no status (and the id of a refund the
        provider is still processing)."""
        ...

    def claim_refunds_for_reconciliation(self, claim: ReconcileClaim) -> list[StoredRefund]: ...

    def release_refunds(self, refund_ids: Iterable[str]) -> None: ...


def not_refundable(payment_id: str, status: str) -> RefundNotAllowed:
    return RefundNotAllowed(
        f"payment {payment_id} is {status}: only a succeeded payment can be refunded"
    )


def exceeds_refundable(amount: int | None, left: int, currency: str) -> RefundNotAllowed:
    left_text = f"{to_major_units(left, currency)} {currency}"
    if amount is None:
        message = f"nothing is left to refund on this payment ({left_text})"
    else:
        message = (
            f"a refund of {to_major_units(amount, currency)} {currency} exceeds the "
            f"{left_text} left to refund on this payment"
        )
    return RefundNotAllowed(message, code="amount_exceeds_refundable")


# --------------------------------------------------------------------------- SQL

_r = db.refunds.c
_p = db.payments.c
_SELECT_REFUND_BY_KEY = select(db.refunds).where(_r.idempotency_key == bindparam("key"))
_SELECT_REFUND_BY_ID = select(db.refunds).where(_r.id == bindparam("refund_id"))
_SELECT_PAYMENT = select(_p.status, _p.currency, _p.amount_minor, _p.refund_reserved_minor).where(
    _p.id == bindparam("payment_id")
)
_MOVE_CEILING = (
    db.payments.update()
    .where(
        _p.id == bindparam("payment_id"),
        _p.status == PaymentStatus.SUCCEEDED.value,
        _p.refund_reserved_minor + bindparam("reserve") <= _p.amount_minor,
    )
    .values(
        refund_reserved_minor=_p.refund_reserved_minor + bindparam("reserve"),
        amount_refunded_minor=_p.amount_refunded_minor + bindparam("refund"),
    )
    .returning(_p.id)
)
_REFUND_COLUMNS = (
    "id", "payment_id", "idempotency_key", "request_fingerprint", "amount_minor", "currency",
    "reason", "metadata_json", "status", "created_at", "updated_at",
)  # fmt: skip
_EVENT_COLUMNS = ("refund_id", "at", "from_status", "to_status", "reason")
# On PostgreSQL each step is one statement (data-modifying CTEs), as for payments: the
# reservation, the refund and its event in step 1; the change, its event and the
# payment's amounts in step 3. All of it happens, or none.
# Parameters of statements that UPDATE are never named like a column: SQLAlchemy SETs
# every parameter that is, in a CTE's UPDATE too.
_reserved = (
    db.payments.update()
    .where(
        _p.id == bindparam("new_payment_id"),
        _p.status == PaymentStatus.SUCCEEDED.value,
        _p.refund_reserved_minor + bindparam("new_amount_minor") <= _p.amount_minor,
    )
    .values(refund_reserved_minor=_p.refund_reserved_minor + bindparam("new_amount_minor"))
    .returning(_p.id)
    .cte("reserved")
)
_created = (
    db.refunds.insert()
    .from_select(
        _REFUND_COLUMNS,
        select(*(bindparam(f"new_{c}", type_=_r[c].type) for c in _REFUND_COLUMNS)).select_from(
            _reserved
        ),
    )
    .returning(_r.id, _r.created_at)
    .cte("created")
)
_RESERVE_WITH_EVENT = select(_created.c.id).add_cte(
    db.refund_events.insert()
    .from_select(
        _EVENT_COLUMNS,
        select(
            _created.c.id,
            _created.c.created_at,
            literal(None, db.refund_events.c.from_status.type),
            literal(RefundState.PENDING.value),
            literal("created"),
        ),
    )
    .cte("logged")
)
_SETTLE_REFUND = (
    db.refunds.update()
    .where(
        _r.id == bindparam("refund_id"),
        _r.version == bindparam("read_version"),
        _r.status == bindparam("from_status"),
    )
    .values(
        status=bindparam("to_status"),
        version=_r.version + 1,
        updated_at=bindparam("now"),
        reconcile_lease_until=None,
        failure_code=bindparam("new_failure_code"),
        failure_message=bindparam("new_failure_message"),
        provider_refund_id=func.coalesce(bindparam("provider_id"), _r.provider_refund_id),
        attempts=_r.attempts + bindparam("refund_attempts"),
    )
    .returning(*db.refunds.c)
)
_settled = _SETTLE_REFUND.cte("settled")
_logged = (
    db.refund_events.insert()
    .from_select(
        _EVENT_COLUMNS,
        select(
            _settled.c.id,
            _settled.c.updated_at,
            bindparam("from_status"),
            _settled.c.status,
            bindparam("event_reason"),
        ),
    )
    .cte("logged")
)
_SETTLE_WITH_EVENT = select(_settled).add_cte(_logged)
_ceiling_moved = (
    db.payments.update()
    .where(
        _p.id == select(_settled.c.payment_id).scalar_subquery(),
        _p.status == PaymentStatus.SUCCEEDED.value,
        _p.refund_reserved_minor + bindparam("ceiling_reserve") <= _p.amount_minor,
    )
    .values(
        refund_reserved_minor=_p.refund_reserved_minor + bindparam("ceiling_reserve"),
        amount_refunded_minor=_p.amount_refunded_minor + bindparam("ceiling_refund"),
    )
    .returning(_p.id)
    .cte("ceiling_moved")
)
_SETTLE_MOVING_CEILING = select(
    _settled, select(func.count()).select_from(_ceiling_moved).scalar_subquery().label("moved")
).add_cte(_logged)
_COUNT_ATTEMPTS = (
    db.refunds.update()
    .where(_r.id == bindparam("refund_id"))
    .values(
        attempts=_r.attempts + bindparam("refund_attempts"),
        provider_refund_id=func.coalesce(bindparam("pending_refund_id"), _r.provider_refund_id),
    )
    .returning(*db.refunds.c)
)


def _from_row(row) -> StoredRefund:
    m = row._mapping
    return StoredRefund(
        id=m["id"],
        payment_id=m["payment_id"],
        idempotency_key=m["idempotency_key"],
        request_fingerprint=m["request_fingerprint"],
        amount_minor=m["amount_minor"],
        currency=m["currency"],
        reason=m["reason"],
        metadata=json.loads(m["metadata_json"]) if m["metadata_json"] else None,
        status=RefundState(m["status"]),
        provider_refund_id=m["provider_refund_id"],
        failure_code=m["failure_code"],
        failure_message=m["failure_message"],
        attempts=m["attempts"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        version=m["version"],
    )


@dataclass
class SqlRefundStore:
    """:class:`RefundStore` in the service's database.

    :param clock: the time written into rows and compared with leases (aware UTC).
    """

    clock: Callable[[], datetime] = field(default=db.utcnow)

    def reserve(self, new: NewRefund) -> tuple[StoredRefund, bool]:
        now = self.clock()
        refund = StoredRefund(
            id=new.id,
            payment_id=new.payment_id,
            idempotency_key=new.idempotency_key,
            request_fingerprint=new.fingerprint,
            amount_minor=new.amount_minor,
            currency=new.currency,
            reason=new.reason,
            metadata=new.metadata,
            status=_P,
            provider_refund_id=None,
            failure_code=None,
            failure_message=None,
            attempts=0,
            created_at=now,
            updated_at=now,
            version=0,
        )
        values = {
            **{c: getattr(refund, c) for c in _REFUND_COLUMNS if c != "metadata_json"},
            "status": _P.value,
            "metadata_json": (
                json.dumps(new.metadata, sort_keys=True) if new.metadata is not None else None
            ),
        }
        try:
            with db.transaction() as conn:
                if conn.dialect.name == "postgresql":
                    prefixed = {f"new_{name}": value for name, value in values.items()}
                    reserved = conn.execute(_RESERVE_WITH_EVENT, prefixed).first() is not None
                else:
                    reserved = (
                        conn.execute(  # only its own parameters: an UPDATE would SET the rest
                            _MOVE_CEILING,
                            {
                                "payment_id": new.payment_id,
                                "reserve": new.amount_minor,
                                "refund": 0,
                            },
                        ).first()
                        is not None
                    )
                    if reserved:
                        conn.execute(db.refunds.insert(), values)
                        self._event(conn, refund.id, None, _P, "created", now)
                if not reserved:
                    # Refused: a replay of an earlier refund, or the payment cannot take it.
                    existing = conn.execute(
                        _SELECT_REFUND_BY_KEY, {"key": new.idempotency_key}
                    ).first()
                    if existing is not None:
                        return _from_row(existing), False
                    raise self._why_not(conn, new)
        except IntegrityError:
            raced = self.find_refund_by_key(new.idempotency_key)
            if raced is None:
                raise  # some other constraint: a bug, not a race
            return raced, False
        return refund, True

    @staticmethod
    def _why_not(conn, new: NewRefund) -> RefundNotAllowed:
        payment = conn.execute(_SELECT_PAYMENT, {"payment_id": new.payment_id}).first()
        if payment.status != PaymentStatus.SUCCEEDED:
            return not_refundable(new.payment_id, payment.status)
        left = payment.amount_minor - payment.refund_reserved_minor
        return exceeds_refundable(new.amount_minor, left, payment.currency)

    @staticmethod
    def _left(conn, payment_id: str) -> int:
        row = conn.execute(_SELECT_PAYMENT, {"payment_id": payment_id}).first()
        return row.amount_minor - row.refund_reserved_minor

    def find_refund_by_key(self, idempotency_key: str) -> StoredRefund | None:
        with db.transaction() as conn:
            row = conn.execute(_SELECT_REFUND_BY_KEY, {"key": idempotency_key}).first()
        return _from_row(row) if row is not None else None

    def find_refund(self, refund_id: str) -> StoredRefund | None:
        with db.transaction() as conn:
            row = conn.execute(_SELECT_REFUND_BY_ID, {"refund_id": refund_id}).first()
        return _from_row(row) if row is not None else None

    def transition_refund(self, refund: StoredRefund, change: RefundChange) -> StoredRefund | None:
        refund_attempts = len(change.attempts) if change.attempt_kind == REFUND else 0
        params = dict(
            refund_id=refund.id,
            read_version=refund.version,
            from_status=refund.status.value,
            to_status=change.to_status.value,
            now=self.clock(),
            new_failure_code=change.failure_code,
            new_failure_message=change.failure_message,
            provider_id=change.provider_refund_id,
            refund_attempts=refund_attempts,
            pending_refund_id=None,
        )
        reserve, refunded = ceiling_moves(refund.status, change.to_status)
        with db.transaction() as conn:
            if change.attempts:
                rows = [
                    attempt_row(refund.id, change.attempt_kind, a, owner="refund_id")
                    for a in change.attempts
                ]
                conn.execute(db.refund_attempts.insert(), rows)
            moving = (reserve, refunded) != (0, 0)
            ceiling = {
                "payment_id": refund.payment_id,
                "reserve": reserve * refund.amount_minor,
                "refund": refunded * refund.amount_minor,
            }
            postgresql = conn.dialect.name == "postgresql"
            if postgresql:
                statement = _SETTLE_MOVING_CEILING if moving else _SETTLE_WITH_EVENT
                row = conn.execute(
                    statement,
                    {
                        **params,
                        "ceiling_reserve": ceiling["reserve"],
                        "ceiling_refund": ceiling["refund"],
                        "event_reason": change.reason[:255],
                    },
                ).first()
            else:
                row = conn.execute(_SETTLE_REFUND, params).first()
            if row is None:
                if refund_attempts:  # only its own parameters: an UPDATE SETs the rest
                    conn.execute(
                        _COUNT_ATTEMPTS,
                        {
                            "refund_id": refund.id,
                            "refund_attempts": refund_attempts,
                            "pending_refund_id": None,
                        },
                    )
                return None
            if moving:
                moved = (
                    row._mapping["moved"]
                    if postgresql
                    else conn.execute(_MOVE_CEILING, ceiling).first()
                )
                if not moved:  # only taking an amount back can fail: rolls back it all
                    raise exceeds_refundable(
                        refund.amount_minor, self._left(conn, refund.payment_id), refund.currency
                    )
            if not postgresql:
                self._event(
                    conn, refund.id, refund.status, change.to_status, change.reason, params["now"]
                )
        return _from_row(row)

    def record_refund_attempts(
        self,
        refund_id: str,
        attempts: Sequence[Attempt],
        kind: str,
        provider_refund_id: str | None = None,
    ) -> StoredRefund | None:
        if not attempts:
            return self.find_refund(refund_id) if kind == REFUND else None
        with db.transaction() as conn:
            conn.execute(
                db.refund_attempts.insert(),
                [attempt_row(refund_id, kind, a, owner="refund_id") for a in attempts],
            )
            if kind != REFUND:
                return None
            row = conn.execute(
                _COUNT_ATTEMPTS,
                {
                    "refund_id": refund_id,
                    "refund_attempts": len(attempts),
                    "pending_refund_id": provider_refund_id,
                },
            ).first()
        return _from_row(row) if row is not None else None

    def claim_refunds_for_reconciliation(self, claim: ReconcileClaim) -> list[StoredRefund]:
        rows = claim_batch(db.refunds, claim, self.clock())
        return sorted((_from_row(r) for r in rows), key=lambda r: (r.updated_at, r.id))

    def release_refunds(self, refund_ids: Iterable[str]) -> None:
        release_leases(db.refunds, refund_ids)

    @staticmethod
    def _event(conn, refund_id, from_status, to_status, reason, at) -> None:
        row = event_row(refund_id, from_status, to_status, reason, at, owner="refund_id")
        conn.execute(db.refund_events.insert(), row)
