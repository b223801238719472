"""Add provider_events: every verified webhook event, stored once per provider and id.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

A redelivered event hits the unique constraint and changes nothing; ``result`` stays
NULL until the event is applied, so one a crash interrupted is applied later.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "provider_events",
        sa.Column("id", SERIAL, autoincrement=True, nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_json", sa.Text(), nullable=False),
        sa.Column("result", sa.String(16), nullable=True),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_events")),
        sa.UniqueConstraint(
            "provider", "event_id", name=op.f("uq_provider_events_provider_event_id")
        ),
    )
    op.create_index(
        op.f("ix_provider_events_result_received_at"),
        "provider_events",
        ["result", "received_at"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_provider_events_result_received_at"), table_name="provider_events")
    op.drop_table("provider_events")
