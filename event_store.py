"""Where verified provider events are kept: once per provider and event id.

The endpoint stores an event before answering, so a redelivery (providers retry for
days, with duplicates) hits the unique constraint and changes nothing. ``result`` stays
NULL until the event has been applied; events a crash left unapplied are found by
:meth:`SqlEventStore.unapplied` and applied by the next reconciliation run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

import database_config as db
from providers.base import ProviderCharge, ProviderEvent, ProviderRefund


@dataclass(frozen=True)
class StoredEvent:
    row_id: int
    provider: str
    event: ProviderEvent


def event_json(event: ProviderEvent) -> str:
    """The neutral event as JSON: applying it later needs no signature check again."""
    data = asdict(event)
    data["created"] = event.created.isoformat()
    return json.dumps(data, sort_keys=True)


def event_from_json(text: str) -> ProviderEvent:
    data = json.loads(text)
    charge, refund = data.pop("charge"), data.pop("refund")
    return ProviderEvent(
        **{**data, "created": datetime.fromisoformat(data["created"])},
        charge=ProviderCharge(**charge) if charge else None,
        refund=ProviderRefund(**refund) if refund else None,
    )


@dataclass
class SqlEventStore:
    """Provider events in the service's database.

    :param clock: the time written as ``received_at``/``applied_at`` (aware UTC).
    """

    clock: Callable[[], datetime] = field(default=db.utcnow)

    def record(self, provider: str, event: ProviderEvent) -> int | None:
        """Store ``event``; its row id, or ``None`` when it was stored before."""
        row = dict(
            provider=provider,
            event_id=event.id,
            type=event.type,
            created_at=event.created,
            received_at=self.clock(),
            event_json=event_json(event),
        )
        try:
            with db.transaction() as conn:
                return conn.execute(
                    db.provider_events.insert().returning(db.provider_events.c.id), row
                ).scalar_one()
        except IntegrityError:
            return None  # the unique (provider, event_id): a redelivery

    def mark(self, row_id: int, result: str) -> None:
        """Record how an event was applied."""
        with db.transaction() as conn:
            conn.execute(
                db.provider_events.update()
                .where(db.provider_events.c.id == row_id)
                .values(result=result, applied_at=self.clock())
            )

    def unapplied(self, received_before: datetime, limit: int = 500) -> list[StoredEvent]:
        """Events stored before ``received_before`` that were never applied, oldest first."""
        e = db.provider_events.c
        with db.transaction() as conn:
            rows = conn.execute(
                select(e.id, e.provider, e.event_json)
                .where(e.result.is_(None), e.received_at < received_before)
                .order_by(e.received_at, e.id)
                .limit(limit)
            ).all()
        return [StoredEvent(r.id, r.provider, event_from_json(r.event_json)) for r in rows]
